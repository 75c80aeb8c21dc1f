"""Triton backend of linear_logprobs: logits tile by tile, never [N x V] in memory.

Forward, one program per (BLOCK_N tokens, vocabulary split): for each BLOCK_V tile of its
split it computes ``z = hidden @ weight.T * (1/T)`` in an fp32 accumulator (loop over H in
BLOCK_H steps), picks the label's logit and folds the tile into a running (max, sum-exp,
sum-exp*shift) triple. Splits give the GPU enough programs when N is small; their partials
(``[S, N]`` fp32 each, a few MB) are merged in torch with the same rescaling as the
tensor-parallel merge (``_softmax_stats``).

Backward, per vocabulary chunk: one kernel recomputes the chunk's logits tile by tile and
writes ``dlogits [N, chunk]`` (the only chunk-sized buffer), then two cuBLAS GEMMs give
``dhidden += dlogits @ weight_chunk`` (fp32 accumulator) and ``dweight_chunk = dlogits.T @
hidden``. Letting cuBLAS do the two gradient GEMMs keeps them deterministic (no atomics)
and at library speed; the recompute GEMM is the kernel's.

On CPU this module runs only under ``TRITON_INTERPRET=1`` (tests). The interpreter computes
bf16 arithmetic wrongly (PLATFORM_NOTES), so there tiles are upcast to fp32 right after the
load (UPCAST) and dlogits are kept in fp32; on GPU, 16-bit tiles feed tensor cores with fp32
accumulation and fp32 tiles use IEEE (not TF32) dot products, since TF32's 10-bit mantissa
would cost log-probs ~1e-3 of relative accuracy.

Block sizes on GPU are sensible defaults, not yet tuned on hardware.

Shape suffixes: N tokens, H hidden, V local vocabulary, S vocabulary splits, C a chunk of V.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._softmax_stats import NEG_BIG, SoftmaxStats, matmul_f32, merge_splits

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_NEG: tl.constexpr = tl.constexpr(NEG_BIG)


# Kernel signatures and calls stay compact (one group of pointers/sizes/strides per line):
# fmt: off
@triton.jit
def _logits_tile(
    hidden_ptr, weight_ptr, rows, cols, row_ok, col_ok, H, inv_temp,
    stride_hn, stride_hh, stride_wv, stride_wh,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """[BLOCK_N, BLOCK_V] scaled logits in fp32; invalid columns set to the finite -inf."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        h = tl.load(hidden_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hh,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # Loaded as [BLOCK_H, BLOCK_V], the transposed weight tile the dot wants; int64
        # offsets because V * H passes 2^31 for large models.
        w = tl.load(weight_ptr + cols[None, :].to(tl.int64) * stride_wv + ks[:, None] * stride_wh,
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc = tl.dot(h, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(h, w, acc)
    return tl.where(col_ok[None, :], acc * inv_temp, _NEG)


@triton.jit
def _forward_partials_kernel(
    hidden_ptr, weight_ptr, labels_ptr,
    max_ptr, sumexp_ptr, sumez_ptr, target_ptr,
    N, H, V, vocab_start, split_size, inv_temp,
    stride_hn, stride_hh, stride_wv, stride_wh,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    WITH_ENTROPY: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """One (token block, vocabulary split): its partial softmax state, [S, N] outputs."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # int64: N*H may pass 2^31
    row_ok = rows < N
    target_col = tl.load(labels_ptr + rows, mask=row_ok, other=-1).to(tl.int64) - vocab_start
    v_begin = pid_s * split_size
    v_end = tl.minimum(v_begin + split_size, V)

    m = tl.full((BLOCK_N,), _NEG, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    a = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = _logits_tile(hidden_ptr, weight_ptr, rows, cols, row_ok, col_ok, H, inv_temp,
                         stride_hn, stride_hh, stride_wv, stride_wh,
                         BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, IEEE)
        # The same fp32 value the max sees: log_prob = (t - m) - log S <= 0 exactly. col_ok
        # too: a masked column past the split's end may carry the id of a label that lies
        # in the next split or on another TP rank, and must not contribute its -1e30.
        is_target = (cols[None, :] == target_col[:, None]) & col_ok[None, :]
        t += tl.sum(tl.where(is_target, z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        shift = m - m_new  # <= 0; _NEG at first, so exp(shift) = 0 and shift * s = 0
        scale = tl.exp(shift)
        zs = z - m_new[:, None]
        e = tl.exp(zs)  # masked columns: exp(-1e30) = 0, and 0 * zs = 0
        if WITH_ENTROPY:
            a = scale * (a + shift * s) + tl.sum(e * zs, axis=1)
        s = scale * s + tl.sum(e, axis=1)
        m = m_new

    out = pid_s * N + rows
    tl.store(max_ptr + out, m, mask=row_ok)
    tl.store(sumexp_ptr + out, s, mask=row_ok)
    tl.store(sumez_ptr + out, a, mask=row_ok)
    tl.store(target_ptr + out, t, mask=row_ok)


@triton.jit
def _dlogits_kernel(
    hidden_ptr, weight_ptr, labels_ptr, lse_ptr, mu_ptr, glp_ptr, gent_ptr, dlogits_ptr,
    N, H, chunk_len, inv_temp,
    stride_hn, stride_hh, stride_wv, stride_wh, stride_dn,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """dL/d(hidden @ weight.T) for one vocabulary chunk (weight_ptr points at its first row)."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column inside the chunk
    col_ok = cols < chunk_len
    z = _logits_tile(hidden_ptr, weight_ptr, rows, cols, row_ok, col_ok, H, inv_temp,
                     stride_hn, stride_hh, stride_wv, stride_wh,
                     BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, IEEE)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    mu = tl.load(mu_ptr + rows, mask=row_ok, other=0.0)
    glp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    gent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
    target_col = tl.load(labels_ptr + rows, mask=row_ok, other=-1)  # shifted to the chunk
    p = tl.exp(z - lse[:, None])
    d = p * (gent[:, None] * (mu[:, None] - z) - glp[:, None])
    d += tl.where(cols[None, :] == target_col[:, None], glp[:, None], 0.0)  # col_ok: at store
    d = d * inv_temp
    tl.store(dlogits_ptr + rows[:, None] * stride_dn + cols[None, :],
             d.to(dlogits_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# fmt: on
def _blocks(dtype: torch.dtype) -> dict[str, int]:
    if INTERPRET:  # few, large programs: the interpreter's cost is per program and per op
        return dict(BLOCK_N=16, BLOCK_V=64, BLOCK_H=32)
    if dtype == torch.float32:
        return dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=32, num_warps=4, num_stages=3)
    return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3)


def _flags(dtype: torch.dtype) -> dict[str, bool]:
    upcast = INTERPRET and dtype != torch.float32
    return dict(UPCAST=upcast, IEEE=INTERPRET or dtype == torch.float32)


def _split_size(n_tokens: int, vocab: int, device: torch.device, block_n: int, block_v: int) -> int:
    """Vocabulary per program: enough splits for ~4 waves of programs on the GPU."""
    n_tiles = triton.cdiv(vocab, block_v)
    if INTERPRET or device.type != "cuda":
        return block_v * 4  # several splits even on toy shapes, so tests cover the merge
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    token_blocks = max(1, triton.cdiv(n_tokens, block_n))  # 0 tokens: one (empty) block, not a division by 0
    splits = max(1, min(n_tiles, triton.cdiv(4 * sms, token_blocks)))
    return max(1, triton.cdiv(n_tiles, splits)) * block_v  # an all-padding TP shard has 0 tiles


def _dlogits_chunk(hidden: int, vocab: int) -> int:
    """Vocabulary per backward chunk: dlogits [N, C] is ~4x the hidden states' size."""
    return max(1, min(vocab, max(1024, triton.cdiv(4 * hidden, 256) * 256)))


@dataclass(frozen=True)
class TritonEngine:
    """The Triton backend as the shared autograd Function calls it.

    ``split_size`` / ``vocab_chunk``: override the heuristics (tests use small ones).
    """

    split_size: int | None = None
    vocab_chunk: int | None = None

    def forward_stats(
        self, hidden_NH, weight_VH, labels_N, inv_temp, vocab_start, with_entropy
    ) -> SoftmaxStats:
        n_tokens, hidden = hidden_NH.shape
        vocab = weight_VH.shape[0]
        blocks = _blocks(hidden_NH.dtype)
        split = self.split_size or _split_size(
            n_tokens, vocab, hidden_NH.device, blocks["BLOCK_N"], blocks["BLOCK_V"]
        )
        n_splits = max(1, triton.cdiv(vocab, split))  # >= 1: a shard may be all padding
        partial_4SN = torch.empty(4, n_splits, n_tokens, device=hidden_NH.device)
        if n_tokens:
            grid = (triton.cdiv(n_tokens, blocks["BLOCK_N"]), n_splits)
            # fmt: off
            _forward_partials_kernel[grid](
                hidden_NH, weight_VH, labels_N.contiguous(), *partial_4SN,
                n_tokens, hidden, vocab, vocab_start, split, inv_temp,
                *hidden_NH.stride(), *weight_VH.stride(),
                WITH_ENTROPY=with_entropy, **_flags(hidden_NH.dtype), **blocks,
            )
            # fmt: on
        return merge_splits(*partial_4SN)

    def backward_grads(
        self, saved, g_logprob_N, g_entropy_N, inv_temp, vocab_start, need_dh, need_dw
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        hidden_NH, weight_VH, labels_N, lse_N, mu_N = saved
        n_tokens, hidden = hidden_NH.shape
        vocab = weight_VH.shape[0]
        zeros_N = torch.zeros_like(lse_N)
        g_logprob_N = zeros_N if g_logprob_N is None else g_logprob_N.float().contiguous()
        g_entropy_N = zeros_N if g_entropy_N is None else g_entropy_N.float().contiguous()
        # GPU: dlogits in the input dtype, so the two gradient GEMMs run on tensor cores
        # (as eager Megatron's do); interpreter/CPU: fp32 (bf16 stores are wrong there).
        d_dtype = hidden_NH.dtype if hidden_NH.is_cuda else torch.float32
        dhidden32_NH = torch.zeros(n_tokens, hidden, device=hidden_NH.device) if need_dh else None
        dweight_VH = torch.empty_like(weight_VH) if need_dw else None
        chunk = self.vocab_chunk or _dlogits_chunk(hidden, vocab)
        blocks = _blocks(hidden_NH.dtype)
        block_n, block_v = blocks["BLOCK_N"], blocks["BLOCK_V"]
        dlogits_buf = torch.empty(n_tokens, chunk, dtype=d_dtype, device=hidden_NH.device)
        hidden_d_NH = hidden_NH.to(d_dtype)  # no copy on GPU; fp32 once for the interpreter
        for c0 in range(0, vocab, chunk):
            c1 = min(c0 + chunk, vocab)
            dlogits_NC = dlogits_buf[:, : c1 - c0]
            if n_tokens:
                grid = (triton.cdiv(n_tokens, block_n), triton.cdiv(c1 - c0, block_v))
                # The sliced weight's pointer carries the chunk offset (64-bit, in torch).
                # fmt: off
                _dlogits_kernel[grid](
                    hidden_NH, weight_VH[c0:c1], labels_N - (vocab_start + c0), lse_N, mu_N,
                    g_logprob_N, g_entropy_N, dlogits_NC,
                    n_tokens, hidden, c1 - c0, inv_temp,
                    *hidden_NH.stride(), *weight_VH.stride(), dlogits_NC.stride(0),
                    **_flags(hidden_NH.dtype), **blocks,
                )
                # fmt: on
            if dhidden32_NH is not None:  # summed over chunks: keep the sum in fp32
                dhidden32_NH += matmul_f32(dlogits_NC, weight_VH[c0:c1].to(d_dtype))
            if dweight_VH is not None:  # one GEMM per chunk: rounded once, like eager
                dweight_VH[c0:c1] = dlogits_NC.T @ hidden_d_NH
        return dhidden32_NH, dweight_VH
