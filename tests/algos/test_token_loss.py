"""build_token_loss: actor_loss as per-token terms, alone and through the fused kernel.

The sum of the token loss over any chunking of the flattened tokens must equal
``actor_loss`` with the same arguments (value and gradients w.r.t. log-probs and entropy),
in every aggregation mode; through ``linear_logprobs_loss`` it must give the gradients of
the unfused path (float64 reference logits -> actor_loss -> autograd).
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_rl.algos import LossNormalizer, actor_loss, aggregate
from megatron_rl.algos.token_loss import aggregation_weights, build_token_loss, token_separable
from megatron_rl.config.algorithm import AlgorithmConfig
from megatron_rl.errors import ConfigError
from megatron_rl.kernels import linear_logprobs_loss
from megatron_rl.kernels.reference import linear_logprobs_reference

MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
B, T = 3, 23


def batch(seed: int = 0, dtype=torch.float64):
    """Log-probs near the old ones (both sides of the clip range), padding at -inf."""
    gen = torch.Generator().manual_seed(seed)
    mask_BT = (torch.rand(B, T, generator=gen) > 0.25).float()
    mask_BT[2, 15:] = 0.0  # a shorter sequence
    old_BT = -torch.rand(B, T, generator=gen, dtype=dtype) * 4
    logp_BT = old_BT + 0.3 * torch.randn(B, T, generator=gen, dtype=dtype)
    logp_BT = torch.where(mask_BT.bool(), logp_BT, -math.inf)
    consts = dict(
        old_logp_BT=old_BT,
        adv=torch.randn(B, generator=gen, dtype=dtype),
        mask_BT=mask_BT,
        ref_logp_BT=old_BT + 0.2 * torch.randn(B, T, generator=gen, dtype=dtype),
        weight_BT=0.5 + torch.rand(B, T, generator=gen, dtype=dtype),
    )
    ent_BT = 2 + torch.rand(B, T, generator=gen, dtype=dtype)
    return logp_BT, ent_BT, consts


def norm_of(mask_BT) -> LossNormalizer:
    # A step larger than this micro-batch: the normaliser counts other micro-batches too.
    return LossNormalizer(num_tokens=mask_BT.sum().item() + 17, num_seqs=B + 2, max_len=40)


@pytest.mark.parametrize("mode", MODES)
def test_aggregation_weights_reproduce_aggregate(mode):
    logp_BT, _, c = batch(1)
    x_BT = torch.randn(B, T, dtype=torch.float64)
    norm = norm_of(c["mask_BT"])
    w_BT = aggregation_weights(c["mask_BT"], mode, norm)
    assert (w_BT[c["mask_BT"] == 0] == 0).all()
    want = aggregate(x_BT, c["mask_BT"], mode, norm)
    torch.testing.assert_close((x_BT * w_BT).sum(), want, rtol=1e-6, atol=0)


CONFIGS = [
    dict(loss_agg_mode=mode, kl_estimator=kl, dual_clip_c=dual, entropy_coef=ent, kl_coef=klc)
    for mode, kl, dual, ent, klc in [
        ("token-mean", "k3", None, 0.01, 0.1),
        ("seq-mean-token-sum", "k1", 3.0, 0.0, 0.05),
        ("seq-mean-token-mean", "k2", None, 0.02, 0.0),
        ("seq-mean-token-sum-norm", "abs", 1.5, 0.01, 0.1),
    ]
]


@pytest.mark.parametrize("overrides", CONFIGS, ids=[c["loss_agg_mode"] for c in CONFIGS])
def test_sum_over_chunks_equals_actor_loss(overrides):
    cfg = AlgorithmConfig(clip_high=0.28, **overrides)
    logp_BT, ent_BT, c = batch(2)
    norm = norm_of(c["mask_BT"])
    lp, ent = logp_BT.clone().requires_grad_(), ent_BT.clone().requires_grad_()
    want, _ = actor_loss(cfg, norm, logp_BT=lp, entropy_BT=ent, **c)
    want_grads = torch.autograd.grad(want, (lp, ent), allow_unused=True)

    token_loss = build_token_loss(cfg, norm, **c)
    lp_N = logp_BT.reshape(-1).clone().requires_grad_()
    ent_N = ent_BT.reshape(-1).clone().requires_grad_()
    cuts = [0, 5, 30, 31, B * T]  # chunks cut across sequences, one of a single token
    got = sum(
        token_loss(lp_N[a:b], ent_N[a:b], slice(a, b)).sum() for a, b in zip(cuts, cuts[1:])
    )
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)
    got_grads = torch.autograd.grad(got, (lp_N, ent_N), allow_unused=True)
    for g, w in zip(got_grads, want_grads):
        if w is None:  # entropy_coef = 0: no entropy term at all
            assert g is None or (g == 0).all()
        else:
            torch.testing.assert_close(g.view(B, T), w, rtol=1e-6, atol=1e-12)
    # Index-tensor rows (the actor under context parallelism): any order, any split.
    perm = torch.randperm(B * T, generator=torch.Generator().manual_seed(0))
    by_index = sum(
        token_loss(logp_BT.reshape(-1)[idx], ent_BT.reshape(-1)[idx], idx).sum()
        for idx in perm.split(20)
    )
    torch.testing.assert_close(by_index, want.detach(), rtol=1e-6, atol=1e-12)


def test_gspo_is_refused():
    cfg = AlgorithmConfig(policy_loss="gspo", clip_low=3e-4, clip_high=4e-4, loss_agg_mode="seq-mean-token-mean")
    assert not token_separable(cfg) and token_separable(AlgorithmConfig())
    _, _, c = batch(3)
    with pytest.raises(ConfigError, match="gspo"):
        build_token_loss(cfg, norm_of(c["mask_BT"]), **c)
    with pytest.raises(ValueError, match="ref_logp_BT"):
        no_ref = {**c, "ref_logp_BT": None}
        build_token_loss(AlgorithmConfig(kl_coef=0.1), norm_of(c["mask_BT"]), **no_ref)


def test_through_the_fused_kernel_equals_unfused_actor_loss():
    """The actor's two paths: fused loss-in-forward vs linear_logprobs -> actor_loss."""
    cfg = AlgorithmConfig(loss_agg_mode="seq-mean-token-mean", dual_clip_c=3.0, clip_high=0.28,
                          kl_coef=0.05, entropy_coef=0.01)
    gen = torch.Generator().manual_seed(4)
    h_dim, vocab = 32, 701
    hidden_NH = torch.randn(B * T, h_dim, generator=gen)
    weight_VH = torch.randn(vocab, h_dim, generator=gen) * (3.0 / h_dim**0.5)
    labels_N = torch.randint(0, vocab, (B * T,), generator=gen)
    with torch.no_grad():
        lp_now, _ = linear_logprobs_reference(hidden_NH, weight_VH, labels_N, temperature=0.8)
    _, _, c = batch(5, dtype=torch.float32)
    c["old_logp_BT"] = lp_now.view(B, T) + 0.3 * torch.randn(B, T, generator=gen)
    c["ref_logp_BT"] = lp_now.view(B, T) + 0.2 * torch.randn(B, T, generator=gen)
    norm = norm_of(c["mask_BT"])

    h64, w64 = hidden_NH.double().requires_grad_(), weight_VH.double().requires_grad_()
    lp, ent = linear_logprobs_reference(h64, w64, labels_N, temperature=0.8)
    want, _ = actor_loss(cfg, norm, logp_BT=lp.view(B, T), entropy_BT=ent.view(B, T), **c)
    want.backward()

    h, w = hidden_NH.clone().requires_grad_(), weight_VH.clone().requires_grad_()
    token_loss = build_token_loss(cfg, norm, **c)
    loss, lp32, ent32 = linear_logprobs_loss(
        h, w, labels_N, token_loss, temperature=0.8, chunk_tokens=16
    )
    loss.backward()
    rel = lambda a, b: ((a.double() - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert rel(loss.detach(), want.detach()) <= 1e-5
    assert rel(h.grad, h64.grad) <= 1e-5 and rel(w.grad, w64.grad) <= 1e-5
    # Metrics come from actor_loss on the kernel's detached outputs; same loss value.
    with torch.no_grad():
        again, metrics = actor_loss(
            cfg, norm, logp_BT=lp32.view(B, T), entropy_BT=ent32.view(B, T), **c
        )
    assert rel(again, want.detach()) <= 1e-5
    assert metrics["actor/clipfrac_high"] > 0 and metrics["actor/clipfrac_low"] > 0  # both kinks
