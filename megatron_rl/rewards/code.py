"""Code reward (DeepCoder semantics): 1.0 only when every test passes, else 0.0.

The program is the last fenced Python block of the response (after ``</think>`` when the
response closes a think block). Tests run one at a time in a sandbox
(``sandbox_setup``/``sandbox``) and grading stops at the first failure, so a wrong or
looping program costs one test's timeout, not all of them. Only the parent compares
outputs; the sandbox never sees the expected answers. Assert-based tests run here too
(``code_asserts``): the sandbox only answers calls with plain data, so no verdict crosses
from the candidate (docs/code_grader.md).

A sandbox that does not start, or whose driver reports its own failure, gives a
``grader_error`` grade (unknown, masked by the trainer); anything the candidate's code does,
killing or stopping the driver included, gives an ordinary 0.0.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from megatron_rl.rewards.code_asserts import CandidateFailed, DriverFailed, run_assert_test
from megatron_rl.rewards.code_tests import TestSpec, parse_tests, stdout_matches, values_match
from megatron_rl.rewards.grade import CORRECT, Grade, fail, grader_error
from megatron_rl.rewards.sandbox import SandboxRun, SandboxStartError
from megatron_rl.rewards.sandbox_setup import SandboxLimits, detect

logger = logging.getLogger(__name__)

# A fence, its language tag, the body up to the next fence. Blocks tagged with another
# language (```cpp) are not Python answers and are skipped.
_ANY_FENCE = re.compile(r"```[ \t]*([\w+#-]*)[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str | None:
    """The last fenced Python (or untagged) block, after the last ``</think>`` if any."""
    if "</think>" in response:
        response = response.rsplit("</think>", 1)[1]
    blocks = [
        body for tag, body in _ANY_FENCE.findall(response)
        if tag.lower() in ("", "python", "python3", "py")
    ]
    return blocks[-1] if blocks and blocks[-1].strip() else None


def _test_passes(spec: TestSpec, i: int, rec: dict[str, Any]) -> bool:
    if spec.mode == "stdio":
        return stdout_matches(rec.get("stdout", ""), spec.expected[i], spec.float_tol)
    try:
        got = json.loads(rec.get("payload", ""))
    except ValueError:
        return False
    return values_match(got, spec.expected[i], spec.float_tol, spec.taco_style)


def _assert_tests(spec: TestSpec, run: SandboxRun, timeout_s: float) -> Grade:
    assert spec.test_code is not None
    for i, code in enumerate(spec.test_code):
        try:
            run_assert_test(run, code, spec.entry_point, timeout_s)
        except CandidateFailed as e:
            return fail(f"{e}".split(":", 1)[0] + f": test {i}: {str(e).split(':', 1)[-1][-300:]}")
        except DriverFailed as e:
            return grader_error(f"sandbox driver failed on test {i}: {e}")
        except Exception as e:  # the test's own assert (or an error it did not expect)
            return fail(f"wrong_answer: test {i}: {type(e).__name__}: {str(e)[-200:]}")
    return CORRECT


def grade_code(
    response: str,
    tests: dict[str, Any] | str,
    *,
    timeout_s: float = 6.0,
    limits: SandboxLimits | None = None,
    backend: str = "auto",
) -> Grade:
    """Grade ``response`` against ``tests``; see ``compute_score``. Raises DataError for
    malformed tests; everything the program does becomes a zero Grade with a reason."""
    spec = parse_tests(tests)
    source = extract_code(response)
    if source is None:
        return fail("no_code_block")
    setup = detect(backend)
    # Neither expected values nor test code enter the job: the sandbox can read its files.
    job: dict[str, Any] = {"mode": spec.mode, "source": source, "inputs": spec.inputs,
                           "timeout_s": float(timeout_s), "fn_name": spec.fn_name}
    try:
        run = SandboxRun(setup, job, limits or SandboxLimits())
    except SandboxStartError as e:
        return grader_error(str(e))
    with run:
        if spec.mode == "assert":
            return _assert_tests(spec, run, timeout_s)
        for i in range(len(spec)):
            rec = run.run_test(i, timeout_s)
            status = rec.get("status")
            if status == "driver_error":
                return grader_error(f"sandbox driver failed on test {i}: {rec.get('detail', '')[-300:]}")
            if status == "error":
                return fail(f"runtime_error: test {i}: {rec.get('detail', '')[-300:]}")
            if status != "done":
                return fail(f"{status}: test {i} {rec.get('detail', '')}".rstrip())
            if not _test_passes(spec, i, rec):
                return fail(f"wrong_answer: test {i}")
    return CORRECT


def compute_score(response: str, tests: dict[str, Any] | str, *, timeout_s: float = 6.0) -> float:
    """1.0 if the response's last Python block passes every test, else 0.0.

    ``tests`` is a stdin/stdout, call-based or assert-based test dict (``code_tests``).
    ``timeout_s`` is the wall-clock limit per test (DeepCoder uses 6 s). The sandbox is the
    strongest backend this machine offers (``sandbox_setup.detect``). Malformed tests raise
    DataError; a failing, crashing or hostile program scores 0.0 and the reason is logged.
    """
    grade = grade_code(response, tests, timeout_s=timeout_s)
    if grade.score == 0.0:
        logger.debug("code reward 0: %s", grade.reason)
    return grade.score
