"""Train section: steps and batch sizes of the RL loop."""

from dataclasses import dataclass

from megatron_rl.config.base import require


@dataclass
class TrainConfig:
    num_steps: int = 1000
    """RL steps (one rollout batch each)."""
    prompts_per_step: int = 128
    """Prompts per rollout batch (each sampled n times; DeepScaleR: 128)."""
    mini_batch_prompts: int = 64
    """Prompts per optimizer update; prompts_per_step / this = updates per step (DeepScaleR: 64)."""
    micro_batch_size: int = 1
    """Sequences per forward/backward micro-batch on each rank."""
    max_tokens_per_microbatch: int = 0
    """Pack micro-batches by token budget instead of count when > 0."""

    def __post_init__(self) -> None:
        require(self.num_steps >= 0, "`train.num_steps` must be >= 0.")
        require(self.prompts_per_step >= 1 and self.mini_batch_prompts >= 1, "batch sizes must be >= 1.")
        require(self.prompts_per_step % self.mini_batch_prompts == 0,
                f"`train.prompts_per_step` ({self.prompts_per_step}) must be a multiple of "
                f"`train.mini_batch_prompts` ({self.mini_batch_prompts}).")
