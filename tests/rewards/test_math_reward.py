"""Math reward: the case table, extraction details, and the worker's time limit."""

from __future__ import annotations

import logging
import os
import signal
import threading

import pytest
from math_cases import CASES

from megatron_rl.rewards.math import compute_score, grade_math, grade_math_isolated
from megatron_rl.rewards.math_extract import final_answer, last_boxed, normalize
from megatron_rl.rewards.worker import WorkerProcess


def test_case_table_is_large_and_balanced():
    assert len(CASES) >= 150
    traps = [c for c in CASES if "trap" in c[3]]
    assert len(traps) >= 40 and all(c[2] == 0.0 for c in traps)


@pytest.mark.parametrize("response,truth,expected,what", CASES, ids=[c[3] for c in CASES])
def test_math_case(response, truth, expected, what):
    grade = grade_math(response, truth)
    assert grade.score == expected, f"{what}: {grade.reason}"


def test_format_errors_have_reasons():
    assert grade_math("<think>still going", "1").reason == "unclosed_think"
    assert grade_math("</think> 1", "1").reason == "no_boxed_answer"
    assert grade_math("</think> \\boxed{2}", "1").reason.startswith("wrong_answer")


@pytest.mark.parametrize("response,default,required", [
    ("Let me think... so maybe \\boxed{42}", 1.0, 0.0),  # R1 template: cut off mid-thought
    ("reasoning</think> \\boxed{42}", 1.0, 1.0),  # opening tag sat in the prompt
    ("<think>r</think> \\boxed{42}", 1.0, 1.0),
    ("<think>still going \\boxed{42}", 0.0, 0.0),
    ("reasoning</think> \\boxed{41}", 0.0, 0.0),
])
def test_require_think_close(response, default, required):
    assert grade_math(response, "42").score == default
    grade = grade_math(response, "42", require_think_close=True)
    assert grade.score == required
    if "</think>" not in response:
        assert grade.reason == "no_think_close"


def test_compute_score_passes_require_think_close():
    assert compute_score("maybe \\boxed{7}", "7") == 1.0
    assert compute_score("maybe \\boxed{7}", "7", require_think_close=True) == 0.0
    assert compute_score("done</think> \\boxed{7}", "7", require_think_close=True) == 1.0


def test_last_boxed_nested_and_fbox():
    assert last_boxed("\\boxed{\\frac{a}{b^{2}}}") == "\\frac{a}{b^{2}}"
    assert last_boxed("\\boxed{1} then \\fbox{2}") == "2"
    assert last_boxed("\\fbox{1} then \\boxed{2}") == "2"
    assert last_boxed("\\boxed{unclosed") is None
    assert final_answer("a</think>b</think>\\boxed{3}") == "3"


@pytest.mark.parametrize("raw,norm", [
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("90^\\circ", "90"),
    ("12,345", "12345"),
    ("50\\%", "50"),
    ("x = 5", "5"),
    ("\\text{(B)}", "(B)"),
    ("10 \\text{ cm}", "10"),
    ("1,2", "1,2"),
])
def test_normalize(raw, norm):
    assert normalize(raw) == norm


def test_compute_score_in_worker_accepts_lists():
    assert compute_score("</think> so \\boxed{\\frac{3}{6}}", ["0.4", "\\frac12"]) == 1.0
    assert compute_score("</think> so \\boxed{0.4}", "\\frac12") == 0.0


def test_compute_score_from_a_thread():
    # math-verify's signal.alarm raises off the main thread; the worker keeps it on one.
    out: list[float] = []
    t = threading.Thread(target=lambda: out.append(compute_score("\\boxed{x=2}", "2")))
    t.start()
    t.join()
    assert out == [1.0]


def test_timeout_kills_worker_logs_and_recovers(caplog):
    worker = WorkerProcess(memory_limit_bytes=1 << 30)
    try:
        with caplog.at_level(logging.WARNING, logger="megatron_rl.rewards.math"):
            # Each reference stays under math-verify's own alarm, but together they take far
            # longer than the call's limit: only the hard kill of the worker stops them.
            refs = [f"\\frac{{{i}}}{{7}}+y" for i in range(3000)]
            grade = grade_math_isolated("</think>\\boxed{x^2+1}", refs, timeout_s=1.5,
                                        worker=worker)
        assert grade.score == 0.0
        assert grade.reason.startswith("grader_error: timeout")
        assert any("timeout" in r.getMessage() for r in caplog.records)
        again = grade_math_isolated("</think>\\boxed{5}", "5", timeout_s=30, worker=worker)
        assert again.score == 1.0 and worker.restarts == 1
    finally:
        worker.close()


def test_worker_refuses_foreign_targets():
    worker = WorkerProcess()
    try:
        ok, reason = worker.call("os:system", ("true",), None, 30)
        assert not ok and "refuses" in reason
    finally:
        worker.close()


def test_worker_crash_scores_zero_and_recovers(caplog):
    worker = WorkerProcess(memory_limit_bytes=1 << 30)
    try:
        assert grade_math_isolated("</think>\\boxed{1}", "1", worker=worker).score == 1.0
        pid = worker._proc.pid  # the live worker process
        refs = [f"\\frac{{{i}}}{{7}}+y" for i in range(3000)]  # keeps it busy for a while
        killer = threading.Timer(0.5, os.kill, args=(pid, signal.SIGKILL))
        killer.start()
        with caplog.at_level(logging.WARNING, logger="megatron_rl.rewards.math"):
            grade = grade_math_isolated("</think>\\boxed{x^2+1}", refs, timeout_s=60, worker=worker)
        killer.join()
        assert grade.score == 0.0 and grade.reason.startswith("grader_error: worker crashed")
        assert "worker crashed" in caplog.text
        assert grade_math_isolated("</think>\\boxed{2}", "2", worker=worker).score == 1.0
    finally:
        worker.close()
