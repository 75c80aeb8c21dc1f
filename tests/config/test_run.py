"""load_config: `base:` recipe chains, and the checks that span sections of RunConfig."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_rl.config.run import load_config
from megatron_rl.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_chain_merges_mappings_and_replaces_other_values(tmp_path):
    write(tmp_path / "common" / "a.yaml",
          "train: {num_steps: 7, prompts_per_step: 8, mini_batch_prompts: 4}\n"
          "eval: {files: [x.parquet, y.parquet], pass_k: [1, 2]}\nseed: 5\n")
    # A base is relative to the recipe naming it, not to the working directory.
    write(tmp_path / "common" / "b.yaml", "base: a.yaml\ntrain: {num_steps: 9}\neval: {files: [z.parquet]}\n")
    child = write(tmp_path / "c.yaml", "base: common/b.yaml\ntrain: {mini_batch_prompts: 8}\n")
    cfg = load_config(child, ["seed=6"])
    assert (cfg.train.num_steps, cfg.train.prompts_per_step, cfg.train.mini_batch_prompts) == (9, 8, 8)
    assert cfg.eval.files == ["z.parquet"] and cfg.eval.pass_k == [1, 2]
    assert cfg.seed == 6


@pytest.mark.parametrize("files, match", [
    ({"a.yaml": "base: a.yaml\n"}, r"loops back on itself: a.yaml -> a.yaml"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, r"a.yaml -> b.yaml -> a.yaml"),
    ({"a.yaml": "base: nowhere.yaml\n"}, r"names `base: nowhere.yaml`, but .*nowhere.yaml` does not exist"),
    ({"a.yaml": "base: [b.yaml]\n"}, r"`base` in recipe .* must be a recipe file name"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "- not a mapping\n"}, r"Recipe `b.yaml` must be a mapping"),
])
def test_bad_base_chains_are_refused_clearly(tmp_path, files, match):
    for name, text in files.items():
        write(tmp_path / name, text)
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path / "a.yaml")


def test_missing_recipe_names_configs_dir(tmp_path):
    with pytest.raises(ConfigError, match="recipes live in configs/"):
        load_config(tmp_path / "nope.yaml")


def test_group_of_one_sample_is_refused():
    with pytest.raises(ConfigError, match=r"`rollout.n_samples` is 1, but the advantage estimator `rloo`"):
        load_config(None, ["rollout.n_samples=1", "algorithm.adv_estimator=rloo"])
    assert load_config(None, ["rollout.n_samples=2"]).rollout.n_samples == 2


def test_token_budget_must_hold_the_longest_sample():
    with pytest.raises(ConfigError, match=r"below the longest sample .* = 9216"):
        load_config(None, ["train.max_tokens_per_microbatch=8192"])  # 1024 + 8192 by default
    assert load_config(None, ["train.max_tokens_per_microbatch=9216"]).train.max_tokens_per_microbatch == 9216


def test_eval_top_p_is_validated():
    with pytest.raises(ConfigError, match="eval.top_p"):
        load_config(None, ["eval.top_p=0"])


def test_gspo_with_token_level_clip_or_aggregation_is_refused():

    with pytest.raises(ConfigError, match="never clip"):
        load_config(None, ["algorithm.policy_loss=gspo", "algorithm.loss_agg_mode=seq-mean-token-mean"])
    with pytest.raises(ConfigError, match="seq-mean-token-mean"):
        load_config(None, ["algorithm.policy_loss=gspo", "algorithm.clip_low=3e-4", "algorithm.clip_high=4e-4"])
    cfg = load_config(None, ["algorithm.policy_loss=gspo", "algorithm.clip_low=3e-4", "algorithm.clip_high=4e-4",
                             "algorithm.loss_agg_mode=seq-mean-token-mean"])
    assert cfg.algorithm.policy_loss == "gspo"


def test_colocate_with_attached_servers_is_refused():

    with pytest.raises(ConfigError, match="colocate"):
        load_config(None, ["rollout.colocate=true", "rollout.server_urls=[http://node3:30000]"])
