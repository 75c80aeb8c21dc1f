"""The embedded engine's weight layout: linear weights stored transposed for fast decoding.

A linear layer computes ``x @ W.T`` with ``W`` of shape ``[out, in]``. Stored as Hugging Face
writes it (row-major ``[out, in]``), a decode step's few rows hit the BLAS's slow small-M path:
on this project's 2-core Xeon with one thread, 8.5-10 GB/s of weights read for 8-32 rows.
The same values stored column-major (memory ``[in, out]``, seen as ``[out, in]`` through
``.t()``) read at 16-23 GB/s, and an 8-row decode forward of a 40.5M-parameter Qwen2 went
from 34.5 to 24.3 ms (``benchmarks/bench_engine_batching.py`` measures the engine as a whole).
One row (a matrix-vector product) is as fast either way.

The module's ``weight`` keeps its logical shape ``[out, in]``, so the model's code, the
parameter names and every reader see the same values; only the memory order changes. The
price is paid at weight loads: a transposing copy instead of a straight one
(``copy_into``: block by block, the transpose in the wire dtype, then the cast).
Tied input/output embeddings are one tensor: transposed with the LM head (the largest matrix
of a small model), the embedding lookup reads strided rows, a few per decode step.
"""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""What ``serve --dtype`` takes: fp32 (log-probs closest to an fp32 actor's) or bf16 (half the
weight bytes per decode step, and weight loads that are plain copies of bf16 wire bytes)."""


def wants_transposed(layout: str, dtype: torch.dtype, deterministic: bool) -> bool:
    """Whether linear weights are stored column-major, for ``serve --weight-layout``.

    ``auto``: column-major for fp32 (decode 1.4-1.5x faster at 8-32 rows) and for deterministic
    mode (its batch-invariant batched decode needs it); row-major for bf16 otherwise, which
    decodes as fast either way here (one 8-row step of the 494M model: 248 ms row-major,
    262 ms column-major, fp32 column-major 345 ms) and then loads weights with plain copies."""
    if layout not in ("auto", "transposed", "hf"):
        raise ValueError(f"weight layout {layout!r}: use auto, transposed or hf")
    if layout == "auto":
        return dtype == torch.float32 or deterministic
    return layout == "transposed"


def is_transposed(t: torch.Tensor) -> bool:
    """A 2-D tensor whose memory is its transpose's, row-major (the decode layout)."""
    return t.dim() == 2 and t.shape[0] > 1 and t.shape[1] > 1 and t.stride() == (1, t.shape[0])


def to_decode_layout(model: torch.nn.Module) -> list[str]:
    """Store every ``nn.Linear`` weight of ``model`` column-major, in place; returns their module names.

    Parameters keep their identity (tied weights stay tied); only ``.data`` is replaced."""
    done: list[str] = []
    seen: set[int] = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            weight = module.weight
            if id(weight) not in seen and not is_transposed(weight.data):
                weight.data = weight.data.t().contiguous().t()
            seen.add(id(weight))
            done.append(name)
    return done


class TransposingCopier:
    """Copies wire tensors into engine weights of either layout; keeps one small scratch buffer."""

    BLOCK_ROWS = 256
    """Source rows transposed at a time: the block stays in cache between its two passes."""
    SAME_DTYPE_BLOCK_ROWS = 128
    """Source rows per block when no cast is needed (measured best of 16-1024 for bf16)."""

    def __init__(self) -> None:
        self._scratch: torch.Tensor | None = None

    def copy_into(self, target: torch.Tensor, src: torch.Tensor) -> None:
        """``target.copy_(src)`` (values cast to ``target``'s dtype), fast for transposed targets.

        A straight ``copy_`` into a transposed target walks one side with a stride, element by
        element (1.2 GB/s of bf16 measured). Here blocks of ``BLOCK_ROWS`` source rows are
        transposed in the source dtype (torch's blocked 2-D transpose) into a scratch buffer,
        then cast into the target's rows (contiguous runs): 1.5 GB/s on Qwen2-0.5B's 136M-element
        embedding, 0.84 GB/s when the whole tensor was transposed first (2.0-2.4 GB/s either way
        for its 4.4M-element MLP matrices)."""
        if not is_transposed(target) or src.dim() != 2:
            target.copy_(src)
            return
        storage = target.t()  # contiguous [in, out]
        rows, cols = src.shape
        if src.dtype == target.dtype:  # no cast: blocks written straight (2.4 GB/s of bf16, 1.0 whole)
            for start in range(0, rows, self.SAME_DTYPE_BLOCK_ROWS):
                end = min(rows, start + self.SAME_DTYPE_BLOCK_ROWS)
                storage[:, start:end].copy_(src[start:end].t())
            return
        block = min(rows, self.BLOCK_ROWS)
        if self._scratch is None or self._scratch.dtype != src.dtype or self._scratch.numel() < cols * block:
            self._scratch = torch.empty(cols * block, dtype=src.dtype)
        for start in range(0, rows, block):
            end = min(rows, start + block)
            tmp = self._scratch[:cols * (end - start)].view(cols, end - start)
            tmp.copy_(src[start:end].t())
            storage[:, start:end].copy_(tmp)
