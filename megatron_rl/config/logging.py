"""Logging section: console, JSONL metrics and Weights & Biases."""

from dataclasses import dataclass
from typing import Literal


@dataclass
class LoggingConfig:
    output_dir: str = "runs/default"
    """Run directory: metrics.jsonl, the resolved config, samples."""
    wandb_project: str = ""
    """Weights & Biases project; empty disables wandb."""
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"
    """wandb mode; offline writes a run directory to sync later."""
    log_samples: int = 2
    """Rollout samples written to samples.jsonl per step (prompt, response, reward), for eyeballing."""
    progress: Literal["auto", "bar", "lines"] = "auto"
    """Console progress: a bar on a terminal, one plain line per step otherwise (auto)."""
