"""Model section: which Hugging Face checkpoint the actor is built from, and how."""

from dataclasses import dataclass
from typing import Literal

from megatron_rl.config.base import require


@dataclass
class ModelConfig:
    path: str = ""
    """Hugging Face model directory (config.json + safetensors) or a megatron-rl checkpoint."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Parameter and activation dtype of the actor; float32 on CPU runs and exactness tests."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer specs: Transformer Engine when it is installed and CUDA is present (auto), else local."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation, to fit long contexts (full = recompute every layer)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this times TP (Megatron convention)."""
    attention_backend: Literal["auto", "local"] = "auto"
    """Core attention: auto picks flash/fused on GPU and the local torch path on CPU."""

    def __post_init__(self) -> None:
        require(self.make_vocab_size_divisible_by >= 1,
                "`model.make_vocab_size_divisible_by` must be >= 1.")
