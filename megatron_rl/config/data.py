"""Data section: parquet prompt sets and how they become rollout requests.

The schema of a training parquet file (see ``megatron_rl.data``): ``prompt`` (a string, or
a list of ``{role, content}`` messages), ``answer`` (the ground truth: a string or a list of
strings; for code, the tests as JSON), ``data_source`` (picks the grader, splits the
metrics) and an optional ``extra_info`` mapping. SFT files hold ``messages`` instead.
"""

from dataclasses import dataclass, field

from megatron_rl.config.base import require


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Parquet files of training prompts (RL) or chat transcripts (SFT)."""
    prompt_key: str = "prompt"
    """Column holding the prompt (a string, or a list of chat messages)."""
    answer_key: str = "answer"
    """Column holding the ground truth the reward checks against (or the tests, for code)."""
    messages_key: str = "messages"
    """SFT: column holding each transcript as a list of {role, content} messages."""
    apply_chat_template: bool = True
    """Render prompts through the tokenizer's chat template."""
    chat_template: str = ""
    """Template to use instead of the tokenizer's: a .jinja file path or `deepseek_r1_distill`;
    empty = the tokenizer's own, or DeepSeek-R1-Distill's when the tokenizer has none."""
    max_prompt_len: int = 1024
    """Prompts longer than this many tokens are dropped (and counted), never truncated."""
    shuffle: bool = True
    """Shuffle each epoch with the run seed (resumable: the order is a function of seed and epoch)."""

    def __post_init__(self) -> None:
        require(self.max_prompt_len > 0, "`data.max_prompt_len` must be > 0.")
        for key in ("prompt_key", "answer_key", "messages_key"):
            require(bool(getattr(self, key)), f"`data.{key}` must name a column.")
