"""Per-token softmax statistics shared by every linear_logprobs backend.

Both backends reduce one row of scaled logits ``z = hidden @ weight.T / temperature`` to
four fp32 numbers per token, so the ``[tokens x vocab]`` logits never exist at once:

    max_N     m = max_j z_j                        (running; finite sentinel NEG_BIG at start)
    sumexp_N  S = sum_j exp(z_j - m)               (>= 1: the arg-max term is exp(0) = 1)
    sumez_N   A = sum_j exp(z_j - m) * (z_j - m)   (<= 0: every term is <= 0)
    target_N  t = z_label                          (0 on a shard/split not holding the label)

and finish with ``log_prob = (t - m) - log S`` and ``entropy = log S - A / S``. Written this
way both outputs have the right sign by construction, not by luck of rounding: ``t <= m``
holds exactly because ``t`` is the same fp32 value the max saw, ``log S >= 0`` because
``S >= 1``, and ``-A / S >= 0``. (verl issue 2656: a fused kernel that produced positive
log-probs collapsed training; a clamp would hide such a bug, so there is none.)

Partials over vocabulary splits (the Triton kernel) and over tensor-parallel shards are
merged with the same rescaling, ``c = exp(m_part - m)``:

    S = sum c * S_part,   A = sum c * (A_part + (m_part - m) * S_part),   t = sum t_part

Backward needs two numbers per token: ``lse = m + log S`` and ``mu = sum_j p_j z_j = m + A/S``.
With ``p_j = exp(z_j - lse)``, the gradient of the scaled logits is

    dL/dz_j = g_lp * ([j == label] - p_j) + g_ent * p_j * (mu - z_j)

(d entropy / d z_j = p_j (mu - z_j)); multiply by 1/temperature for the raw product.

Shape suffixes: N tokens, S vocabulary splits (partials), H hidden, V vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

# A finite "minus infinity": with -inf, the first merge computes (-inf) * 0 = nan.
NEG_BIG = -1.0e30


class SoftmaxStats(NamedTuple):
    """The O(N) state of one row-wise streaming softmax (see the module docstring)."""

    max_N: torch.Tensor
    sumexp_N: torch.Tensor
    sumez_N: torch.Tensor
    target_N: torch.Tensor


def empty_stats(n: int, device: torch.device) -> SoftmaxStats:
    """The state before any logit has been seen."""
    f32 = dict(dtype=torch.float32, device=device)
    return SoftmaxStats(
        torch.full((n,), NEG_BIG, **f32),
        torch.zeros(n, **f32),
        torch.zeros(n, **f32),
        torch.zeros(n, **f32),
    )


def merge_splits(
    max_SN: torch.Tensor, sumexp_SN: torch.Tensor, sumez_SN: torch.Tensor, target_SN: torch.Tensor
) -> SoftmaxStats:
    """Merge per-split partials (dim 0) into one state per token."""
    max_N = max_SN.amax(dim=0)
    sumexp_SN, sumez_SN = _rescale(max_SN, sumexp_SN, sumez_SN, max_N)
    return SoftmaxStats(max_N, sumexp_SN.sum(dim=0), sumez_SN.sum(dim=0), target_SN.sum(dim=0))


def all_reduce_stats(stats: SoftmaxStats, group: dist.ProcessGroup | None) -> SoftmaxStats:
    """Merge the states of the vocabulary shards of ``group``: one MAX, then one SUM.

    Every rank must call this with the same N (it is a collective).
    """
    if group is None or dist.get_world_size(group) == 1:
        return stats
    max_N = stats.max_N.clone()
    dist.all_reduce(max_N, op=dist.ReduceOp.MAX, group=group)
    sumexp_N, sumez_N = _rescale(stats.max_N, stats.sumexp_N, stats.sumez_N, max_N)
    # One SUM for all three vectors: one collective's latency instead of three.
    packed_3N = torch.stack([sumexp_N, sumez_N, stats.target_N])
    dist.all_reduce(packed_3N, op=dist.ReduceOp.SUM, group=group)
    return SoftmaxStats(max_N, packed_3N[0], packed_3N[1], packed_3N[2])


def _rescale(
    part_max: torch.Tensor, sumexp: torch.Tensor, sumez: torch.Tensor, new_max: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-express (S, A) taken relative to ``part_max`` relative to ``new_max >= part_max``."""
    shift = part_max - new_max  # <= 0
    scale = torch.exp(shift)
    return scale * sumexp, scale * (sumez + shift * sumexp)


class Finished(NamedTuple):
    """Outputs and the O(N) residuals that backward keeps (all fp32, shape [N])."""

    logprob_N: torch.Tensor
    entropy_N: torch.Tensor
    lse_N: torch.Tensor
    mu_N: torch.Tensor


def finish(stats: SoftmaxStats) -> Finished:
    """Log-prob of the label, entropy, logsumexp and mean logit from a merged state."""
    log_s = torch.log(stats.sumexp_N)
    mean_shift = stats.sumez_N / stats.sumexp_N  # = mu - m, <= 0
    logprob = (stats.target_N - stats.max_N) - log_s
    entropy = log_s - mean_shift
    return Finished(logprob, entropy, stats.max_N + log_s, stats.max_N + mean_shift)


def label_in_range(labels_N: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Boolean [N]: which labels fall in the vocabulary ids [start, stop)."""
    return (labels_N >= start) & (labels_N < stop)


def matmul_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in fp32, without upcasting 16-bit inputs on CUDA.

    On CUDA, 16-bit inputs go through ``torch.mm(..., out_dtype=float32)`` (cuBLAS keeps the
    fp32 accumulator instead of rounding it to 16 bits); where that overload is missing the
    product is rounded once to the input dtype. On CPU we upcast: CPU matmul of 16-bit
    inputs is slower than fp32 there anyway.
    """
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.is_cuda and a.dtype == b.dtype:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            return (a @ b).float()
    return a.float() @ b.float()


def finish_dhidden(
    dhidden32_NH: torch.Tensor | None, dtype: torch.dtype, group: dist.ProcessGroup | None
) -> torch.Tensor | None:
    """Sum the shards' partial dhidden over the TP group (in fp32, before the cast).

    A rank sees only its vocabulary shard, so its dhidden is a partial sum over the
    vocabulary; the hidden state is replicated over the group, so its gradient is the sum
    over ranks: the all-reduce Megatron's ColumnParallelLinear does in the backward of
    copy_to_tensor_model_parallel_region.
    """
    if dhidden32_NH is None:
        return None
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(dhidden32_NH, op=dist.ReduceOp.SUM, group=group)
    return dhidden32_NH.to(dtype)
