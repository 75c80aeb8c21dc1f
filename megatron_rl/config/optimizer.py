"""Optimizer section: AdamW and its learning-rate schedule."""

from dataclasses import dataclass
from typing import Literal

from megatron_rl.config.base import require


@dataclass
class OptimizerConfig:
    name: Literal["adam", "sgd"] = "adam"
    """AdamW (training) or plain SGD (exactness tests: the update is -lr * gradient)."""
    lr: float = 1e-6
    """Peak learning rate (DeepScaleR and DeepCoder both use 1e-6)."""
    min_lr: float = 0.0
    """Floor of the decayed learning rate."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Decay after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to lr."""
    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables."""

    def __post_init__(self) -> None:
        require(self.lr > 0, f"`optimizer.lr` must be > 0, got {self.lr}.")
        require(0 <= self.min_lr <= self.lr, "`optimizer.min_lr` must be between 0 and `optimizer.lr`.")
        require(self.warmup_steps >= 0, "`optimizer.warmup_steps` must be >= 0.")
        require(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "AdamW betas must be in [0, 1).")
        require(self.clip_grad >= 0, "`optimizer.clip_grad` must be >= 0 (0 disables clipping).")
