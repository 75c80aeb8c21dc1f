"""Data section: parquet prompt sets and how they become rollout requests."""

from dataclasses import dataclass, field

from megatron_rl.config.base import require


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Parquet files of training prompts."""
    prompt_key: str = "prompt"
    """Column holding the prompt (a string, or a list of chat messages)."""
    answer_key: str = "answer"
    """Column holding the ground truth the reward checks against (or the tests, for code)."""
    apply_chat_template: bool = True
    """Render prompts through the tokenizer's chat template."""
    max_prompt_len: int = 1024
    """Prompts longer than this many tokens are dropped (and counted), never truncated."""
    shuffle: bool = True
    """Shuffle each epoch with the run seed (resumable: the order is a function of seed and epoch)."""

    def __post_init__(self) -> None:
        require(self.max_prompt_len > 0, "`data.max_prompt_len` must be > 0.")
