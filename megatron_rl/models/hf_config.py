"""Read a Hugging Face ``config.json`` into the few dimensions the actor needs.

Supported families: Qwen2 (DeepSeek-R1-Distill-Qwen-1.5B/7B/14B/32B are Qwen2), Llama
(and Mistral without sliding windows), Qwen3 (per-head q/k RMSNorm, no QKV bias).
Anything else is refused with the list of supported architectures, before torch work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_rl.errors import ConfigError

FAMILIES = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(frozen=True)
class ModelDims:
    """Architecture of a decoder-only model, family-independent."""

    family: str
    """qwen2 | llama | qwen3: selects the weight-name table."""
    architecture: str
    """The HF class name, written back on export."""
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    """The tokenizer-facing vocabulary (HF `vocab_size`); Megatron pads beyond it."""
    max_position_embeddings: int
    rope_theta: float
    rms_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    rope_scaling_factor: float | None = None
    """Llama-3.1-style `rope_scaling` factor, None when unscaled."""


def _rope_theta(cfg: dict[str, Any]) -> float:
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    params = cfg.get("rope_parameters") or {}  # transformers >= 5 nests it
    return float(params.get("rope_theta", 10000.0))


def _rope_scaling(cfg: dict[str, Any], path: str) -> float | None:
    scaling = cfg.get("rope_scaling") or {}
    params = cfg.get("rope_parameters") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or params.get("rope_type") or "default"
    if kind == "default":
        return None
    if kind == "llama3":
        return float(scaling.get("factor", params.get("factor", 8.0)))
    raise ConfigError(
        f"`{path}` uses rope_scaling type `{kind}`, which the Megatron actor does not implement "
        "(supported: none, llama3). Use a model without it or add the scaling to models/builder.py."
    )


def dims_from_dict(cfg: dict[str, Any], path: str = "config.json") -> ModelDims:
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in FAMILIES), None)
    if arch is None:
        raise ConfigError(
            f"`{path}` declares architectures {archs or '(none)'}; megatron-rl builds "
            f"{', '.join(sorted(FAMILIES))}. Convert or pick a supported model."
        )
    if cfg.get("sliding_window") and cfg.get("use_sliding_window"):
        raise ConfigError(f"`{path}` enables sliding-window attention, which the actor does not implement.")
    family = FAMILIES[arch]
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    return ModelDims(
        family=family,
        architecture=arch,
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        ffn_hidden_size=int(cfg["intermediate_size"]),
        vocab_size=int(cfg["vocab_size"]),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        rope_theta=_rope_theta(cfg),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
        qk_norm=family == "qwen3",
        rope_scaling_factor=_rope_scaling(cfg, path),
    )


def read_dims(model_dir: str | Path) -> ModelDims:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"No `config.json` in `{model_dir}`: `--model`/`model.path` must be a Hugging Face "
            "model directory (or a megatron-rl checkpoint holding one)."
        )
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"`{path}` is not valid JSON ({e}).") from None
    try:
        return dims_from_dict(cfg, str(path))
    except KeyError as e:
        raise ConfigError(f"`{path}` lacks the field {e}, which a decoder config must have.") from None
