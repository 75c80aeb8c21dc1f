"""Batch-invariant decode steps for deterministic mode: many seeded rows in one forward.

Deterministic mode promises that a seeded request's tokens and log-probs do not depend on
what else is batched. A plain batched forward breaks that in two places, both measured on
this CPU (fp32, one thread):

- **linear layers**: MKL computes one row (a matrix-vector product) differently from several;
  from 2 rows up, each output row is bitwise the same whatever the other rows are, *if the
  weights are stored column-major* (the engine's default ``layout``; row-major weights are
  only invariant from 16 rows up). So a lone row is padded to 2 (``pad_single_rows``);
- **attention over a left-padded cache**: the kernel's blocks over the key columns move with
  the padding, so the softmax sums round differently. ``rowwise_attention`` runs each row
  over exactly its own columns, with no mask, as if it were alone.

Everything else in a Qwen2/Llama decoder step (RMSNorm over the hidden size, RoPE from
explicit positions, the gated MLP's elementwise ops, log-softmax over the vocabulary) is
computed row by row already. Prefill is unchanged (each seeded prompt is still prefilled on
its own, in fixed chunks). ``tests/rollout/test_engine_determinism.py`` holds the proof: a
request's output alone equals its output in every batch tried, bit for bit.

The attention function is registered with transformers' ``AttentionInterface`` under
``NAME`` (its mask function is SDPA's); outside a ``rows_of`` block it is plain SDPA.

Legend: B = rows, H = query heads, Hkv = key/value heads, T = cache width, D = head dim.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

NAME = "megatron_rl_rowwise_sdpa"
_state = threading.local()
_registered = False


def register() -> str:
    """Register the attention implementation once per process; returns its name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

        AttentionInterface.register(NAME, rowwise_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
        _registered = True
    return NAME


@contextlib.contextmanager
def rows_of(lengths_B: list[int]) -> Iterator[None]:
    """Within this block (this thread), attention runs row by row over each row's last ``lengths_B[b]`` columns."""
    _state.lengths = lengths_B
    try:
        yield
    finally:
        _state.lengths = None


def rowwise_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [B, H, q, D], key/value [B, Hkv, T, D] -> ([B, q, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = getattr(_state, "lengths", None)
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if query.shape[2] != 1 or len(lengths) != query.shape[0]:
        raise RuntimeError(f"rowwise attention is for decode steps of {len(lengths)} rows, got query "
                           f"{tuple(query.shape)}")
    width = key.shape[2]
    gqa = key.shape[1] != query.shape[1]
    outs = []
    for b, n in enumerate(lengths):
        # The row's real columns are the rightmost n (the cache is left-padded); contiguous
        # copies so the kernel sees the same memory layout as for the row alone.
        k = key[b:b + 1, :, width - n:].contiguous()
        v = value[b:b + 1, :, width - n:].contiguous()
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            query[b:b + 1], k, v, scale=scaling, enable_gqa=gqa))
    return torch.cat(outs).transpose(1, 2).contiguous(), None


def pad_single_rows(model: torch.nn.Module) -> None:
    """Make every ``nn.Linear`` of ``model`` compute a lone row as the first of two (see module doc)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and getattr(module.forward, "__func__", None) is not _padded_forward:
            module.forward = _padded_forward.__get__(module)  # type: ignore[method-assign]


def _padded_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.numel() != x.shape[-1]:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    row = x.reshape(1, -1)
    return torch.nn.functional.linear(torch.cat([row, row]), self.weight, self.bias)[:1].reshape(
        *x.shape[:-1], -1)
