"""Evaluation section: held-out sets scored with pass@k and avg@n."""

from dataclasses import dataclass, field

from megatron_rl.config.base import require


@dataclass
class EvalConfig:
    files: list[str] = field(default_factory=list)
    """Parquet files of evaluation problems (e.g. AIME24)."""
    every_steps: int = 0
    """Evaluate every this many steps; 0 disables periodic evaluation."""
    n_samples: int = 16
    """Samples per problem: avg@n averages them (DeepScaleR reports avg@16 as pass@1)."""
    pass_k: list[int] = field(default_factory=lambda: [1])
    """k values for the unbiased pass@k estimator; each must be <= n_samples."""
    temperature: float = 0.6
    """Sampling temperature at evaluation."""
    top_p: float = 1.0
    """Nucleus sampling at evaluation (1 = off; the R1-distill evaluations, DeepScaleR's included, use 0.95)."""
    max_new_tokens: int = 8192
    """Generation budget at evaluation."""
    at_start: bool = False
    """Also evaluate before the first step (the starting model's score); a run with eval files
    always evaluates after its last step."""

    def __post_init__(self) -> None:
        require(self.every_steps >= 0, "`eval.every_steps` must be >= 0.")
        require(0.0 < self.top_p <= 1.0, f"`eval.top_p` must be in (0, 1], got {self.top_p}.")
        require(all(1 <= k <= self.n_samples for k in self.pass_k),
                f"every `eval.pass_k` value must be in [1, eval.n_samples={self.n_samples}].")
