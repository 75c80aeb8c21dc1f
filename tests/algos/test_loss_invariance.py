"""Micro-batch and data-parallel invariance of the actor loss and its gradient.

One step's batch cut into 2 DP ranks x 4 micro-batches of unequal size and unequal padding
must give the same loss (summed shares) and the same gradient (DDP average of rank
gradients of ``loss * dp_size``) as the whole batch in one piece, for every aggregation
mode and both ratio levels. A tiny linear "language model" makes the gradient real.
"""

from __future__ import annotations

import dataclasses
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_rl.algos import actor_loss, build_normalizer
from megatron_rl.algos.aggregation import LOSS_AGG_MODES
from megatron_rl.config.algorithm import AlgorithmConfig

B, T, H, V = 16, 7, 5, 11
# Row indices (deliberately shuffled) per rank, per micro-batch; sizes differ.
SPLITS = [
    [[3], [0, 9, 14], [5, 12], [7, 1]],
    [[2, 11, 15], [6], [4, 13], [8, 10]],
]
ADDITIVE = ("actor/loss", "actor/pg_loss", "actor/clipfrac_low", "actor/clipfrac_high",
            "actor/clipfrac_dual", "actor/ratio_mean", "actor/ppo_kl", "actor/kl_loss",
            "actor/entropy")
CASES = [(mode, kind) for mode in LOSS_AGG_MODES for kind in ("ppo", "gspo")]


