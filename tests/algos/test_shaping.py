"""DAPO dynamic sampling, DAPO soft overlong penalty, DeepCoder overlong filtering."""

import pytest
import torch

from megatron_rl.algos import build_normalizer, dynamic_sampling, overlong_filter, overlong_penalty
from megatron_rl.errors import ConfigError

GROUPS = [("a", [1, 0]), ("b", [1, 1]), ("c", [0, 0]), ("d", [0.5, 1]), ("e", [1, 0])]


def _rewards(group):
    return group[1]


def test_dynamic_sampling_keeps_informative_groups_up_to_target():
    res = dynamic_sampling(GROUPS, _rewards, target_num_groups=2)
    assert [g[0] for g in res.kept] == ["a", "d"]
    assert res.num_needed == 0
    assert res.metrics == {
        "sampling/groups_in": 5.0,
        "sampling/groups_kept": 2.0,
        "sampling/groups_dropped": 2.0,
        "sampling/groups_needed": 0.0,
    }


def test_dynamic_sampling_reports_shortfall_and_is_idempotent():
    res = dynamic_sampling(GROUPS, _rewards, target_num_groups=4)
    assert [g[0] for g in res.kept] == ["a", "d", "e"]
    assert res.num_needed == 1
    # the trainer refills: previously kept groups plus a new round
    res2 = dynamic_sampling(res.kept + [("f", [0, 0]), ("g", [0, 1])], _rewards, 4)
    assert [g[0] for g in res2.kept] == ["a", "d", "e", "g"] and res2.num_needed == 0
    assert dynamic_sampling([], _rewards, 3).num_needed == 3


def test_dynamic_sampling_tolerance():
    res = dynamic_sampling(GROUPS, _rewards, target_num_groups=5, tol=0.5)
    assert [g[0] for g in res.kept] == ["a", "e"]  # d spans exactly 0.5


def test_overlong_penalty_ramp():
    lengths = torch.tensor([5, 6, 7, 8, 10, 12])
    # max 10, buffer 4: free up to 6 tokens, then -1/4 per token, -1 at 10 and beyond
    pen, m = overlong_penalty(lengths, max_len=10, buffer_len=4)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    assert m["overlong/penalised_frac"].item() == pytest.approx(4 / 6)
    assert m["overlong/penalty_mean"].item() == pytest.approx(-2.75 / 6)
    pen, _ = overlong_penalty(lengths, max_len=10, buffer_len=4, penalty=0.5)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.125, -0.25, -0.5, -0.5]))


def test_overlong_penalty_off_and_invalid():
    pen, _ = overlong_penalty(torch.tensor([10, 3]), max_len=10, buffer_len=0)
    assert (pen == 0).all()
    with pytest.raises(ConfigError, match="overlong_buffer_len"):
        overlong_penalty(torch.tensor([1]), max_len=10, buffer_len=11)


def test_overlong_filter_masks_truncated_samples_out_of_the_normaliser():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    new, m = overlong_filter(mask, torch.tensor([False, True, False]))
    assert new.tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0]]
    assert m["overlong/filtered_frac"].item() == pytest.approx(1 / 3)
    norm = build_normalizer([new], max_len=3)
    assert (norm.num_tokens, norm.num_seqs) == (3, 2)
