"""pass@k, avg@n, maj@n against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from megatron_rl.eval.metrics import (
    ProblemSamples,
    maj_at_n,
    majority_index,
    math_answer,
    mean_with_interval,
    pass_at_k,
    pass_k_values,
    summarize,
)


def test_pass_at_k_hand_values():
    # n=4, c=1: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6; pass@3 = 1 - 1/4; pass@4 = 1.
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 1, 3) == pytest.approx(0.75)
    assert pass_at_k(4, 1, 4) == 1.0
    # n=16, c=3, k=8: 1 - C(13,8)/C(16,8) = 1 - 1287/12870 = 0.9
    assert pass_at_k(16, 3, 8) == pytest.approx(0.9)
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)


def test_pass_at_k_all_correct_all_wrong():
    assert all(pass_at_k(8, 8, k) == 1.0 for k in range(1, 9))
    assert all(pass_at_k(8, 0, k) == 0.0 for k in range(1, 9))


def test_pass_at_k_refuses_k_above_n_and_bad_counts():
    with pytest.raises(ValueError, match="cannot be estimated from 2 samples"):
        pass_at_k(2, 0, 4)
    with pytest.raises(ValueError, match="k > n"):
        pass_at_k(2, 2, 3)  # even all-correct: n < k is refused, not 1.0
    with pytest.raises(ValueError):
        pass_at_k(2, 3, 1)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 0)


def test_pass_k_values():
    assert pass_k_values(1) == [1]
    assert pass_k_values(16) == [1, 2, 4, 8, 16]
    assert pass_k_values(6) == [1, 2, 4, 6]


def test_majority_votes_and_ties():
    assert majority_index(["3", "4", "4", None]) == 1
    assert majority_index([None, None]) is None
    # tie 2-2 between "5" (first at 1) and "7" (first at 0): the earliest answer wins
    assert majority_index(["7", "5", "5", "7"]) == 0
    assert majority_index([None, "5", "7", "7", "5"]) == 1
    assert maj_at_n(["7", "5", "5", "7"], [False, True, True, False]) == 0.0
    assert maj_at_n(["5", "7", "7", "5"], [True, False, False, True]) == 1.0
    assert maj_at_n(["1", "2", "2"], [True, False, False]) == 0.0  # majority wrong, one right
    assert maj_at_n([None, None, "9"], [False, False, True]) == 1.0  # no-answers do not vote
    assert maj_at_n([None, None], [False, False]) == 0.0
    assert maj_at_n(["4"] * 3, [True] * 3) == 1.0 and maj_at_n(["4"] * 3, [False] * 3) == 0.0
    with pytest.raises(ValueError):
        maj_at_n(["1"], [True, False])


def test_math_answer_normalises_for_the_vote():
    assert math_answer(r"so \boxed{\dfrac{1}{2}}") == math_answer(r"\boxed{\frac{1}{2}}")
    assert math_answer("no box here") is None
    assert math_answer(r"<think>\boxed{3}") is None  # cut off while thinking


def test_interval_normal_approximation_over_problems():
    # per-problem accuracies 0.25, 0.5, 0.75: mean 0.5, sd 0.25, se 0.25/sqrt(3)
    iv = mean_with_interval([0.25, 0.5, 0.75])
    half = 1.959963984540054 * 0.25 / math.sqrt(3)
    assert iv.mean == 0.5 and iv.low == pytest.approx(0.5 - half) and iv.high == pytest.approx(0.5 + half)
    assert mean_with_interval([0.0, 0.5, 1.0]).low == 0.0  # clipped to [0, 1]
    assert mean_with_interval([1.0, 1.0]).low == 1.0  # no spread: zero width, clipped to [0, 1]
    assert mean_with_interval([0.25]).low is None  # one problem: undefined


def test_summarize_hand_computed():
    a = ProblemSamples([True, False, False, False], [3, 5, 5, 7], [False, False, False, True],
                       answers=["1", "2", "2", None])
    b = ProblemSamples([True, True, True, True], [2, 2, 2, 2], [False] * 4, answers=["9"] * 4)
    m = summarize([a, b])
    assert m.problems == 2 and m.n == 4
    assert m.avg.mean == pytest.approx((0.25 + 1.0) / 2)
    assert m.pass_at == pytest.approx({1: 0.625, 2: 0.75, 4: 1.0})
    assert m.maj == 0.5  # a: majority "2" is wrong; b: right
    assert m.length_mean == pytest.approx(28 / 8) and m.truncated == pytest.approx(1 / 8)
    code = summarize([ProblemSamples([False, False], [1, 1], [False, False])])
    assert code.maj is None and code.pass_at == {1: 0.0, 2: 0.0}
    with pytest.raises(ValueError):
        summarize([a], ks=[8])


def test_trainer_eval_metrics_use_the_same_functions():
    from megatron_rl.trainer.metrics import eval_metrics
    from megatron_rl.trainer.samples import ScoredSample

    def s(uid, i, text, score, source, finish="stop"):
        return ScoredSample(uid=uid, group=uid, sample_index=i, prompt_ids=[1], response_ids=[2] * (i + 1),
                            rollout_logprobs=[0.0] * (i + 1), finish_reason=finish, data_source=source,
                            score=score, extra={"text": text})

    groups = [[s(0, 0, r"\boxed{4}", 1.0, "math"), s(0, 1, r"\boxed{5}", 0.0, "math"),
               s(0, 2, r"\boxed{5}", 0.0, "math", "length")],
              [s(1, 0, "x", 0.0, "kodcode"), s(1, 1, "y", 1.0, "kodcode"), s(1, 2, "z", 1.0, "kodcode")]]
    m = eval_metrics(groups, [1, 2])
    assert m["eval/math/accuracy"] == pytest.approx(1 / 3) and m["eval/kodcode/accuracy"] == pytest.approx(2 / 3)
    assert m["eval/accuracy"] == pytest.approx(0.5) and m["eval/pass@2"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["eval/math/maj@3"] == 0.0 and "eval/kodcode/maj@3" not in m and "eval/maj@3" not in m
    assert m["eval/math/truncated"] == pytest.approx(1 / 3) and m["eval/length_mean"] == 2.0
    assert m["eval/accuracy_ci95_low"] <= 0.5 <= m["eval/accuracy_ci95_high"] and m["eval/problems"] == 2
