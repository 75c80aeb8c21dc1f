"""The whole run's configuration: one section per component, loaded from a YAML recipe.

A recipe is a YAML mapping of sections (``configs/*.yaml``). It may start with
``base: other.yaml``, a recipe file relative to the one naming it: the base is read first
(with its own base, if any) and this recipe's values are laid over it. Mappings merge key
by key; every other value, lists included, replaces the base's. That is how the stages of
one recipe (8K -> 16K -> 24K) state only what changes between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_rl.config.algorithm import AlgorithmConfig, check_trainable
from megatron_rl.config.base import apply_override, from_dict, require, to_dict
from megatron_rl.config.checkpoint import CheckpointConfig
from megatron_rl.config.data import DataConfig
from megatron_rl.config.eval import EvalConfig
from megatron_rl.config.logging import LoggingConfig
from megatron_rl.config.model import ModelConfig
from megatron_rl.config.optimizer import OptimizerConfig
from megatron_rl.config.parallel import ParallelConfig
from megatron_rl.config.reward import RewardConfig
from megatron_rl.config.rollout import RolloutConfig
from megatron_rl.config.sft import SFTConfig
from megatron_rl.config.train import TrainConfig
from megatron_rl.errors import ConfigError


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The actor's model."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout of the trainer world."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """AdamW and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Steps and batch sizes."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout engines and sampling."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """Advantages, policy loss, KL, corrections and shaping."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training prompts."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Grader."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and samples."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Supervised fine-tuning (`megatron-rl sft`)."""
    seed: int = 1234
    """Seed of every random stream (data order, init, sampling, dropout)."""

    def __post_init__(self) -> None:
        require(self.seed >= 0, "`seed` must be >= 0.")
        check_trainable(self.algorithm)
        # Checks that span sections; each section validates itself.
        # `rollout.n_samples` is the group size. Every advantage estimator uses a group
        # baseline: with one sample per prompt every advantage is 0 and nothing is learnt.
        require(
            self.rollout.n_samples >= 2,
            f"`rollout.n_samples` is {self.rollout.n_samples}, but the advantage estimator "
            f"`{self.algorithm.adv_estimator}` uses a group baseline and needs >= 2 samples per "
            "prompt (with 1 every advantage is 0).",
        )
        budget = self.train.max_tokens_per_microbatch
        longest = self.data.max_prompt_len + self.rollout.max_new_tokens
        require(
            budget == 0 or budget >= longest,
            f"`train.max_tokens_per_microbatch` ({budget}) is below the longest sample "
            f"(`data.max_prompt_len` + `rollout.max_new_tokens` = {longest}), which would then fit "
            f"no micro-batch: raise it to at least {longest} or set 0 (count-based micro-batches).",
        )


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML recipe (and its ``base:`` chain) or defaults, apply ``key.sub=value`` overrides, validate."""
    tree = read_recipe(Path(recipe), str(recipe)) if recipe is not None else {}
    for ov in overrides:
        apply_override(tree, RunConfig, ov)
    return from_dict(RunConfig, tree)


def read_recipe(path: Path, label: str, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """One recipe as a raw tree, its ``base:`` recipes merged underneath it.

    ``label`` names the file in errors as the user wrote it; ``chain`` holds the recipes
    that led here, to refuse cycles.
    """
    if not path.is_file():
        if chain:
            raise ConfigError(
                f"Recipe `{chain[-1]}` names `base: {label}`, but `{path}` does not exist "
                "(a base is a path relative to the recipe that names it)."
            )
        raise ConfigError(f"Recipe `{label}` does not exist; recipes live in configs/ (e.g. configs/tiny_cpu.yaml).")
    resolved = path.resolve()
    if resolved in chain:
        loop = " -> ".join(p.name for p in (*chain, resolved))
        raise ConfigError(f"Recipe `base:` chain loops back on itself: {loop}.")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"Recipe `{label}` is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"Recipe `{label}` must be a mapping of sections, got {type(tree).__name__}.")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"`base` in recipe `{label}` must be a recipe file name, got {base!r}.")
    return _merge(read_recipe(path.parent / base, base, (*chain, resolved)), tree)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid over ``base``: mappings merge recursively, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (saved beside every run and checkpoint)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
