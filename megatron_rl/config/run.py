"""The whole run's configuration: one section per component, loaded from a YAML recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_rl.config.algorithm import AlgorithmConfig
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
    seed: int = 1234
    """Seed of every random stream (data order, init, sampling, dropout)."""

    def __post_init__(self) -> None:
        require(self.seed >= 0, "`seed` must be >= 0.")


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML recipe (or defaults), apply ``key.sub=value`` overrides, validate."""
    tree: dict[str, Any] = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"Recipe `{recipe}` does not exist; recipes live in configs/ (e.g. configs/tiny_cpu.yaml).")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"Recipe `{recipe}` is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"Recipe `{recipe}` must be a mapping of sections, got {type(tree).__name__}.")
    for ov in overrides:
        apply_override(tree, RunConfig, ov)
    return from_dict(RunConfig, tree)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (saved beside every run and checkpoint)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
