"""Outcome-reward advantage estimators over groups of samples of the same prompt.

Shape legend: B = samples in the step (all groups, any order), G = distinct groups.

Every estimator takes ``reward_B`` (float) and ``group_B`` (integer group ids, any values,
groups need not be contiguous nor of equal size) and returns ``adv_B``, one scalar per
sample, broadcast over its tokens by the policy loss. Shared guarantees:

* a group whose rewards are all equal (including a group of one) gets exactly 0, never
  NaN: such a group carries no signal, and ``(r - mean) / (std + eps)`` would otherwise
  amplify float rounding of the mean by 1/eps;
* arithmetic is float64 internally (B is small), the result has the reward's float dtype
  (float32 for integer rewards).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _out_dtype(reward_B: Tensor) -> torch.dtype:
    return reward_B.dtype if reward_B.is_floating_point() else torch.float32


def _group_stats(reward_B: Tensor, group_B: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per sample, float64: (r - group mean, group size, group unbiased std, group-constant).

    Centred values of a constant group are set to exactly 0 rather than trusted to cancel:
    e.g. three rewards of 0.1 have a float mean of 0.10000000000000002.
    """
    if reward_B.shape != group_B.shape or reward_B.dim() != 1:
        raise ValueError(
            f"reward_B and group_B must be 1-D of equal size, got "
            f"{tuple(reward_B.shape)} and {tuple(group_B.shape)}"
        )
    r_B = reward_B.to(torch.float64)
    _, inv_B = torch.unique(group_B, return_inverse=True)
    num_groups = int(inv_B.max()) + 1 if inv_B.numel() else 0
    zeros_G = torch.zeros(num_groups, dtype=torch.float64, device=r_B.device)
    count_G = zeros_G.index_add(0, inv_B, torch.ones_like(r_B))
    mean_G = zeros_G.index_add(0, inv_B, r_B) / count_G.clamp(min=1)
    max_G = zeros_G.scatter_reduce(0, inv_B, r_B, reduce="amax", include_self=False)
    min_G = zeros_G.scatter_reduce(0, inv_B, r_B, reduce="amin", include_self=False)
    constant_B = (max_G == min_G)[inv_B]
    centred_B = torch.where(constant_B, torch.zeros_like(r_B), r_B - mean_G[inv_B])
    sq_G = zeros_G.index_add(0, inv_B, centred_B.square())
    std_G = (sq_G / (count_G - 1).clamp(min=1)).sqrt()
    return centred_B, count_G[inv_B], std_G[inv_B], constant_B


def grpo_advantages(
    reward_B: Tensor, group_B: Tensor, *, norm_by_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO outcome advantage: (r - group mean) / (group std + eps).

    DeepSeekMath (arXiv 2402.03300), section 4.1.2 (outcome supervision). Departures: the
    std is the unbiased (n - 1) one, as ``torch.std`` and verl use (the paper does not say);
    a group of one gets 0, where verl gives it the raw reward (mean 0, std 1) -- no
    baseline, no signal. ``norm_by_std=False`` is Dr.GRPO's advantage.
    """
    centred_B, _, std_B, constant_B = _group_stats(reward_B, group_B)
    if norm_by_std:
        # Constant groups stay exactly 0 (their centred value is already forced to 0).
        centred_B = torch.where(constant_B, centred_B, centred_B / (std_B + eps))
    return centred_B.to(_out_dtype(reward_B))


def dr_grpo_advantages(reward_B: Tensor, group_B: Tensor) -> Tensor:
    """Dr.GRPO advantage: r - group mean, no division by the group std.

    "Understanding R1-Zero-Like Training: A Critical Perspective" (arXiv 2503.20783): the
    std division up-weights too-easy and too-hard prompts. The paper's other fix, no
    per-response length normalisation, is not an advantage but a loss aggregation: pair
    this with ``loss_agg_mode = seq-mean-token-sum-norm``.
    """
    return grpo_advantages(reward_B, group_B, norm_by_std=False)


def rloo_advantages(reward_B: Tensor, group_B: Tensor) -> Tensor:
    """RLOO advantage: r_i minus the mean reward of the *other* samples of its group.

    "Back to Basics: Revisiting REINFORCE Style Optimization..." (arXiv 2402.14740),
    eq. for the leave-one-out baseline: A_i = r_i - (sum_j r_j - r_i) / (n - 1), which is
    n / (n - 1) * (r_i - mean). Departure: the paper applies it with a sequence-level
    REINFORCE loss; here it feeds the same clipped token loss as GRPO (as verl does).
    A group of one has no other sample and gets 0.
    """
    centred_B, count_B, _, _ = _group_stats(reward_B, group_B)
    scale_B = count_B / (count_B - 1).clamp(min=1)
    return (centred_B * scale_B).to(_out_dtype(reward_B))


def reinforce_pp_advantages(reward_B: Tensor, group_B: Tensor, *, eps: float = 1e-6) -> Tensor:
    """REINFORCE++ (baseline variant): (r - group mean) / (std over the whole batch + eps).

    REINFORCE++ (arXiv 2501.03262) normalises advantages over the global batch instead of
    per prompt; its "-baseline" variant for group sampling first subtracts the group mean.
    Departures: the paper folds a per-token KL penalty into the return (here KL is a
    separate loss term, ``kl.py``); the batch statistic is over samples, not tokens (verl
    whitens over tokens, re-centring so that all-equal groups end up non-zero); and no
    re-centring is needed since group-centred values already have batch mean 0. So
    all-equal groups keep exactly 0.
    """
    centred_B, _, _, _ = _group_stats(reward_B, group_B)
    if centred_B.numel() < 2:
        return torch.zeros_like(centred_B).to(_out_dtype(reward_B))
    std = centred_B.std()
    return (centred_B / (std + eps)).to(_out_dtype(reward_B))
