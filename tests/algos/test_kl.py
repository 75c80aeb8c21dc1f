"""KL estimators, entropy bonus and the composed actor loss, against hand-computed numbers."""

import math

import pytest
import torch

from megatron_rl.algos import (
    LossNormalizer,
    actor_loss,
    entropy_bonus,
    kl_estimate,
    kl_loss,
    needs_ref_logprobs,
)
from megatron_rl.config.algorithm import AlgorithmConfig
from megatron_rl.errors import ConfigError

LN2 = math.log(2.0)
# delta = log pi_ref - log pi = ln 2, -ln 2, 0
LOGP = torch.log(torch.tensor([[0.25, 0.5, 0.4]], dtype=torch.float64))
REF = torch.log(torch.tensor([[0.5, 0.25, 0.4]], dtype=torch.float64))


@pytest.mark.parametrize(
    "name,expected",
    [
        ("k1", [-LN2, LN2, 0.0]),
        ("k2", [LN2**2 / 2, LN2**2 / 2, 0.0]),
        ("k3", [2 - LN2 - 1, 0.5 + LN2 - 1, 0.0]),  # e^d - d - 1
        ("low_var_kl", [2 - LN2 - 1, 0.5 + LN2 - 1, 0.0]),
        ("abs", [LN2, LN2, 0.0]),
    ],
)
def test_estimators(name, expected):
    torch.testing.assert_close(kl_estimate(LOGP, REF, name), torch.tensor([expected], dtype=torch.float64))


def test_k3_gradient_and_clamp():
    logp = LOGP.clone().requires_grad_(True)
    kl_estimate(logp, REF, "k3").sum().backward()
    # d/dlogp (e^d - d - 1) with d = ref - logp is 1 - e^d: 1 - 2, 1 - 0.5, 0
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, 0.5, 0.0]], dtype=torch.float64))
    # |delta| = 30: e^20 - 21 (after the delta clamp) and e^-20 + 19 are clamped to 10
    logp = torch.tensor([[-30.0, 0.0]], requires_grad=True)
    kl = kl_estimate(logp, torch.tensor([[0.0, -30.0]]), "k3")
    kl.sum().backward()
    assert kl.tolist() == [[10.0, 10.0]]
    assert torch.isfinite(logp.grad).all()


def test_unknown_estimator_names_the_closest():
    with pytest.raises(ConfigError, match="k3"):
        kl_estimate(LOGP, REF, "k4")


def test_kl_loss_token_mean_ignores_padding():
    logp = torch.cat([LOGP[:, :2], torch.tensor([[-math.inf]], dtype=torch.float64)], dim=1)
    logp.requires_grad_(True)
    mask = torch.tensor([[1, 1, 0]])
    loss, m = kl_loss(logp, REF, mask, LossNormalizer(2, 1, 3), estimator="k3")
    # (0.306853 + 0.193147) / 2 = 0.25 exactly: (2 - ln2 - 1) + (0.5 + ln2 - 1) = 0.5
    assert loss.item() == pytest.approx(0.25)
    assert m["actor/kl_loss"].item() == pytest.approx(0.25)
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0


def test_needs_ref_logprobs():
    assert needs_ref_logprobs(0.0) is False
    assert needs_ref_logprobs(0.001) is True


def test_entropy_bonus():
    ent, m = entropy_bonus(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1, 1, 0]]), LossNormalizer(2, 1, 3))
    assert ent.item() == pytest.approx(1.5)
    assert m["actor/entropy"].item() == pytest.approx(1.5)


def _actor_inputs():
    old = torch.zeros(1, 2, dtype=torch.float64)
    logp = torch.log(torch.tensor([[1.1, 0.9]], dtype=torch.float64)).requires_grad_(True)
    return dict(
        logp_BT=logp,
        old_logp_BT=old,
        adv=torch.tensor([1.0], dtype=torch.float64),
        mask_BT=torch.ones(1, 2),
    )


def test_actor_loss_composes_terms():
    cfg = AlgorithmConfig(kl_coef=0.1, kl_estimator="k1", entropy_coef=0.01)
    inp = _actor_inputs()
    ref = torch.zeros(1, 2, dtype=torch.float64)
    ent = torch.tensor([[2.0, 4.0]], dtype=torch.float64)
    loss, m = actor_loss(cfg, LossNormalizer(2, 1, 2), **inp, ref_logp_BT=ref, entropy_BT=ent)
    pg = -(1.1 + 0.9) / 2  # ratios inside the clip range
    kl = (math.log(1.1) + math.log(0.9)) / 2  # k1 = logp - ref
    expected = pg + 0.1 * kl - 0.01 * 3.0
    assert loss.item() == pytest.approx(expected)
    assert m["actor/loss"].item() == pytest.approx(expected)
    assert m["actor/kl_loss"].item() == pytest.approx(kl)
    assert m["actor/entropy"].item() == pytest.approx(3.0)


def test_actor_loss_with_zero_coefficients_needs_no_reference():
    cfg = AlgorithmConfig(kl_coef=0.0, entropy_coef=0.0)
    loss, m = actor_loss(cfg, LossNormalizer(2, 1, 2), **_actor_inputs())
    assert loss.item() == pytest.approx(-1.0)
    assert "actor/kl_loss" not in m and "actor/entropy" not in m
    with pytest.raises(ValueError, match="ref_logp_BT"):
        actor_loss(AlgorithmConfig(kl_coef=0.1, entropy_coef=0.0), LossNormalizer(2, 1, 2), **_actor_inputs())
    with pytest.raises(ValueError, match="entropy_BT"):
        actor_loss(AlgorithmConfig(kl_coef=0.0, entropy_coef=0.1), LossNormalizer(2, 1, 2), **_actor_inputs())
