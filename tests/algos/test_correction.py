"""Rollout/trainer mismatch: truncated IS, ICEPOP masking and metrics, hand-computed."""

import math

import pytest
import torch

from megatron_rl.algos import correct_mismatch, mismatch_metrics, rollout_correction
from megatron_rl.algos.metrics import masked_quantiles
from megatron_rl.config.algorithm import AlgorithmConfig
from megatron_rl.errors import ConfigError

# rho = pi_old / pi_rollout: row 0: 1, 3, 0.25; row 1: 1.5 then padding (rollout -inf).
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])
ROLLOUT = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -math.inf, -math.inf]])
OLD = ROLLOUT.clone()
OLD[0] += torch.log(torch.tensor([1.0, 3.0, 0.25]))
OLD[1, 0] += math.log(1.5)
OLD[1, 1:] = 0.0


def _close(t, value):
    assert t.item() == pytest.approx(value, rel=1e-5, abs=1e-6)


def test_token_tis_truncates_at_cap():
    c = rollout_correction(OLD, ROLLOUT, MASK, mode="token", cap=2.0)
    torch.testing.assert_close(c.weight_BT, torch.tensor([[1.0, 2.0, 0.25], [1.5, 0.0, 0.0]]))
    assert c.mask_BT is MASK
    _close(c.metrics["mismatch/capped_frac"], 1 / 4)
    _close(c.metrics["mismatch/weight_mean"], (1 + 2 + 0.25 + 1.5) / 4)


def test_sequence_tis_uses_the_product_of_ratios():
    c = rollout_correction(OLD, ROLLOUT, MASK, mode="sequence", cap=2.0)
    # row 0: 1 * 3 * 0.25 = 0.75; row 1: 1.5
    torch.testing.assert_close(c.weight_BT, torch.tensor([[0.75, 0.75, 0.75], [1.5, 0.0, 0.0]]))
    _close(c.metrics["mismatch/capped_frac"], 0.0)
    c = rollout_correction(OLD, ROLLOUT, MASK, mode="sequence", cap=1.2)
    torch.testing.assert_close(c.weight_BT, torch.tensor([[0.75, 0.75, 0.75], [1.2, 0.0, 0.0]]))
    _close(c.metrics["mismatch/capped_frac"], 1 / 4)


def test_icepop_token_masks_tokens_outside_the_band():
    c = rollout_correction(OLD, ROLLOUT, MASK, mode="icepop-token", low=0.5, high=2.0)
    # 3 and 0.25 are outside [0.5, 2]
    assert c.mask_BT.tolist() == [[1, 0, 0], [1, 0, 0]]
    torch.testing.assert_close(c.weight_BT, torch.tensor([[1.0, 0.0, 0.0], [1.5, 0.0, 0.0]]))
    _close(c.metrics["mismatch/masked_frac"], 2 / 4)


def test_icepop_sequence_masks_whole_sequences():
    c = rollout_correction(OLD, ROLLOUT, MASK, mode="icepop-sequence", low=0.5, high=2.0)
    assert c.mask_BT.tolist() == MASK.tolist()  # 0.75 and 1.5 both inside
    c = rollout_correction(OLD, ROLLOUT, MASK, mode="icepop-sequence", low=0.5, high=1.2)
    assert c.mask_BT.tolist() == [[1, 1, 1], [0, 0, 0]]
    torch.testing.assert_close(c.weight_BT, torch.tensor([[0.75, 0.75, 0.75], [0.0, 0.0, 0.0]]))
    _close(c.metrics["mismatch/masked_frac"], 1 / 4)


def test_none_mode_still_reports_the_mismatch():
    c = rollout_correction(OLD, ROLLOUT, MASK, mode="none")
    assert c.weight_BT is None and c.mask_BT is MASK
    assert "mismatch/abs_logp_diff_mean" in c.metrics


def test_mismatch_metrics():
    m = mismatch_metrics(OLD, ROLLOUT, MASK)
    _close(m["mismatch/abs_logp_diff_mean"], (0 + math.log(3) + math.log(4) + math.log(1.5)) / 4)
    k3 = [0.0, 3 - 1 - math.log(3), 0.25 - 1 + math.log(4), 1.5 - 1 - math.log(1.5)]
    _close(m["mismatch/kl_k3"], sum(k3) / 4)
    _close(m["mismatch/ratio_mean"], (1 + 3 + 0.25 + 1.5) / 4)
    _close(m["mismatch/ratio_min"], 0.25)
    _close(m["mismatch/ratio_max"], 3.0)
    # sorted 0.25, 1, 1.5, 3; linear interpolation at q * (n - 1)
    _close(m["mismatch/ratio_p50"], 1.25)
    _close(m["mismatch/ratio_p05"], 0.25 + 0.15 * 0.75)
    _close(m["mismatch/ratio_p95"], 1.5 + 0.85 * 1.5)
    assert all(torch.isfinite(v) for v in m.values())


def test_empty_mask_has_finite_metrics():
    mask = torch.zeros(2, 3, dtype=torch.long)
    for mode in ("token", "sequence", "icepop-token", "icepop-sequence"):
        c = rollout_correction(OLD, ROLLOUT, mask, mode=mode)
        assert all(torch.isfinite(v) for v in c.metrics.values()), mode
        assert (c.weight_BT == 0).all()


def test_masked_quantiles_match_torch_quantile():
    torch.manual_seed(0)
    x = torch.randn(7, 13)
    mask = torch.rand(7, 13) > 0.3
    qs = (0.0, 0.05, 0.37, 0.5, 0.95, 1.0)
    ours = torch.stack(masked_quantiles(x, mask, qs))
    torch.testing.assert_close(ours, torch.quantile(x[mask], torch.tensor(qs)))


def test_config_dispatch_and_unknown_mode():
    cfg = AlgorithmConfig(tis_mode="icepop-token", tis_low=0.5, tis_high=2.0)
    assert correct_mismatch(cfg, OLD, ROLLOUT, MASK).mask_BT.tolist() == [[1, 0, 0], [1, 0, 0]]
    with pytest.raises(ConfigError, match="icepop-token"):
        rollout_correction(OLD, ROLLOUT, MASK, mode="icepop_token")
