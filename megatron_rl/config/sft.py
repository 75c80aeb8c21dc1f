"""SFT section: supervised fine-tuning on chat transcripts (``megatron-rl sft``).

The rest of an SFT run is configured by the same sections as RL: ``model``, ``parallel``,
``optimizer``, ``train.num_steps`` / ``max_tokens_per_microbatch`` / ``micro_batch_size``,
``data.train_files`` (parquet with a ``data.messages_key`` column), ``checkpoint`` and
``logging``.
"""

from dataclasses import dataclass

from megatron_rl.config.base import require


@dataclass
class SFTConfig:
    batch_size: int = 32
    """Transcripts per optimizer step (over all data-parallel ranks)."""
    max_len: int = 4096
    """Transcripts longer than this many tokens are dropped (and counted), never truncated."""

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "`sft.batch_size` must be >= 1.")
        require(self.max_len >= 2, "`sft.max_len` must be >= 2.")
