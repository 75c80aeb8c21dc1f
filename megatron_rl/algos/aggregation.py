"""Loss aggregation with step-global normalisers, so micro-batches and DP ranks add up.

Shape legend: B = sequences in this micro-batch, T = response tokens (padded; any padding
works, per micro-batch), K = micro-batches on this rank.

The usual bug (verl 6280 and friends): each micro-batch divides by its *own* token or
sequence count, so the step's gradient depends on how the batch was cut. Here the caller
computes one ``LossNormalizer`` per optimiser step from every mask of the step (all
micro-batches, all DP ranks: ``build_normalizer``), and each micro-batch's loss is a
partial sum over that global denominator. Then

    sum over micro-batches and DP ranks of aggregate(...) == the full-batch loss

exactly (up to float rounding), for every mode.

Gradient reduction: this gives the right gradient when ranks' gradients are **summed**.
Data-parallel wrappers that **average** (torch DDP, Megatron DDP by default) divide by the
DP size, so backpropagate ``loss * norm.dp_size`` there; Megatron's schedule also divides
by the number of micro-batches unless ``calculate_per_token_loss`` is set, which the
actor must undo the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_rl.config.algorithm import LossAggMode, check_choice, choices

LOSS_AGG_MODES: tuple[str, ...] = choices(LossAggMode)


@dataclass(frozen=True)
class LossNormalizer:
    """Global denominators of one optimiser step (python numbers: fixed for the step)."""

    num_tokens: float
    """Valid (mask = 1) response tokens over all micro-batches and DP ranks."""
    num_seqs: float
    """Sequences with at least one valid token, over all micro-batches and DP ranks."""
    max_len: int
    """Dr.GRPO constant: the generation budget (rollout max response length)."""
    dp_size: int = 1
    """Ranks the normaliser was reduced over (scale for gradient-averaging DDP)."""


def build_normalizer(
    mask_BTs: Iterable[Tensor], max_len: int, group: dist.ProcessGroup | None = None
) -> LossNormalizer:
    """Count this rank's valid tokens / sequences over all its micro-batches, then SUM over
    ``group`` (the data-parallel group; None = single process).

    Call once per optimiser step, before the micro-batch loop, with the *final* masks
    (after overlong filtering and ICEPOP masking). One host sync per step (``tolist``).
    With context parallelism pass each sequence's full mask once (not per CP shard).
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    counts = None
    for mask_BT in mask_BTs:
        valid = mask_BT.bool()
        c = torch.stack([valid.sum(), valid.any(dim=-1).sum()]).to(torch.float64)
        counts = c if counts is None else counts + c
    if counts is None:
        counts = torch.zeros(2, dtype=torch.float64)
    dp_size = 1
    if group is not None:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
        dp_size = dist.get_world_size(group)
    num_tokens, num_seqs = counts.tolist()
    return LossNormalizer(num_tokens, num_seqs, int(max_len), dp_size)


def aggregate(loss_BT: Tensor, mask_BT: Tensor, mode: str, norm: LossNormalizer) -> Tensor:
    """This micro-batch's share of the step loss (0-d) under aggregation ``mode``.

    * ``token-mean``: sum of token losses / all valid tokens of the step (DAPO; DeepScaleR).
    * ``seq-mean-token-sum``: sum of per-sequence token sums / sequences.
    * ``seq-mean-token-mean``: sum of per-sequence token means / sequences (GRPO paper).
    * ``seq-mean-token-sum-norm``: sum of token losses / (sequences * max_len) (Dr.GRPO,
      2503.20783: a constant length instead of each response's own length). Departs from
      verl, which divides by the padded width of the batch at hand: that width changes with
      micro-batching, a constant does not.

    Masked positions may hold garbage (e.g. -inf log-probs of padding): they are selected
    away with ``where`` rather than multiplied by 0, which would turn inf into NaN.
    Empty step (no valid token): denominators are floored at 1 so the loss is 0, not NaN.
    """
    check_choice("loss_agg_mode", mode, LOSS_AGG_MODES)
    valid = mask_BT.bool()
    masked_BT = torch.where(valid, loss_BT, torch.zeros((), dtype=loss_BT.dtype, device=loss_BT.device))
    seqs = max(norm.num_seqs, 1.0)
    if mode == "token-mean":
        return masked_BT.sum() / max(norm.num_tokens, 1.0)
    if mode == "seq-mean-token-sum":
        return masked_BT.sum() / seqs
    if mode == "seq-mean-token-mean":
        len_B = valid.sum(dim=-1).clamp(min=1).to(loss_BT.dtype)
        return (masked_BT.sum(dim=-1) / len_B).sum() / seqs
    # seq-mean-token-sum-norm
    return masked_BT.sum() / (seqs * norm.max_len)


def token_mean(x_BT: Tensor, mask_BT: Tensor, norm: LossNormalizer) -> Tensor:
    """Additive token-mean of a metric (detached): sums to the step mean over micro-batches."""
    return aggregate(x_BT.detach().to(torch.float32), mask_BT, "token-mean", norm)
