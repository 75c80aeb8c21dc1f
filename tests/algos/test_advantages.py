"""Advantage estimators against hand-computed numbers (groups interleaved, ids arbitrary)."""

import math

import pytest
import torch

from megatron_rl.algos import (
    compute_advantages,
    dr_grpo_advantages,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from megatron_rl.algos.metrics import advantage_metrics
from megatron_rl.config.algorithm import AlgorithmConfig

# Three groups, interleaved, with non-contiguous ids:
#   group 5: rewards 1, 0, 0, 0   mean 0.25, centred  .75 -.25 -.25 -.25, unbiased std 0.5
#   group 2: rewards 2, 0         mean 1,    centred  1 -1,                unbiased std sqrt(2)
#   group 9: rewards .1 .1 .1     all equal -> exactly 0 (float mean is 0.10000000000000002)
GROUP = torch.tensor([5, 2, 5, 9, 5, 2, 9, 5, 9])
REWARD = torch.tensor([1.0, 2.0, 0.0, 0.1, 0.0, 0.0, 0.1, 0.0, 0.1])
CENTRED = [0.75, 1.0, -0.25, 0.0, -0.25, -1.0, 0.0, -0.25, 0.0]


def test_grpo_divides_by_group_std():
    s2 = math.sqrt(2.0)
    expected = [1.5, 1 / s2, -0.5, 0.0, -0.5, -1 / s2, 0.0, -0.5, 0.0]
    torch.testing.assert_close(grpo_advantages(REWARD, GROUP), torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_grpo_without_std_is_dr_grpo():
    expected = torch.tensor(CENTRED)
    torch.testing.assert_close(grpo_advantages(REWARD, GROUP, norm_by_std=False), expected)
    torch.testing.assert_close(dr_grpo_advantages(REWARD, GROUP), expected)


def test_rloo_leave_one_out():
    # group 5: 1 - mean(0,0,0) = 1; 0 - mean(1,0,0) = -1/3.  group 2: 2 - 0 = 2; 0 - 2 = -2.
    expected = [1.0, 2.0, -1 / 3, 0.0, -1 / 3, -2.0, 0.0, -1 / 3, 0.0]
    torch.testing.assert_close(rloo_advantages(REWARD, GROUP), torch.tensor(expected))


def test_reinforce_pp_group_baseline_then_batch_std():
    # sum of squares of centred values = 3 * .0625 + .5625 + 2 = 2.75 over 9 samples
    batch_std = math.sqrt(2.75 / 8)  # 0.586302...
    expected = torch.tensor(CENTRED) / batch_std
    torch.testing.assert_close(reinforce_pp_advantages(REWARD, GROUP), expected, atol=1e-5, rtol=1e-5)


ALL = [grpo_advantages, dr_grpo_advantages, rloo_advantages, reinforce_pp_advantages]


@pytest.mark.parametrize("fn", ALL)
def test_zero_variance_groups_are_exactly_zero(fn):
    reward = torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0, 0.3])  # last one is a group of one
    group = torch.tensor([0, 0, 0, 1, 1, 2])
    adv = fn(reward, group)
    assert not adv.isnan().any()
    assert (adv == 0).all(), adv


@pytest.mark.parametrize("fn", ALL)
def test_zero_variance_group_stays_zero_beside_informative_ones(fn):
    adv = fn(REWARD, GROUP)
    assert (adv[GROUP == 9] == 0).all()
    assert (adv[GROUP != 9] != 0).all()


@pytest.mark.parametrize("fn", ALL)
def test_empty_batch_and_integer_rewards(fn):
    assert fn(torch.zeros(0), torch.zeros(0, dtype=torch.long)).numel() == 0
    adv = fn(torch.tensor([1, 0, 1, 1]), torch.tensor([0, 0, 1, 1]))
    assert adv.dtype == torch.float32
    assert adv[2:].eq(0).all() and adv[0] > 0 > adv[1]


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long))


def test_compute_advantages_follows_config():
    cfg = AlgorithmConfig(adv_estimator="grpo", norm_adv_by_std=False)
    torch.testing.assert_close(compute_advantages(cfg, REWARD, GROUP), torch.tensor(CENTRED))
    cfg = AlgorithmConfig(adv_estimator="rloo")
    torch.testing.assert_close(compute_advantages(cfg, REWARD, GROUP), rloo_advantages(REWARD, GROUP))


def test_advantage_metrics():
    m = advantage_metrics(torch.tensor([1.0, -1.0, 0.0, 0.0]))
    assert m["adv/mean"].item() == 0.0
    assert m["adv/min"].item() == -1.0 and m["adv/max"].item() == 1.0
    assert m["adv/zero_frac"].item() == 0.5
    assert m["adv/std"].item() == pytest.approx(math.sqrt(2 / 3))
    assert advantage_metrics(torch.zeros(0))["adv/mean"].item() == 0.0
