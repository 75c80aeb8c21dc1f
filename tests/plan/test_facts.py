"""Issue 13 item 6: the planner against published facts, and its formulas against hand counts."""

import json

import pytest

from megatron_rl.config.run import load_config
from megatron_rl.errors import ConfigError
from megatron_rl.plan import KNOWN_MODELS, plan, plan_with_fix, resolve_dims
from megatron_rl.plan.memory import activations_bytes, optimizer_bytes

FOURTEEN_B_64K = ["parallel.tp=1", "parallel.cp=1", "parallel.dp=32", "parallel.sp=false",
                  "rollout.max_new_tokens=65536", "train.max_tokens_per_microbatch=67584"]


def _plan(recipe, overrides=(), **kw):
    cfg = load_config(recipe, list(overrides))
    dims, _ = resolve_dims(cfg.model.path)
    return plan_with_fix(cfg, dims, **kw)


def test_deepscaler_1_5b_8k_fits_on_8_gpus():
    p = _plan("configs/deepscaler_1.5b_8k.yaml", gpus=8)
    assert p.fits and p.fix is None and p.per_gpu_gib < 79.6


def test_deepcoder_14b_32k_fits_on_32_h100():
    p = _plan("configs/deepcoder_14b_32k.yaml", gpus=32, gpu="h100-80gb")
    assert p.fits and p.layout["dp"] == 4
    # The recipe's own comment: bf16 weights ~7.4 GB + fp32 grads ~14.8 GB + Adam/8 ~5.5 GB.
    gb = lambda k: p.breakdown[k] * 1024**3 / 1e9  # noqa: E731
    assert gb("weights") == pytest.approx(7.4, rel=0.02)
    assert gb("grads_fp32") == pytest.approx(14.8, rel=0.02)
    assert gb("optimizer") == pytest.approx(5.5, rel=0.02)


def test_14b_64k_tp1_no_cp_does_not_fit_and_names_a_fix():
    p = _plan("configs/deepcoder_14b_32k.yaml", FOURTEEN_B_64K, gpus=32)
    assert not p.fits
    assert p.fix["change"] and ("parallel.tp=" in p.fix["change"] or "parallel.cp=" in p.fix["change"])
    assert p.fix["per_gpu_gib"] <= p.gpu_memory_gib
    # The named fix, applied to the recipe, fits when planned from scratch.
    fixed = [o for o in FOURTEEN_B_64K if not o.startswith(("parallel.tp", "parallel.cp", "parallel.sp", "parallel.dp"))]
    lay = p.fix["layout"]
    fixed += [f"parallel.tp={lay['tp']}", f"parallel.cp={lay['cp']}", f"parallel.dp={lay['dp']}",
              f"parallel.sp={str(lay['sp']).lower()}"]
    assert _plan("configs/deepcoder_14b_32k.yaml", fixed, gpus=32).fits


def test_param_counts_match_the_model_cards():
    assert KNOWN_MODELS["deepseek-r1-distill-qwen-14b"].params / 1e9 == pytest.approx(14.77, abs=0.02)
    assert KNOWN_MODELS["qwen2.5-7b"].params / 1e9 == pytest.approx(7.62, abs=0.02)
    assert KNOWN_MODELS["qwen2.5-1.5b"].params / 1e9 == pytest.approx(1.54, abs=0.02)  # tied embeddings
    assert KNOWN_MODELS["llama-3-8b"].params / 1e9 == pytest.approx(8.03, abs=0.02)


def test_distributed_optimizer_shards_over_dp_times_cp():
    assert optimizer_bytes(1e9, dp=4, cp=2, distributed=True, fp32_model=False) == pytest.approx(12e9 / 8)
    assert optimizer_bytes(1e9, dp=4, cp=2, distributed=False, fp32_model=False) == pytest.approx(12e9)
    assert optimizer_bytes(1e9, dp=1, cp=1, distributed=False, fp32_model=True) == pytest.approx(8e9)


def test_recompute_cp_and_sp_shrink_activations():
    m = KNOWN_MODELS["qwen2.5-14b"]
    kw = dict(tp=4, pp=1, act_bytes=2)
    none = activations_bytes(m, 32768, cp=1, sp=False, recompute="none", **kw)
    full = activations_bytes(m, 32768, cp=1, sp=False, recompute="full", **kw)
    full_sp = activations_bytes(m, 32768, cp=1, sp=True, recompute="full", **kw)
    full_sp_cp2 = activations_bytes(m, 32768, cp=2, sp=True, recompute="full", **kw)
    assert none > full > full_sp > full_sp_cp2
    assert full_sp_cp2 == pytest.approx(full_sp / 2)


def test_fused_logits_are_smaller_and_json_round_trips():
    p = _plan("configs/deepcoder_14b_32k.yaml")
    assert p.breakdown["logits_fused"] < p.breakdown["logits_unfused"]
    assert json.loads(json.dumps(p.to_dict()))["fits"] is True


def test_dims_come_from_config_json_when_present(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=512, vocab_size=64, tie_word_embeddings=False)))
    dims, source = resolve_dims(str(tmp_path))
    assert (dims.hidden, dims.layers, dims.vocab) == (128, 4, 64) and source.endswith("config.json")


def test_bad_inputs_give_clear_errors():
    cfg = load_config("configs/deepcoder_14b_32k.yaml")
    dims, _ = resolve_dims(cfg.model.path)
    with pytest.raises(ConfigError, match="unknown --gpu"):
        plan(cfg, dims, gpu="v100")
    with pytest.raises(ConfigError, match="tp\\*pp\\*cp = 8"):
        plan(cfg, dims, gpus=12)
    with pytest.raises(ConfigError, match="not in the planner's table"):
        resolve_dims("models/NoSuchModel-3B")
