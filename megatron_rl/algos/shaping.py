"""Sample shaping between scoring and training: dynamic sampling and overlong handling.

Shape legend: B = samples (responses) in the step, T = response tokens (padded).

These run once per step on the scored batch, before advantages (the overlong penalty
changes rewards) and before ``build_normalizer`` (the overlong filter changes the mask).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from torch import Tensor

from megatron_rl.errors import ConfigError

G = TypeVar("G")


@dataclass
class DynamicSamplingResult(Generic[G]):
    """Outcome of one dynamic-sampling filter pass."""

    kept: list[G]
    """Groups with differing rewards, in input order, at most ``target_num_groups``."""
    num_needed: int
    """How many more informative groups the step still lacks (0 = ready to train)."""
    metrics: dict[str, float]
    """sampling/groups_{in,kept,dropped,needed}."""


def dynamic_sampling(
    groups: Sequence[G],
    rewards_of: Callable[[G], Sequence[float]],
    target_num_groups: int,
    *,
    tol: float = 0.0,
) -> DynamicSamplingResult[G]:
    """DAPO dynamic sampling: keep groups whose rewards are not all equal.

    DAPO (arXiv 2503.14476, section 3.2): a group that is all-correct or all-wrong has
    zero advantage everywhere, so it only shrinks the effective batch; DAPO over-samples
    and refills until the batch holds ``target_num_groups`` informative groups. This is
    the pure filter: pass everything scored so far (kept groups plus new ones; re-filtering
    is idempotent), get back the kept groups and the shortfall; the generate-and-refill
    loop, and its round limit, belong to the trainer. Departure: a group counts as uniform
    when max - min <= ``tol`` (DAPO tests std == 0; ``tol`` allows float-noisy rewards).
    Surplus informative groups beyond the target are dropped, as DAPO truncates.
    """
    if target_num_groups < 0:
        raise ValueError(f"target_num_groups must be >= 0, got {target_num_groups}")
    informative = []
    for group in groups:
        rewards = list(rewards_of(group))
        if rewards and max(rewards) - min(rewards) > tol:
            informative.append(group)
    kept = informative[:target_num_groups]
    needed = target_num_groups - len(kept)
    return DynamicSamplingResult(
        kept=kept,
        num_needed=needed,
        metrics={
            "sampling/groups_in": float(len(groups)),
            "sampling/groups_kept": float(len(kept)),
            "sampling/groups_dropped": float(len(groups) - len(informative)),
            "sampling/groups_needed": float(needed),
        },
    )


def overlong_penalty(
    length_B: Tensor, max_len: int, buffer_len: int, penalty: float = 1.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """DAPO soft overlong punishment, to add to the rewards: penalty_B <= 0 (float32).

    DAPO (arXiv 2503.14476, sec. 3.4): 0 up to ``max_len - buffer_len`` tokens, then a
    linear ramp down to -``penalty`` at ``max_len``; beyond it -``penalty`` (DAPO says -1,
    i.e. penalty 1; responses cannot exceed the generation cap here anyway).
    ``buffer_len`` = 0 turns it off. Metrics: overlong/penalised_frac, overlong/penalty_mean.
    """
    if not 0 <= buffer_len <= max_len:
        raise ConfigError(
            f"`algorithm.overlong_buffer_len` ({buffer_len}) must be between 0 and the "
            f"rollout max response length ({max_len})."
        )
    length_B = length_B.float()
    if buffer_len == 0:
        pen_B = torch.zeros_like(length_B)
    else:
        excess_B = length_B - (max_len - buffer_len)
        pen_B = -(excess_B / buffer_len).clamp(0.0, 1.0) * penalty
    n = max(pen_B.numel(), 1)
    return pen_B, {
        "overlong/penalised_frac": (pen_B < 0).sum().float() / n,
        "overlong/penalty_mean": pen_B.sum() / n,
    }


def overlong_filter(mask_BT: Tensor, truncated_B: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """DeepCoder overlong filtering: truncated responses are masked out of the loss.

    DeepCoder-14B (Agentica, 2025; after DAPO's overlong filtering, 2503.14476 sec. 3.4):
    a response cut at the length cap is not penalised for its length, it simply does not
    train, so long reasoning is not discouraged. Departure: only the loss mask changes;
    the sample still counts in its group's advantage baseline (it was scored as is).
    ``truncated_B`` is True for finish reason "length". Metric: overlong/filtered_frac.
    """
    keep_B = ~truncated_B.bool()
    new_mask_BT = mask_BT * keep_B[:, None].to(mask_BT.dtype)
    n = max(truncated_B.numel(), 1)
    return new_mask_BT, {"overlong/filtered_frac": truncated_B.bool().sum().float() / n}
