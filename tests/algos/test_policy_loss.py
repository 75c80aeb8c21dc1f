"""PPO / GSPO clipped losses and every aggregation mode, against hand-computed numbers."""

import math

import pytest
import torch

from megatron_rl.algos import LossNormalizer, build_normalizer, gspo_loss, ppo_loss

# Two sequences, three token slots; the last slot of row 1 is padding with a garbage
# (-inf) log-prob that must not leak into anything.
#   ratios row 0 (A = +1): 1.5  0.5  1.1
#   ratios row 1 (A = -2): 0.7  1.3  pad
RATIO = torch.tensor([[1.5, 0.5, 1.1], [0.7, 1.3, 1.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ADV = torch.tensor([1.0, -2.0], dtype=torch.float64)
NORM = LossNormalizer(num_tokens=5, num_seqs=2, max_len=4)


def _inputs():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.2, -math.inf]], dtype=torch.float64)
    logp = (old + RATIO.log()).clone().requires_grad_(True)
    return logp, old


# Per-token losses with clip 0.2 (hand): row 0: -min(r, clip r) = -1.2 (clipped), -0.5, -1.1
#                                        row 1: 2 * max(r, clip r) = 1.6 (clipped), 2.6
# token sum 1.4; row sums -2.8, 4.2; row means -2.8/3, 2.1
@pytest.mark.parametrize(
    "mode,expected",
    [
        ("token-mean", 1.4 / 5),
        ("seq-mean-token-sum", (-2.8 + 4.2) / 2),
        ("seq-mean-token-mean", (-2.8 / 3 + 2.1) / 2),
        ("seq-mean-token-sum-norm", 1.4 / (2 * 4)),
    ],
)
def test_ppo_loss_each_aggregation(mode, expected):
    logp, old = _inputs()
    loss, _ = ppo_loss(logp, old, ADV, MASK, NORM, agg_mode=mode)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_ppo_gradient_is_zero_exactly_where_clipped():
    logp, old = _inputs()
    loss, _ = ppo_loss(logp, old, ADV, MASK, NORM, agg_mode="token-mean")
    loss.backward()
    # d/dlogp (-A r) = -A r unclipped, 0 clipped; / 5 tokens
    expected = torch.tensor([[0.0, -0.5 / 5, -1.1 / 5], [0.0, 2 * 1.3 / 5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected)


def test_ppo_metrics():
    logp, old = _inputs()
    _, m = ppo_loss(logp, old, ADV, MASK, NORM)
    assert m["actor/clipfrac_high"].item() == pytest.approx(1 / 5)  # 1.5 with A > 0
    assert m["actor/clipfrac_low"].item() == pytest.approx(1 / 5)  # 0.7 with A < 0
    assert m["actor/clipfrac_dual"].item() == 0.0
    assert m["actor/ratio_mean"].item() == pytest.approx(5.1 / 5)
    assert m["actor/ppo_kl"].item() == pytest.approx(-math.log(1.5 * 0.5 * 1.1 * 0.7 * 1.3) / 5)
    assert m["actor/pg_loss"].item() == pytest.approx(1.4 / 5)


def test_clip_higher_is_asymmetric():
    logp, old = _inputs()
    loss, m = ppo_loss(logp, old, ADV, MASK, NORM, clip_low=0.2, clip_high=0.28)
    # 1.5 is now clipped at 1.28 instead of 1.2; 0.7 still at 0.8
    assert loss.item() == pytest.approx((-1.28 - 0.5 - 1.1 + 1.6 + 2.6) / 5)
    assert m["actor/clipfrac_high"].item() == pytest.approx(1 / 5)
    loss, m = ppo_loss(logp, old, ADV, MASK, NORM, clip_low=0.35, clip_high=0.6)
    # nothing clipped now: 0.7 > 0.65 and 1.5 < 1.6
    assert loss.item() == pytest.approx((-1.5 - 0.5 - 1.1 + 1.4 + 2.6) / 5)
    assert m["actor/clipfrac_low"].item() == 0.0 and m["actor/clipfrac_high"].item() == 0.0


def test_dual_clip_caps_negative_advantage_loss():
    old = torch.zeros(1, 2, dtype=torch.float64)
    logp = torch.tensor([[math.log(5.0), math.log(2.0)]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([-1.0], dtype=torch.float64)
    norm = LossNormalizer(2, 1, 2)
    loss, m = ppo_loss(logp, old, adv, torch.ones(1, 2), norm, dual_clip_c=3.0)
    # ratio 5: min(max(5, 1.2), 3) = 3 (no gradient); ratio 2: max(2, 1.2) = 2
    assert loss.item() == pytest.approx((3 + 2) / 2)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 2.0 / 2]], dtype=torch.float64))
    assert m["actor/clipfrac_dual"].item() == pytest.approx(0.5)
    plain, _ = ppo_loss(logp, old, adv, torch.ones(1, 2), norm)
    assert plain.item() == pytest.approx((5 + 2) / 2)


