"""Masked statistics and the catalogue of metric names the algos functions return.

Shape legend: B = sequences, T = response tokens (padded), N = any flat size.

Values are detached 0-d tensors, not python floats, so that computing them never forces a
host-device sync inside the micro-batch loop; the trainer converts once per step.

Two kinds of metric, never mixed in one dict:

* **additive** (from ``policy_loss``, ``kl``): each value is this micro-batch's share of a
  step mean, normalised by the step's global ``LossNormalizer``. Summing them over
  micro-batches and DP ranks (all-reduce SUM) gives the step value exactly.
* **whole-batch** (everything else): computed once per step on the full local batch
  (min / max / percentiles cannot be added up).

Names:

=============================  ===========================================================
actor/pg_loss                  policy-gradient part of the loss (additive)
actor/clipfrac_low             tokens with A < 0 and ratio < 1 - clip_low (no gradient)
actor/clipfrac_high            tokens with A > 0 and ratio > 1 + clip_high (no gradient)
actor/clipfrac_dual            tokens with A < 0 and ratio > dual_clip_c (no gradient)
actor/ratio_mean               token mean of the policy ratio (1 on the first mini-batch)
actor/ppo_kl                   token mean of old_logp - logp (k1 KL(old || new); GSPO: -log s_i)
actor/kl_loss                  KL-to-reference term before its coefficient (additive)
actor/entropy                  entropy term before its coefficient (additive)
actor/loss                     total loss (additive)
adv/{mean,std,min,max}         advantage statistics over samples
adv/zero_frac                  fraction of samples with exactly zero advantage
mismatch/abs_logp_diff_mean    token mean of |logp_train - logp_rollout|
mismatch/kl_k3                 token mean of k3 KL(rollout || train)
mismatch/ratio_{mean,min,max}  token ratio pi_train / pi_rollout
mismatch/ratio_p{05,50,95}     percentiles of that ratio (linear interpolation)
mismatch/weight_mean           mean importance weight applied (TIS / ICEPOP)
mismatch/capped_frac           fraction of tokens whose weight hit the TIS cap
mismatch/masked_frac           fraction of valid tokens ICEPOP masked out
sampling/groups_{in,kept,dropped,needed}   DAPO dynamic sampling counts
overlong/penalised_frac, overlong/penalty_mean, overlong/filtered_frac
=============================  ===========================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``x`` where ``mask``; masked entries may hold garbage (inf, NaN) safely."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device)).sum()


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` where ``mask``; 0 (not NaN) when the mask is empty."""
    count = mask.bool().sum().clamp(min=1)
    return masked_sum(x, mask) / count


def masked_quantiles(x: Tensor, mask: Tensor, qs: Sequence[float]) -> list[Tensor]:
    """Quantiles of the valid entries, interpolated linearly like ``torch.quantile``.

    Sort-based because ``torch.quantile`` refuses inputs above 16M elements, which a
    long-context step (e.g. 1024 samples x 24K tokens) exceeds. Empty mask -> zeros.
    """
    vals_N = x.detach()[mask.bool()].float().sort().values
    n = vals_N.numel()
    if n == 0:
        return [torch.zeros((), device=x.device) for _ in qs]
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        frac = pos - lo
        out.append(vals_N[lo] * (1 - frac) + vals_N[hi] * frac)
    return out


def advantage_metrics(adv_B: Tensor) -> dict[str, Tensor]:
    """adv/mean, adv/std, adv/min, adv/max, adv/zero_frac over the samples of one step."""
    adv_B = adv_B.detach().float()
    if adv_B.numel() == 0:
        zero = torch.zeros((), device=adv_B.device)
        return {k: zero for k in ("adv/mean", "adv/std", "adv/min", "adv/max", "adv/zero_frac")}
    std = adv_B.std() if adv_B.numel() > 1 else torch.zeros((), device=adv_B.device)
    return {
        "adv/mean": adv_B.mean(),
        "adv/std": std,
        "adv/min": adv_B.min(),
        "adv/max": adv_B.max(),
        "adv/zero_frac": (adv_B == 0).float().mean(),
    }


def ratio_metrics(ratio_BT: Tensor, mask_BT: Tensor, prefix: str) -> dict[str, Tensor]:
    """{prefix}/ratio_{mean,min,max,p05,p50,p95} over valid tokens (whole-batch metric)."""
    ratio_BT = ratio_BT.detach().float()
    valid = mask_BT.bool()
    p05, p50, p95 = masked_quantiles(ratio_BT, valid, (0.05, 0.5, 0.95))
    if valid.any():
        rmin, rmax = ratio_BT[valid].min(), ratio_BT[valid].max()
    else:
        rmin = rmax = torch.zeros((), device=ratio_BT.device)
    return {
        f"{prefix}/ratio_mean": masked_mean(ratio_BT, valid),
        f"{prefix}/ratio_min": rmin,
        f"{prefix}/ratio_max": rmax,
        f"{prefix}/ratio_p05": p05,
        f"{prefix}/ratio_p50": p50,
        f"{prefix}/ratio_p95": p95,
    }
