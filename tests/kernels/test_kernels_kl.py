"""KL estimators of megatron_rl.kernels: the maths of megatron_rl.algos.kl, exactly.

The loss uses algos.kl; kernels.kl exports the same element-wise terms for kernel-side
users. These tests pin the two together so that they cannot drift apart.
"""

import math

import pytest
import torch
from megatron_rl.kernels import KL_ESTIMATORS, kl_estimate, kl_k1, kl_k2, kl_k3

from megatron_rl.algos import kl as algos_kl


def _logprob_pairs():
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(257, generator=gen) * 8
    ref = logp + torch.randn(257, generator=gen) * 2
    # Extremes: ratio far beyond e^20 either way (the clamps), and equal log-probs.
    logp = torch.cat([logp, torch.tensor([-50.0, -1.0, -3.0])])
    ref = torch.cat([ref, torch.tensor([-1.0, -50.0, -3.0])])
    return logp, ref


def test_same_names_and_values_as_algos_kl():
    assert set(KL_ESTIMATORS) == set(algos_kl.KL_ESTIMATORS)
    logp, ref = _logprob_pairs()
    for name in KL_ESTIMATORS:
        ours = kl_estimate(logp, ref, name)
        theirs = algos_kl.kl_estimate(logp, ref, name)
        assert torch.equal(ours, theirs), name


def test_estimator_properties():
    logp, ref = _logprob_pairs()
    assert torch.equal(kl_k1(logp, ref), logp - ref)
    assert (kl_k2(logp, ref) >= 0).all()
    k3 = kl_k3(logp, ref)
    assert (k3 >= 0).all() and (k3 <= 10).all()
    assert k3[-1] == 0  # equal log-probs: no divergence
    # Small deltas: k3 ~ delta^2 / 2, i.e. ~ k2 (Schulman's second-order agreement). In
    # float64: exp(d) - d - 1 cancels catastrophically in fp32 for |d| < ~1e-2.
    d = torch.tensor([1e-3], dtype=torch.float64)
    assert math.isclose(kl_k3(d, 0 * d).item(), kl_k2(d, 0 * d).item(), rel_tol=1e-2)


def test_k3_gradient_finite_at_extremes():
    logp, ref = _logprob_pairs()
    logp.requires_grad_()
    kl_k3(logp, ref).sum().backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[-3] == 0 and logp.grad[-2] == 0  # clamped: no gradient, no NaN


def test_unknown_estimator():
    with pytest.raises(ValueError, match="low_var_kl"):
        kl_estimate(torch.zeros(1), torch.zeros(1), "k4")
