"""Math reward (DeepScaleR semantics): 1.0 for a correct final answer, else 0.0.

The final answer is the last ``\\boxed{...}`` after ``</think>`` (``math_extract``); it is
correct when it is equivalent to any of the reference answers (``math_equiv``:
normalisation, then sympy, then math-verify). No partial credit and no format bonus.

Thinking format (``require_think_close``): with templates that put ``<think>`` in the prompt
(DeepSeek-R1-Distill), a response carries only the closing tag, and one cut off mid-thought
carries neither; its last ``\\boxed{}`` is a tentative answer inside the reasoning. Callers
training thinking models pass ``require_think_close=True``: a response without ``</think>``
then scores 0.0 ("no_think_close"), as DeepScaleR does. The default (False) grades responses
without any think tags on their last box, for models that do not think in tags.

``compute_score`` runs the whole check in a worker process (``worker``) under a hard time
limit, because symbolic checks can hang in C code; a timeout or a grader crash scores 0.0
and logs the reason, it never raises into the trainer. ``grade_math`` is the same check
in the calling process, for code that already runs in a worker (``RewardPool``).
"""

from __future__ import annotations

import atexit
import logging
import threading

from megatron_rl.rewards.grade import CORRECT, Grade, fail
from megatron_rl.rewards.math_equiv import is_equivalent
from megatron_rl.rewards.math_extract import final_answer, ground_truth_answer
from megatron_rl.rewards.worker import WorkerProcess

logger = logging.getLogger(__name__)
# Longer "answers" are not answers; they would also make normalisation regexes slow.
MAX_ANSWER_CHARS = 1000
DEFAULT_TIMEOUT_S = 10.0

_worker: WorkerProcess | None = None
_worker_lock = threading.Lock()


def grade_math(response: str, ground_truth: str | list[str], *,
               timeout_s: int | None = 5, require_think_close: bool = False) -> Grade:
    """Grade in this process. ``timeout_s`` feeds math-verify's ``signal.alarm`` timeouts,
    which work only on the main thread, so it is ignored on any other thread.
    ``require_think_close``: see the module docstring (thinking format)."""
    if require_think_close and "</think>" not in response:
        return fail("no_think_close")
    answer = final_answer(response)
    if answer is None:
        if "<think>" in response and "</think>" not in response:
            return fail("unclosed_think")
        return fail("no_boxed_answer")
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return fail(f"bad_answer_length: {len(answer)}")
    refs = [ground_truth] if isinstance(ground_truth, str) else list(ground_truth)
    on_main = threading.current_thread() is threading.main_thread()
    alarm_s = timeout_s if on_main else None
    for ref in refs:
        if is_equivalent(answer, ground_truth_answer(str(ref)), timeout_s=alarm_s):
            return CORRECT
    return fail(f"wrong_answer: {answer[:80]}")


def _shared_worker() -> WorkerProcess:
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = WorkerProcess()
            atexit.register(_worker.close)
        return _worker


def grade_math_isolated(response: str, ground_truth: str | list[str], *,
                        timeout_s: float = DEFAULT_TIMEOUT_S,
                        worker: WorkerProcess | None = None,
                        require_think_close: bool = False) -> Grade:
    """``grade_math`` in a worker process, killed after ``timeout_s``; never raises."""
    inner = max(1, int(timeout_s // 4))  # math-verify's own alarms fire well before the kill
    ok, value = (worker or _shared_worker()).call(
        "megatron_rl.rewards.math:grade_math", (response, ground_truth),
        {"timeout_s": inner, "require_think_close": require_think_close}, timeout_s)
    if not ok:
        logger.warning("math grader failed, reward 0: %s", value)
        return fail(f"grader_error: {value}")
    return value


def compute_score(response: str, ground_truth: str | list[str], *,
                  timeout_s: float = DEFAULT_TIMEOUT_S,
                  require_think_close: bool = False) -> float:
    """1.0 if the response's final boxed answer matches ``ground_truth`` (or any of a
    list), else 0.0; graded in a worker process under ``timeout_s`` (see module doc).
    ``require_think_close=True``: a response without ``</think>`` scores 0.0 (thinking
    models whose template opens ``<think>`` in the prompt).

    Calls share one worker and run one at a time; for throughput use ``RewardPool``."""
    grade = grade_math_isolated(response, ground_truth, timeout_s=timeout_s,
                                require_think_close=require_think_close)
    if grade.score == 0.0:
        logger.debug("math reward 0: %s", grade.reason)
    return grade.score
