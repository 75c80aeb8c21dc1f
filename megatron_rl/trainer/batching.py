"""Samples -> micro-batches: token budgets, data-parallel balance, padding the layout needs.

Each data-parallel rank trains on its own share of a mini-batch. Shares are balanced by
tokens (longest-processing-time first: samples sorted by length, each to the rank with the
fewest tokens so far), then each rank packs its samples, sorted by length so rows of a
micro-batch have similar lengths and little padding, into micro-batches whose padded size
(rows x longest) stays within ``max_tokens`` (or ``micro_batch_size`` rows when the budget
is 0). Sequence lengths are padded to a multiple of ``pad_multiple`` (2*cp for context
parallel, tp for sequence parallel); with pipeline parallelism every micro-batch of a rank
is padded to one shape, because the stages exchange fixed-shape activations.

Micro-batches are right-padded and position-aligned as ``actor.forward.MicroBatch``: column
t is about token t+1, so the response's first token is predicted at column len(prompt) - 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_rl.actor.forward import MicroBatch
from megatron_rl.trainer.samples import ScoredSample


@dataclass
class Packed:
    """A rank's micro-batches and, per micro-batch, which samples (indices into the list
    given to ``pack``) fill its rows; rows past them are padding (fully masked)."""

    micro_batches: list[MicroBatch]
    rows: list[list[int]]
    padded_tokens: int
    real_tokens: int


def dp_shares(lengths: list[int], dp: int) -> list[list[int]]:
    """Indices per DP rank, balanced by tokens (deterministic: ties go to the lower rank)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    load, shares = [0] * dp, [[] for _ in range(dp)]
    for i in order:
        r = min(range(dp), key=lambda k: (load[k], len(shares[k]), k))
        shares[r].append(i)
        load[r] += lengths[i]
    return [sorted(s) for s in shares]


def _round_up(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)


def group_rows(lengths: list[int], *, max_tokens: int, micro_batch_size: int, pad_multiple: int) -> list[list[int]]:
    """Indices per micro-batch: by length, each within the padded token budget."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups:
            cur = groups[-1]
            longest = _round_up(max(lengths[j] for j in cur + [i]), pad_multiple)
            fits = (len(cur) + 1) * longest <= max_tokens if max_tokens > 0 else len(cur) < micro_batch_size
            if fits:
                cur.append(i)
                continue
        groups.append([i])
    return groups


def to_micro_batch(samples: list[ScoredSample], rows: int, length: int, adv: list[float]) -> MicroBatch:
    """Right-padded tensors for ``samples`` in ``rows`` x ``length`` (extra rows are padding)."""
    tokens = torch.zeros(rows, length, dtype=torch.long)
    mask = torch.zeros(rows, length)
    rollout = torch.zeros(rows, length)
    adv_BS = torch.zeros(rows, length)
    for r, (s, a) in enumerate(zip(samples, adv)):
        p, n = len(s.prompt_ids), len(s.response_ids)
        tokens[r, :p + n] = torch.tensor(s.prompt_ids + s.response_ids)
        if s.trainable and n:
            mask[r, p - 1:p - 1 + n] = 1.0
        rollout[r, p - 1:p - 1 + n] = torch.tensor(s.rollout_logprobs, dtype=torch.float32)
        adv_BS[r, p - 1:p - 1 + n] = a
    return MicroBatch(tokens_BS=tokens, loss_mask_BS=mask, rollout_logp_BS=rollout, adv_BS=adv_BS)


def pack(samples: list[ScoredSample], adv: list[float], *, dp: int, dp_rank: int, max_tokens: int,
         micro_batch_size: int, pad_multiple: int = 1, uniform_shape: bool = False) -> Packed:
    """This DP rank's micro-batches of ``samples`` (with their advantages ``adv``).

    A rank whose share is empty (fewer samples than DP ranks) gets one fully masked row, so
    every rank takes part in the step's collectives.
    """
    lengths = [s.length for s in samples]
    mine = dp_shares(lengths, dp)[dp_rank]
    if not mine:
        ghost = ScoredSample(uid=-1, group=-1, sample_index=0, prompt_ids=samples[0].prompt_ids[:1],
                             response_ids=[], rollout_logprobs=[], finish_reason="stop", data_source="",
                             trainable=False)
        return Packed([to_micro_batch([ghost], 1, pad_multiple, [0.0])], [[]], pad_multiple, 0)
    groups = group_rows([lengths[i] for i in mine], max_tokens=max_tokens, micro_batch_size=micro_batch_size,
                        pad_multiple=pad_multiple)
    groups = [[mine[j] for j in g] for g in groups]
    shape_rows = max(len(g) for g in groups)
    shape_len = _round_up(max(lengths[i] for i in mine), pad_multiple)
    mbs, padded = [], 0
    for g in groups:
        rows = shape_rows if uniform_shape else len(g)
        length = shape_len if uniform_shape else _round_up(max(lengths[i] for i in g), pad_multiple)
        mbs.append(to_micro_batch([samples[i] for i in g], rows, length, [adv[i] for i in g]))
        padded += rows * length
    return Packed(mbs, groups, padded, sum(lengths[i] for i in mine))
