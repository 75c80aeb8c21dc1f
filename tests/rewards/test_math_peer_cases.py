"""The math grader against peers' own test cases (issue 10, item 7): per suite it must
agree with at least 97% of the adopted cases and never pay a case the peer scores 0.

The figures per suite, the misses and the cases left out (with reasons) print with
``.venv/bin/python tests/rewards/test_math_peer_cases.py``.
"""

from __future__ import annotations

import pytest
from math_peer_cases import LEFT_OUT, SOURCES, SUITES, THINK_REQUIRED

from megatron_rl.rewards.math import grade_math

MIN_AGREEMENT = 0.97


def agreement(suite: str) -> tuple[int, list[str], list[str]]:
    """(cases agreed, false positives, false negatives) for one suite."""
    think = THINK_REQUIRED.get(suite, set())
    agreed, false_pos, false_neg = 0, [], []
    for response, truth, expected, what in SUITES[suite]:
        score = grade_math(response, truth, require_think_close=what in think).score
        if score == expected:
            agreed += 1
        else:
            (false_pos if score > expected else false_neg).append(f"{what}: {response[-80:]!r}")
    return agreed, false_pos, false_neg


@pytest.mark.parametrize("suite", sorted(SUITES))
def test_math_peer_suite_agreement(suite):
    cases = SUITES[suite]
    agreed, false_pos, false_neg = agreement(suite)
    assert not false_pos, f"{suite}: paid answers the peer scores 0: {false_pos}"
    assert agreed / len(cases) >= MIN_AGREEMENT, f"{suite}: missed {false_neg}"


def test_math_peer_suites_name_sources_and_left_out():
    assert set(SUITES) == set(SOURCES) == set(LEFT_OUT)
    assert all(len(reason) > 10 for cases in LEFT_OUT.values() for _, reason in cases)
    assert sum(len(c) for c in SUITES.values()) >= 300


def report() -> None:
    """Per suite: adopted cases, agreement, false positives; then misses and left-out cases."""
    print(f"{'suite':16} {'cases':>5} {'agreed':>6} {'agreement':>9} {'false_pos':>9}  source")
    misses = []
    for suite in sorted(SUITES):
        agreed, false_pos, false_neg = agreement(suite)
        n = len(SUITES[suite])
        print(f"{suite:16} {n:5d} {agreed:6d} {agreed / n:9.1%} {len(false_pos):9d}  {SOURCES[suite]}")
        misses += [f"  {suite}: paid, peer scores 0: {c}" for c in false_pos]
        misses += [f"  {suite}: missed (we score 0, peer 1): {c}" for c in false_neg]
    print("\ndisagreements:" if misses else "\ndisagreements: none", *misses, sep="\n")
    counts = ", ".join(f"{suite} {len(LEFT_OUT[suite])}" for suite in sorted(LEFT_OUT))
    print(f"\nleft out ({counts}; peer case: reason):")
    for suite in sorted(LEFT_OUT):
        for case, reason in LEFT_OUT[suite]:
            print(f"  {suite}: {' '.join(case.split())[:90]}: {reason}")


if __name__ == "__main__":
    report()
