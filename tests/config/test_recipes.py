"""The recipes in configs/: they load, their layouts fit their GPUs, stages differ only
where the recipe changes, and they carry the hyper-parameters of ANCHORS.md."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from megatron_rl.config.base import to_dict
from megatron_rl.config.parallel import check_layout
from megatron_rl.config.run import RunConfig, dump_config, load_config
from megatron_rl.errors import ConfigError
from tests.helpers.tiny_models import tiny_hf_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Model dimensions from the public config.json files (nothing is downloaded).
# DeepSeek-R1-Distill-Qwen-1.5B (Qwen2.5-Math-1.5B): hidden 1536, vocab 151936.
QWEN2_1_5B = {"num_layers": 28, "num_heads": 12, "num_kv_heads": 2}
# DeepSeek-R1-Distill-Qwen-14B (Qwen2.5-14B): hidden 5120, vocab 152064.
QWEN2_14B = {"num_layers": 48, "num_heads": 40, "num_kv_heads": 8}
_tiny = inspect.signature(tiny_hf_config).parameters
TINY_QWEN2 = {"num_layers": _tiny["layers"].default, "num_heads": _tiny["heads"].default,
              "num_kv_heads": _tiny["kv_heads"].default}

# recipe -> (trainer world size it is written for, model dims)
TARGETS: dict[str, tuple[int, dict[str, int]]] = {
    "tiny_cpu.yaml": (1, TINY_QWEN2),
    "tiny_sft.yaml": (1, TINY_QWEN2),
    "deepscaler_1.5b_8k.yaml": (8, QWEN2_1_5B),
    "deepscaler_1.5b_16k.yaml": (32, QWEN2_1_5B),
    "deepscaler_1.5b_24k.yaml": (32, QWEN2_1_5B),
    "deepcoder_14b_16k.yaml": (8, QWEN2_14B),
    "deepcoder_14b_32k.yaml": (32, QWEN2_14B),
}
RECIPES = sorted(TARGETS)


def load(name: str, *overrides: str) -> RunConfig:
    return load_config(CONFIGS / name, list(overrides))


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": value}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}.{key}" if prefix else key))
    return out


def changed(a: str, b: str) -> dict[str, tuple[Any, Any]]:
    """Keys whose resolved values differ between recipes a and b, with both values."""
    fa, fb = flat(to_dict(load(a))), flat(to_dict(load(b)))
    return {k: (fa[k], fb[k]) for k in fa if fa[k] != fb[k]}


def test_every_recipe_file_has_a_layout_target():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_and_its_layout_fits_its_world(name):
    cfg = load(name)
    world, dims = TARGETS[name]
    seq_len = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    dp = check_layout(cfg.parallel, world, seq_len=seq_len, **dims)
    assert cfg.parallel.world_size == world and cfg.parallel.dp == dp  # `megatron-rl train` starts this world
    # Every data-parallel rank gets the same number of samples per optimizer update.
    per_update = cfg.train.mini_batch_prompts * cfg.rollout.n_samples
    assert per_update % dp == 0, (per_update, dp)
    if cfg.rollout.engine == "sglang":
        # Colocated: the rollout servers take exactly the trainer's GPUs.
        assert cfg.rollout.num_servers * cfg.rollout.tp_size == world


def test_tiny_cpu_takes_its_model_from_the_command_line():
    cfg = load("tiny_cpu.yaml", "model.path=/tmp/tiny/hf")
    assert cfg.model.path == "/tmp/tiny/hf"
    assert (cfg.parallel.tp, cfg.rollout.engine, cfg.model.dtype) == (1, "embedded", "float32")
    assert cfg.rollout.deterministic  # exact resume on CPU


def test_deepscaler_stages_differ_only_in_length_group_size_and_bookkeeping():
    assert changed("deepscaler_1.5b_8k.yaml", "deepscaler_1.5b_16k.yaml") == {
        "checkpoint.init_from": ("", "runs/deepscaler_1.5b_8k/checkpoints"),
        "parallel.dp": (8, 32),
        "train.num_steps": (1040, 1520),
        "rollout.num_servers": (8, 32),
        "rollout.max_new_tokens": (8192, 16384),
        "rollout.n_samples": (8, 16),
        "eval.every_steps": (20, 10),
        "checkpoint.dir": ("runs/deepscaler_1.5b_8k/checkpoints", "runs/deepscaler_1.5b_16k/checkpoints"),
        "checkpoint.save_every": (20, 10),
        "logging.output_dir": ("runs/deepscaler_1.5b_8k", "runs/deepscaler_1.5b_16k"),
    }
    assert changed("deepscaler_1.5b_16k.yaml", "deepscaler_1.5b_24k.yaml") == {
        "checkpoint.init_from": ("runs/deepscaler_1.5b_8k/checkpoints", "runs/deepscaler_1.5b_16k/checkpoints"),
        "train.num_steps": (1520, 1750),
        "rollout.max_new_tokens": (16384, 24576),
        "checkpoint.dir": ("runs/deepscaler_1.5b_16k/checkpoints", "runs/deepscaler_1.5b_24k/checkpoints"),
        "logging.output_dir": ("runs/deepscaler_1.5b_16k", "runs/deepscaler_1.5b_24k"),
    }


def test_deepcoder_stages_differ_only_in_length_batch_and_layout():
    assert set(changed("deepcoder_14b_16k.yaml", "deepcoder_14b_32k.yaml")) == {
        "checkpoint.init_from", "parallel.tp", "parallel.cp", "parallel.dp", "train.num_steps", "train.prompts_per_step",
        "train.mini_batch_prompts", "train.max_tokens_per_microbatch", "rollout.num_servers",
        "rollout.mem_fraction", "rollout.max_new_tokens", "checkpoint.dir", "logging.output_dir",
    }


@pytest.mark.parametrize("name", ["deepscaler_1.5b_8k.yaml", "deepscaler_1.5b_16k.yaml",
                                  "deepscaler_1.5b_24k.yaml"])
def test_deepscaler_hyperparameters_are_the_anchored_ones(name):
    cfg = load(name)
    alg = cfg.algorithm
    assert (alg.adv_estimator, alg.policy_loss, alg.loss_agg_mode) == ("grpo", "ppo", "token-mean")
    assert (alg.clip_low, alg.clip_high, alg.kl_coef, alg.kl_estimator) == (0.2, 0.2, 0.001, "low_var_kl")
    assert cfg.optimizer.lr == 1e-6
    assert (cfg.train.prompts_per_step, cfg.train.mini_batch_prompts) == (128, 64)
    assert (cfg.rollout.temperature, cfg.data.max_prompt_len, cfg.reward.kind) == (0.6, 1024, "math")
    assert cfg.rollout.n_samples == (8 if "8k" in name else 16)
    assert (cfg.eval.n_samples, cfg.eval.pass_k) == (16, [1])  # AIME24 avg@16


@pytest.mark.parametrize("name", ["deepcoder_14b_16k.yaml", "deepcoder_14b_32k.yaml"])
def test_deepcoder_hyperparameters_are_the_anchored_ones(name):
    cfg = load(name)
    alg = cfg.algorithm
    assert (alg.kl_coef, alg.entropy_coef, alg.clip_low, alg.clip_high) == (0.0, 0.0, 0.2, 0.28)
    assert alg.overlong_filter and not alg.dynamic_sampling
    assert (cfg.optimizer.lr, cfg.optimizer.clip_grad) == (1e-6, 1.0)
    assert (cfg.rollout.n_samples, cfg.rollout.temperature, cfg.data.max_prompt_len) == (8, 0.6, 2048)
    assert cfg.train.prompts_per_step == (32 if "16k" in name else 128)
    assert (cfg.reward.kind, cfg.reward.code_test_timeout_s) == ("code", 6.0)
    assert cfg.eval.max_new_tokens == 65536


@pytest.mark.parametrize("override, closest", [
    ("algorithm.kl_coeff=0", "kl_coef"),
    ("rollot.n_samples=4", "rollout"),
    ("train.mini_batch_prompt=32", "mini_batch_prompts"),
])
def test_typo_override_on_a_recipe_names_the_closest_key(override, closest):
    with pytest.raises(ConfigError, match=f"did you mean `{closest}`"):
        load("deepscaler_1.5b_16k.yaml", override)


def test_override_that_breaks_a_cross_section_rule_is_refused():
    with pytest.raises(ConfigError, match="needs >= 2 samples per prompt"):
        load("deepscaler_1.5b_8k.yaml", "rollout.n_samples=1")


@pytest.mark.parametrize("name", RECIPES)
def test_dump_then_load_round_trip_is_identical(name, tmp_path):
    cfg = load(name)
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_config(cfg))
    again = load_config(dumped)
    assert again == cfg
    assert dump_config(again) == dumped.read_text()