def make_problem(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(H, V, generator=g, dtype=torch.float64) * 0.5
    x = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    y = torch.randint(V, (B, T), generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[3] = 0  # an empty response (e.g. overlong-filtered), alone in its micro-batch
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    logp0, _ = forward(w, x, y)
    old = logp0 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    old[1] -= 1.5  # ratio ~ e^1.5 > dual_clip_c with a negative advantage: dual clip fires
    ref = logp0 + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    # Padding holds garbage, as unpacked batches may: it must not leak.
    old = old.masked_fill(~mask, float("-inf"))
    ref = ref.masked_fill(~mask, float("nan"))
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[1] = -0.8
    return dict(w=w, x=x, y=y, mask=mask, old=old, ref=ref, adv=adv)


def forward(w: torch.Tensor, x_BTH: torch.Tensor, y_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logprobs_BTV = torch.log_softmax(x_BTH @ w, dim=-1)
    logp_BT = logprobs_BTV.gather(-1, y_BT[..., None]).squeeze(-1)
    entropy_BT = -(logprobs_BTV.exp() * logprobs_BTV).sum(-1)
    return logp_BT, entropy_BT


def config(mode: str, kind: str) -> AlgorithmConfig:
    return AlgorithmConfig(
        policy_loss=kind, loss_agg_mode=mode, clip_low=0.2, clip_high=0.28, dual_clip_c=3.0,
        kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01,
    )


def micro_batch(p: dict, rows: list[int]) -> dict:
    """Rows of the batch, trimmed to this micro-batch's own longest response (>= 1 column)."""
    idx = torch.tensor(rows)
    width = max(int(p["mask"][idx].sum(-1).max()), 1)
    return {k: p[k][idx, :width] if k in ("x", "y", "mask", "old", "ref") else p[k][idx]
            for k in ("x", "y", "mask", "old", "ref", "adv")}


def loss_and_grad(cfg, norm, w, mb, scale: float = 1.0):
    w = w.detach().clone().requires_grad_(True)
    logp, entropy = forward(w, mb["x"], mb["y"])
    loss, metrics = actor_loss(
        cfg, norm, logp_BT=logp, old_logp_BT=mb["old"], adv=mb["adv"], mask_BT=mb["mask"],
        ref_logp_BT=mb["ref"], entropy_BT=entropy,
    )
    (loss * scale).backward()
    return loss.detach(), w.grad, metrics


def full_batch(p, cfg):
    mb = micro_batch(p, list(range(B)))
    norm = build_normalizer([p["mask"]], max_len=T)
    return loss_and_grad(cfg, norm, p["w"], mb)


@pytest.mark.parametrize("mode,kind", CASES)
def test_micro_batches_and_dp_ranks_match_the_full_batch(mode, kind):
    p, cfg = make_problem(), config(mode, kind)
    full_loss, full_grad, full_metrics = full_batch(p, cfg)
    assert torch.isfinite(full_grad).all() and full_grad.abs().sum() > 0
    # every branch of the clipped loss is exercised, so each is checked for invariance
    for k in ("actor/clipfrac_high", "actor/clipfrac_dual"):
        assert full_metrics[k] > 0, k
    if kind == "ppo":
        assert full_metrics["actor/clipfrac_low"] > 0
    mbs = [[micro_batch(p, rows) for rows in rank] for rank in SPLITS]
    # What build_normalizer(group=dp_group) computes: every rank's counts summed.
    norm = dataclasses.replace(
        build_normalizer([mb["mask"] for rank in mbs for mb in rank], max_len=T), dp_size=len(SPLITS)
    )
    rank_grads, total_loss, metric_sums = [], 0.0, dict.fromkeys(ADDITIVE, 0.0)
    for rank in mbs:
        grad = torch.zeros_like(p["w"])
        for mb in rank:
            loss, g, metrics = loss_and_grad(cfg, norm, p["w"], mb, scale=norm.dp_size)
            grad += g  # gradient accumulation over micro-batches
            total_loss += loss
            for k in ADDITIVE:
                metric_sums[k] += metrics[k].item()
        rank_grads.append(grad)
    ddp_grad = sum(rank_grads) / len(rank_grads)  # DDP averages over ranks
    torch.testing.assert_close(ddp_grad, full_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(total_loss, full_loss, rtol=1e-10, atol=1e-12)
    for k in ADDITIVE:
        assert metric_sums[k] == pytest.approx(full_metrics[k].item(), rel=1e-5, abs=1e-7), k


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_per_micro_batch_normalisers_would_break_invariance(mode):
    """Negative control: the naive per-micro-batch denominator gives a different gradient,
    so the test above can tell a global normaliser from a local one."""
    p, cfg = make_problem(), config(mode, "ppo")
    _, full_grad, _ = full_batch(p, cfg)
    grads = []
    for rank in SPLITS:
        rank_mbs = [micro_batch(p, rows) for rows in rank]
        # the usual mistake: each micro-batch normalised by itself, averaged over micro-batches
        grad = sum(
            loss_and_grad(cfg, build_normalizer([mb["mask"]], max_len=T), p["w"], mb)[1] for mb in rank_mbs
        ) / len(rank_mbs)
        grads.append(grad)
    assert not torch.allclose(sum(grads) / len(grads), full_grad, rtol=1e-3, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank: int, world: int, port: int) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        torch.set_num_threads(1)
        p = make_problem()
        for mode, kind in CASES:
            cfg = config(mode, kind)
            full_loss, full_grad, _ = full_batch(p, cfg)  # every rank checks against it
            mbs = [micro_batch(p, rows) for rows in SPLITS[rank]]
            norm = build_normalizer([mb["mask"] for mb in mbs], max_len=T, group=dist.group.WORLD)
            assert norm.dp_size == world
            grad, loss = torch.zeros_like(p["w"]), torch.zeros((), dtype=torch.float64)
            for mb in mbs:
                mb_loss, g, _ = loss_and_grad(cfg, norm, p["w"], mb, scale=norm.dp_size)
                grad += g
                loss += mb_loss
            dist.all_reduce(grad)  # what DDP does: all-reduce SUM, then divide by world
            grad /= world
            dist.all_reduce(loss)
            torch.testing.assert_close(grad, full_grad, rtol=1e-10, atol=1e-12, msg=f"{mode} {kind}")
            torch.testing.assert_close(loss, full_loss, rtol=1e-10, atol=1e-12, msg=f"{mode} {kind}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gloo_all_reduce_matches_the_full_batch(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # spawned children inherit it
    mp.spawn(_gloo_worker, args=(len(SPLITS), _free_port()), nprocs=len(SPLITS), join=True)
