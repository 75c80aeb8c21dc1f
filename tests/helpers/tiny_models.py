"""Random tiny Hugging Face models (Qwen2, Llama, Qwen3) saved to disk, for exactness tests."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILY_CLASSES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def tiny_hf_config(family: str, *, vocab: int = 1031, tie: bool = False, layers: int = 4,
                   hidden: int = 64, heads: int = 4, kv_heads: int = 2, ffn: int = 96):
    import transformers

    cfg_cls = getattr(transformers, FAMILY_CLASSES[family][0])
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
              tie_word_embeddings=tie, rms_norm_eps=1e-6, torch_dtype="float32")
    if family == "qwen3":
        kw["head_dim"] = hidden // heads
    if family == "llama":
        kw["attention_bias"] = False
    cfg = cfg_cls(**kw)
    cfg.architectures = [FAMILY_CLASSES[family][1]]
    return cfg


def make_tiny_hf(path: str | Path, family: str = "qwen2", *, seed: int = 0, **kw):
    """Build a random tiny model, perturb norms/biases (so mapping errors show), save it."""
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_hf_config(family, **kw)
    model = getattr(transformers, FAMILY_CLASSES[family][1])(cfg).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))  # non-trivial: ones/zeros hide swaps
    model.save_pretrained(str(path))
    return model
