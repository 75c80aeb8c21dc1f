"""The pure parts of a step: shaping, advantages, mini-batches, the loss, the learning rate.

Everything here is a function of its arguments (no I/O, no collectives besides the DP
normaliser), so the driver in ``loop`` reads as phases and these pieces test alone.
"""

from __future__ import annotations

import math

import torch

from megatron_rl import algos
from megatron_rl.actor.actor import TokenSeparableLoss
from megatron_rl.config.optimizer import OptimizerConfig
from megatron_rl.config.run import RunConfig
from megatron_rl.errors import UserError
from megatron_rl.trainer.samples import ScoredSample


class GraderError(UserError):
    """Too many samples of a step could not be graded (a broken grader, not wrong answers)."""


def shape(cfg: RunConfig, samples: list[ScoredSample]) -> dict[str, float]:
    """Rewards and trainability from scores: overlong penalty, overlong filter, grader failures."""
    a = cfg.algorithm
    if not samples:
        return {}
    lengths = torch.tensor([len(s.response_ids) for s in samples])
    pen, metrics = algos.overlong_penalty(lengths, cfg.rollout.max_new_tokens, a.overlong_buffer_len, a.overlong_penalty)
    out = {k: float(v) for k, v in metrics.items()}
    cut = cfg.reward.length_finished_score
    for s, p in zip(samples, pen.tolist()):
        if cut is not None and s.finish_reason == "length" and not s.grader_failed:
            s.score = float(cut)  # the recipe's rule for unfinished answers (DeepScaleR: 0)
        s.reward = s.score + p
        if s.grader_failed:
            s.trainable = False  # unknown grade: neither a wrong nor a right answer
        if a.overlong_filter and s.finish_reason == "length":
            s.trainable = False
    failed = sum(s.grader_failed for s in samples)
    out["reward/grader_failed"] = float(failed)
    if failed > cfg.reward.max_failed_share * len(samples):
        tags = sorted({s.grade_tag.split(":", 1)[0] for s in samples if s.grader_failed})
        raise GraderError(
            f"{failed} of {len(samples)} samples of this step could not be graded ({', '.join(tags)}), more than "
            f"`reward.max_failed_share` = {cfg.reward.max_failed_share:g}: the grader or its sandbox is broken, "
            "and training on the rest would skew every advantage. See train.log for the graders' errors; raise "
            "`reward.timeout_s` if the grader is merely slow.")
    out["overlong/filtered"] = float(sum(a.overlong_filter and s.finish_reason == "length" for s in samples))
    return out


def advantages(cfg: RunConfig, samples: list[ScoredSample]) -> list[float]:
    """Per-sample advantages; samples whose grade is unknown are left out of their group's baseline."""
    known = [i for i, s in enumerate(samples) if not s.grader_failed]
    adv = [0.0] * len(samples)
    if not known:
        return adv
    reward = torch.tensor([samples[i].reward for i in known], dtype=torch.float32)
    group = torch.tensor([samples[i].group for i in known])
    for i, a in zip(known, algos.compute_advantages(cfg.algorithm, reward, group).tolist()):
        adv[i] = float(a)
    return adv


def mini_batches(cfg: RunConfig, samples: list[ScoredSample]) -> list[list[int]]:
    """Sample indices per optimizer update: groups split into ``prompts_per_step / mini_batch_prompts`` parts."""
    updates = cfg.train.prompts_per_step // cfg.train.mini_batch_prompts
    groups = sorted({s.group for s in samples})
    if not groups:
        return []
    per = max(1, math.ceil(len(groups) / updates))
    parts = [set(groups[i:i + per]) for i in range(0, len(groups), per)]
    return [[i for i, s in enumerate(samples) if s.group in part] for part in parts]


def pad_multiple(cfg: RunConfig) -> int:
    p = cfg.parallel
    m = 2 * p.cp if p.cp > 1 else 1
    if p.sp:
        m = m * p.tp // math.gcd(m, p.tp)
    return m


def needs_logprob_pass(cfg: RunConfig, updates_per_step: int) -> bool:
    """Whether old log-probs need their own forward pass before the updates.

    With one update per step the policy that sampled is the one being trained: the old
    log-probs are the current ones, detached, and the mismatch gate reads the training
    forward's log-probs (checked before the optimizer step, so a failed gate still trains
    nothing). A second update, rollout correction (its weights are needed before the loss) or
    pipeline parallelism (log-probs live on the last stage only) need the pass.
    """
    return updates_per_step > 1 or cfg.algorithm.tis_mode != "none" or cfg.parallel.pp > 1


def learning_rate(opt: OptimizerConfig, update: int, total_updates: int) -> float:
    """The schedule as a pure function of the update count (so a resume needs no state)."""
    if opt.warmup_steps and update < opt.warmup_steps:
        return opt.lr * (update + 1) / opt.warmup_steps
    if opt.schedule == "constant" or total_updates <= opt.warmup_steps:
        return opt.lr
    frac = min(1.0, (update - opt.warmup_steps) / max(1, total_updates - opt.warmup_steps))
    if opt.schedule == "linear":
        return opt.min_lr + (opt.lr - opt.min_lr) * (1.0 - frac)
    return opt.min_lr + (opt.lr - opt.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


def set_lr(optimizer, lr: float) -> None:
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in opt.param_groups:
            group["lr"] = lr


def adam_step(optimizer) -> float:
    """Adam's own update counter (-1 before the first update): shows that a stage or a resume
    carried the optimizer state over rather than starting a fresh one."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in getattr(opt, "optimizer", opt).state.values():
            if "step" in state:
                return float(state["step"])
    return -1.0


def build_loss(cfg: RunConfig, norm):
    """The step loss for the actor: the fused token-separable form when the policy loss allows it."""
    a = cfg.algorithm

    def metrics_fn(logp, ent, mb):
        mb.train_logp_BS = logp.detach()  # the gate reads them when no separate pass ran
        old = mb.old_logp_BS if mb.old_logp_BS is not None else logp.detach()
        loss, metrics = algos.actor_loss(
            a, norm, logp_BT=logp, old_logp_BT=old, adv=mb.adv_BS, mask_BT=mb.loss_mask_BS,
            ref_logp_BT=mb.ref_logp_BS, entropy_BT=ent, weight_BT=mb.weight_BS)
        if ent is not None:  # logged whatever entropy_coef is: a collapsing policy shows here first
            valid = mb.loss_mask_BS.bool()
            metrics["actor/entropy_mean"] = torch.where(valid, ent.detach(), 0.0).sum() / max(norm.num_tokens, 1.0)
        return loss, metrics

    if not algos.token_separable(a):
        return metrics_fn

    def token_loss(mb):
        return algos.build_token_loss(a, norm, old_logp_BT=mb.old_logp_BS, adv=mb.adv_BS, mask_BT=mb.loss_mask_BS,
                                      ref_logp_BT=mb.ref_logp_BS, weight_BT=mb.weight_BS)

    return TokenSeparableLoss(token_loss, metrics_fn)
