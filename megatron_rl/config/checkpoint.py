"""Checkpoint section: where and how often the full training state is saved."""

from dataclasses import dataclass
from typing import Literal

from megatron_rl.config.base import require

OptimizerFormat = Literal["dp_reshardable", "fully_reshardable"]


@dataclass
class CheckpointConfig:
    dir: str = ""
    """Directory holding `step_XXXXXXXX/` checkpoints and the `latest` pointer; empty disables saving."""
    save_every: int = 50
    """Save every this many steps (and at the end)."""
    keep_last: int = 3
    """Keep only the newest K checkpoints; 0 keeps all."""
    resume: str = "auto"
    """`auto` resumes from `dir/latest` if present, `none` starts fresh, or a checkpoint path."""
    init_from: str = ""
    """Start a new stage from another run's checkpoint (a root, following `latest`, or a step
    directory): weights, optimizer state, step count and data position are kept; this run's own
    checkpoints go to `dir`. Ignored once `dir` holds a checkpoint of this run (resume wins)."""
    export_hf: bool = True
    """Write a Hugging Face model (safetensors + config + tokenizer) to `<logging.output_dir>/hf`
    at the end of the run."""
    save_optimizer: bool = True
    """Save optimizer state (needed for exact resume)."""
    optimizer_format: OptimizerFormat = "dp_reshardable"
    """How the distributed optimizer's state is stored: `dp_reshardable` (megatron's default,
    fastest; resumes only at the saved TP/PP/CP/DP layout) or `fully_reshardable` (resumes at
    any layout, slower to save)."""

    def __post_init__(self) -> None:
        require(self.save_every >= 1, "`checkpoint.save_every` must be >= 1.")
        require(self.keep_last >= 0, "`checkpoint.keep_last` must be >= 0 (0 keeps all).")
