"""Reward section: which grader scores samples and its resource limits."""

from dataclasses import dataclass
from typing import Literal

from megatron_rl.config.base import require


@dataclass
class RewardConfig:
    kind: Literal["math", "code"] = "math"
    """Grader: math answer checking (DeepScaleR) or code run against tests (DeepCoder)."""
    num_workers: int = 2
    """Grader worker processes."""
    timeout_s: float = 10.0
    """Per-response wall-clock limit of the math grader; a timeout scores 0."""
    code_test_timeout_s: float = 6.0
    """Per-test wall-clock limit for code (LiveCodeBench uses 6 s)."""

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "`reward.num_workers` must be >= 1.")
        require(self.timeout_s > 0 and self.code_test_timeout_s > 0, "reward timeouts must be > 0.")
