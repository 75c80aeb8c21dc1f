"""Train section: steps and batch sizes of the RL loop."""

from dataclasses import dataclass

from megatron_rl.config.base import require


@dataclass
class TrainConfig:
    num_steps: int = 1000
    """The global step at which the run ends (one rollout batch per step). A stage that starts
    from step 1040 of the previous one with num_steps 1520 trains 480 steps."""
    prompts_per_step: int = 128
    """Prompts per rollout batch (each sampled n times; DeepScaleR: 128)."""
    mini_batch_prompts: int = 64
    """Prompts per optimizer update; prompts_per_step / this = updates per step (DeepScaleR: 64)."""
    micro_batch_size: int = 1
    """Sequences per forward/backward micro-batch on each rank."""
    max_tokens_per_microbatch: int = 0
    """Pack micro-batches by token budget instead of count when > 0: each micro-batch holds
    sequences of similar length (sorted) whose padded size rows x longest stays within it."""
    mismatch_threshold: float = -1.0
    """Mismatch gate: on the first step after every weight sync, a mean |trainer - rollout|
    log-prob over the response tokens above this stops the run. < 0 = the default for the
    dtype (fp32: 1e-4; bf16/fp16: 0.05); 0 disables it."""

    def __post_init__(self) -> None:
        require(self.num_steps >= 0, "`train.num_steps` must be >= 0.")
        require(self.max_tokens_per_microbatch >= 0, "`train.max_tokens_per_microbatch` must be >= 0 (0 = by count).")
        require(self.prompts_per_step >= 1 and self.mini_batch_prompts >= 1, "batch sizes must be >= 1.")
        require(self.prompts_per_step % self.mini_batch_prompts == 0,
                f"`train.prompts_per_step` ({self.prompts_per_step}) must be a multiple of "
                f"`train.mini_batch_prompts` ({self.mini_batch_prompts}).")
