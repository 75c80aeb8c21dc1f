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
    require_think_close: bool = False
    """Thinking models (the R1-Distill template opens `<think>` in the prompt): a response without
    `</think>` is unfinished reasoning and scores 0, as DeepScaleR graded."""
    length_finished_score: float | None = None
    """Score of a sample cut by `rollout.max_new_tokens` (finish reason `length`) instead of its
    grade; None grades it like any other (DeepScaleR: 0)."""
    max_failed_share: float = 0.25
    """A sample whose grader crashed or timed out (not the candidate's fault) is masked out of the
    loss and counted; when more than this share of a step's samples fail so, the grader or its
    sandbox is broken and the run stops with an error (1 = never stop)."""

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "`reward.num_workers` must be >= 1.")
        require(self.timeout_s > 0 and self.code_test_timeout_s > 0, "reward timeouts must be > 0.")
        require(0.0 <= self.max_failed_share <= 1.0, "`reward.max_failed_share` must be in [0, 1].")