def test_importance_weights_multiply_token_losses():
    logp, old = _inputs()
    w = torch.tensor([[2.0, 1.0, 1.0], [0.5, 1.0, 123.0]], dtype=torch.float64)
    loss, _ = ppo_loss(logp, old, ADV, MASK, NORM, weight_BT=w)
    assert loss.item() == pytest.approx((-2.4 - 0.5 - 1.1 + 0.8 + 2.6) / 5)


def test_per_token_advantages_accepted():
    logp, old = _inputs()
    a1, _ = ppo_loss(logp, old, ADV, MASK, NORM)
    a2, _ = ppo_loss(logp, old, ADV[:, None].expand(2, 3), MASK, NORM)
    assert a1.item() == pytest.approx(a2.item())


# GSPO: s0 = (1.5 * .5 * 1.1)^(1/3) = 0.825^(1/3), s1 = (.7 * 1.3)^(1/2) = .91^(1/2)
S0, S1 = 0.825 ** (1 / 3), 0.91**0.5


def test_gspo_sequence_ratio_value_and_gradient():
    logp, old = _inputs()
    loss, m = gspo_loss(logp, old, ADV, MASK, NORM, clip_low=0.2, clip_high=0.2)
    # both ratios inside [0.8, 1.2]: per-seq loss -A s; seq-mean-token-mean
    assert loss.item() == pytest.approx((-S0 + 2 * S1) / 2)
    loss.backward()
    # GSPO gradient: -A_i s_i / |y_i| / num_seqs on each valid token
    expected = torch.tensor([[-S0 / 3 / 2] * 3, [2 * S1 / 2 / 2] * 2 + [0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected)
    assert m["actor/ratio_mean"].item() == pytest.approx((3 * S0 + 2 * S1) / 5)


def test_gspo_token_form_matches_direct_sequence_objective():
    torch.manual_seed(0)
    old = torch.randn(3, 6, dtype=torch.float64) - 2
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5])
    logp = (old + 0.05 * torch.randn(3, 6, dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([0.7, -1.2, 0.4], dtype=torch.float64)
    loss, _ = gspo_loss(logp, old, adv, mask, LossNormalizer(11, 3, 6), clip_low=0.5, clip_high=0.5)
    (g_ours,) = torch.autograd.grad(loss, logp)
    # direct: s_i = exp(mean over valid tokens of (logp - old)), loss = mean_i -A_i s_i
    m = mask.bool()
    s = ((logp - old).where(m, 0).sum(-1) / m.sum(-1)).exp()
    (g_direct,) = torch.autograd.grad((-adv * s).mean(), logp)
    torch.testing.assert_close(g_ours, g_direct)


def test_gspo_default_clip_range_clips_sequences():
    logp, old = _inputs()
    _, m = gspo_loss(logp, old, ADV, MASK, NORM)  # (3e-4, 4e-4)
    # row 1: A < 0 and s1 = .954 < 1 - 3e-4 -> its 2 tokens are clipped; row 0 has A > 0
    assert m["actor/clipfrac_low"].item() == pytest.approx(2 / 5)
    assert m["actor/clipfrac_high"].item() == 0.0


@pytest.mark.parametrize("fn", [ppo_loss, gspo_loss])
@pytest.mark.parametrize(
    "mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
)
def test_empty_mask_gives_zero_loss_and_finite_gradient(fn, mode):
    old = torch.full((2, 3), -math.inf, dtype=torch.float64)
    logp = torch.full((2, 3), -math.inf, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    norm = build_normalizer([mask], max_len=3)
    assert norm.num_tokens == 0 and norm.num_seqs == 0
    loss, m = fn(logp, old, ADV, mask, norm, agg_mode=mode)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(logp.grad).all() and (logp.grad == 0).all()
    assert all(torch.isfinite(v) for v in m.values())


def test_build_normalizer_counts_over_micro_batches():
    masks = [torch.tensor([[1, 1, 0], [0, 0, 0]]), torch.tensor([[1, 1, 1, 1]])]
    norm = build_normalizer(masks, max_len=8)
    # 2 + 0 + 4 tokens; the all-masked row is not a sequence
    assert (norm.num_tokens, norm.num_seqs, norm.max_len, norm.dp_size) == (6, 2, 8, 1)
    with pytest.raises(ValueError):
        build_normalizer(masks, max_len=0)
