"""Rollout-vs-trainer log-prob mismatch: metrics every step, and a gate after every sync.

Right after a weight sync the engine serves the trainer's weights, so the trainer's
log-probs of the sampled tokens must equal the engine's up to the engine's numerics: the
importance ratio is 1. A wrong weight mapping, a missed sync, a server that returns
untempered log-probs or a different temperature shows up here first, as a ratio far from
1. Peers check this in CI only; every run checks it here, on the first step after each
sync, and stops with ``MismatchError`` before training on samples it cannot trust.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_rl.algos import mismatch_metrics
from megatron_rl.errors import UserError

FP32_MEAN_ABS = 1e-4
"""fp32 actor and engine (CPU): mean |delta| measured 1e-7 to 1e-6 (a wrong tensor: > 1e-2).
The mean, not the max: in a trained, sharp model a rare token's log-prob near -15 differs by
~1e-4 between two fp32 implementations (measured 1.3e-4 in the demo) while the mean stays ~1e-6."""
HALF_MEAN_ABS = 0.05
"""bf16/fp16: mean |delta| (16-bit engines differ from the trainer by ~1e-2 on average)."""


class MismatchError(UserError):
    """The rollout engine's log-probs are not the trainer's: the weights in it differ."""


def default_threshold(dtype: str) -> float:
    """The gate's default bound on the mean |delta log-prob| for an actor of ``dtype``."""
    return FP32_MEAN_ABS if dtype == "float32" else HALF_MEAN_ABS


def step_mismatch(old_logps: list[torch.Tensor], micro_batches: list, group=None) -> dict[str, float]:
    """Mismatch metrics over the valid response tokens of every DP rank (same on all ranks)."""
    olds, rolls = [], []
    for old, mb in zip(old_logps, micro_batches):
        valid = mb.loss_mask_BS.bool()
        olds.append(old[valid].float().cpu())
        rolls.append(mb.rollout_logp_BS[valid].float().cpu())
    old_N = torch.cat(olds) if olds else torch.zeros(0)
    roll_N = torch.cat(rolls) if rolls else torch.zeros(0)
    if group is not None and dist.get_world_size(group) > 1:
        parts: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(parts, (old_N, roll_N), group=group)
        old_N = torch.cat([p[0] for p in parts])
        roll_N = torch.cat([p[1] for p in parts])
    if old_N.numel() == 0:
        return {"mismatch/tokens": 0.0}
    out = {k: float(v) for k, v in mismatch_metrics(old_N[None], roll_N[None], torch.ones(1, old_N.numel())).items()}
    out["mismatch/abs_logp_diff_max"] = float((old_N - roll_N).abs().max())
    out["mismatch/tokens"] = float(old_N.numel())
    return out


def check_gate(metrics: dict[str, float], *, dtype: str, threshold: float, step: int, version: str | None) -> None:
    """Raise ``MismatchError`` when the first step after a sync disagrees with the engine."""
    limit = default_threshold(dtype) if threshold < 0 else threshold
    if limit == 0 or "mismatch/abs_logp_diff_mean" not in metrics:
        return
    value = metrics["mismatch/abs_logp_diff_mean"]
    if value > limit:
        raise MismatchError(
            f"Step {step}: the rollout engine's log-probs differ from the trainer's right after a weight "
            f"sync (weight version {version!r}): mean |delta log-prob| = {value:.3g} > "
            f"{limit:g} (`train.mismatch_threshold`; max {metrics['mismatch/abs_logp_diff_max']:.3g}, "
            f"over {metrics['mismatch/tokens']:.0f} tokens, importance-ratio mean "
            f"{metrics.get('mismatch/ratio_mean', float('nan')):.4g}). The weights in the engine are not "
            "the trainer's: a wrong weight mapping or a sync that did not land, or the engine samples "
            "at another temperature or returns untempered log-probs. Nothing was trained on these samples.")
