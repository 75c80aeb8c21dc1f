"""A character-level chat tokenizer and a random tiny Qwen2, built from nothing (no downloads).

The tokenizer maps every character to one token, except the special tokens and ``\\boxed{``,
which is one (non-special) token: the demo's answers are ``\\boxed{N}``, and a 7-token
prefix would make every sampled response twice as long to decode on CPU. Decoding joins
tokens with nothing between them, so ``decode(encode(s)) == s`` for any text in the vocab.

The chat template is Qwen2's, minus the default system prompt (every character is a token):
``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, then ``<|im_start|>assistant\\n``
as the generation prompt. The end of an answer is ``<|im_end|>`` (eos); padding is
``<|endoftext|>``.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOXED_TOKEN = "\\boxed{"
CHARS = (string.digits + string.ascii_letters + " \n" + "+-*/=()[]{}\\.,:;?!'\"<>_^%$#&|~")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Chosen for the demo on a 2-core CPU (see build_model); heads and KV heads split at TP=2.
DEFAULT_DIMS: dict[str, int] = dict(hidden=128, layers=4, heads=4, kv_heads=2, ffn=512,
                                    max_positions=64)


def build_tokenizer(out_dir: str | Path) -> Any:
    """Build the character-level tokenizer, save it to ``out_dir`` (tokenizer.json +
    tokenizer_config.json) and return it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    # BPE without merges and without a pre-tokenizer = one token per character.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(BOXED_TOKEN, special=False, normalized=False)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", model_max_length=DEFAULT_DIMS["max_positions"])
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"  # generation batches; training code pads its own way
    # The template goes into tokenizer_config.json (not chat_template.jinja): older loaders
    # and serving engines read it from there.
    fast.save_pretrained(str(out_dir), save_jinja_files=False)
    return fast


def build_model(out_dir: str | Path, tokenizer: Any, seed: int = 0, *, hidden: int = 128,
                layers: int = 4, heads: int = 4, kv_heads: int = 2, ffn: int = 512,
                max_positions: int = 64, vocab_multiple: int = 64) -> Any:
    """Save a random-init fp32 ``Qwen2ForCausalLM`` (safetensors + generation_config with
    eos = ``<|im_end|>``) to ``out_dir`` and return it.

    The vocabulary is padded to a multiple of ``vocab_multiple`` (also divisible by TP=2).
    Defaults: ~0.9M parameters; one decode step of 64 sequences takes a few ms on one core.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if heads % 2 or kv_heads % 2 or heads % kv_heads or hidden % heads:
        raise ValueError(f"need even heads/kv_heads dividing each other and hidden, got "
                         f"hidden={hidden} heads={heads} kv_heads={kv_heads}")
    vocab = -(-len(tokenizer) // vocab_multiple) * vocab_multiple
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    cfg = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=False, rms_norm_eps=1e-6,
        rope_theta=10000.0, bos_token_id=pad, eos_token_id=eos, pad_token_id=pad,
        torch_dtype="float32")
    cfg.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad,
                                               bos_token_id=pad)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return model
