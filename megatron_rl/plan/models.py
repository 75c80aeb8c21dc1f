"""Model dimensions: from the recipe's Hugging Face ``config.json`` when it is on disk, else
from a table of public architectures (the recipes in ``configs/`` name checkpoints that are
usually not downloaded where a cluster is planned)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_rl.errors import ConfigError


@dataclass(frozen=True)
class ModelDims:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    """SwiGLU intermediate size (gate and up projections each hidden x ffn)."""
    vocab: int
    tied_embeddings: bool = False
    head_dim: int = 0
    """0 = hidden // heads (Qwen3 sets it explicitly)."""

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer: QKV (+ biases, as Qwen2), output projection,
        SwiGLU MLP (3 matrices) and two RMSNorm weights."""
        q, kv = self.heads * self.hd, self.kv_heads * self.hd
        attn = self.hidden * (q + 2 * kv) + (q + 2 * kv) + q * self.hidden
        return attn + 3 * self.hidden * self.ffn + 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        """Input embedding plus the output layer (once when tied)."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embedding_params + self.hidden


# Public dimensions from each model card's config.json, written out as our own table.
# Keys are matched (lower case) against the model path's last component.
KNOWN_MODELS: dict[str, ModelDims] = {
    "qwen2-1.5b": ModelDims(1536, 28, 12, 2, 8960, 151936, tied_embeddings=True),
    "qwen2.5-1.5b": ModelDims(1536, 28, 12, 2, 8960, 151936, tied_embeddings=True),
    "deepseek-r1-distill-qwen-1.5b": ModelDims(1536, 28, 12, 2, 8960, 151936),
    "qwen2.5-7b": ModelDims(3584, 28, 28, 4, 18944, 152064),
    "deepseek-r1-distill-qwen-7b": ModelDims(3584, 28, 28, 4, 18944, 152064),
    "qwen2.5-14b": ModelDims(5120, 48, 40, 8, 13824, 152064),
    "deepseek-r1-distill-qwen-14b": ModelDims(5120, 48, 40, 8, 13824, 152064),
    "deepcoder-14b-preview": ModelDims(5120, 48, 40, 8, 13824, 152064),
    "qwen2.5-32b": ModelDims(5120, 64, 40, 8, 27648, 152064),
    "deepseek-r1-distill-qwen-32b": ModelDims(5120, 64, 40, 8, 27648, 152064),
    "qwen3-8b": ModelDims(4096, 36, 32, 8, 12288, 151936, head_dim=128),
    "qwen3-14b": ModelDims(5120, 40, 40, 8, 17408, 151936, head_dim=128),
    "qwen3-32b": ModelDims(5120, 64, 64, 8, 25600, 151936, head_dim=128),
    "llama-3-8b": ModelDims(4096, 32, 32, 8, 14336, 128256),
    "meta-llama-3-8b": ModelDims(4096, 32, 32, 8, 14336, 128256),
}


def dims_from_hf_config(cfg: dict) -> ModelDims:
    """Dimensions from a Hugging Face ``config.json`` dict (Qwen2/Qwen3/Llama field names)."""
    try:
        return ModelDims(
            hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"],
            kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            ffn=cfg["intermediate_size"], vocab=cfg["vocab_size"],
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)), head_dim=cfg.get("head_dim") or 0)
    except KeyError as e:
        raise ConfigError(f"the model's config.json has no {e.args[0]!r}: the planner reads "
                          "hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, vocab_size.") from e


def resolve_dims(model_path: str, model_name: str | None = None) -> tuple[ModelDims, str]:
    """(dims, where they came from). ``model_name`` (a table key) wins over the path."""
    if model_name:
        key = model_name.lower()
        if key not in KNOWN_MODELS:
            raise ConfigError(f"unknown model {model_name!r}; known: {', '.join(sorted(KNOWN_MODELS))}.")
        return KNOWN_MODELS[key], f"table ({key})"
    path = Path(model_path)
    cfg_file = path / "config.json" if path.is_dir() else path
    if cfg_file.name == "config.json" and cfg_file.is_file():
        return dims_from_hf_config(json.loads(cfg_file.read_text())), str(cfg_file)
    key = path.name.lower()
    if key in KNOWN_MODELS:
        return KNOWN_MODELS[key], f"table ({key})"
    raise ConfigError(
        f"cannot size model.path={model_path!r}: no config.json there and its name is not in the "
        f"planner's table ({', '.join(sorted(KNOWN_MODELS))}); download its config.json or pass --model NAME.")
