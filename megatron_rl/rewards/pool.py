"""RewardPool: grade many responses concurrently, in order, never raising.

``num_workers`` threads each own one worker process (``worker.WorkerProcess``) and take
items from a queue of at most ``max_queue`` entries, so a producer that submits faster
than the graders finish blocks instead of piling up work. Math items are graded inside the
worker; code items start their sandbox from the worker, so the trainer process only
waits on pipes. Each item has a hard deadline after which its worker is killed and
replaced. A failure of the grader itself (worker timeout or crash, a sandbox that did not
start, malformed tests) becomes a ``grader_error`` Grade (``Grade.grader_failed``): score
0.0 with a logged reason, which trainers mask instead of reading it as a wrong answer.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from megatron_rl.rewards.grade import Grade, grader_error
from megatron_rl.rewards.worker import WorkerProcess

logger = logging.getLogger(__name__)

_TARGETS = {"math": "megatron_rl.rewards.math:grade_math",
            "code": "megatron_rl.rewards.code:grade_code"}


@dataclass(frozen=True)
class RewardItem:
    """One response to grade: ``kind`` is "math" (``reference``: answer or list of answers)
    or "code" (``reference``: a test dict, see ``code_tests``)."""

    kind: str
    response: str
    reference: Any


class RewardPool:
    """Concurrent graders with a bounded queue; use as a context manager or call close()."""

    def __init__(self, num_workers: int = 2, max_queue: int = 64, *,
                 math_timeout_s: float = 10.0, code_timeout_s: float = 6.0,
                 code_backend: str = "auto", require_think_close: bool = False) -> None:
        if num_workers < 1 or max_queue < 1:
            raise ValueError("RewardPool needs num_workers >= 1 and max_queue >= 1")
        self.math_timeout_s = math_timeout_s
        self.code_timeout_s = code_timeout_s
        self.code_backend = code_backend
        self.require_think_close = require_think_close
        self._queue: queue.Queue[tuple[RewardItem, Future[Grade]] | None] = queue.Queue(max_queue)
        self._workers = [WorkerProcess() for _ in range(num_workers)]
        self._threads = [threading.Thread(target=self._serve, args=(w,), daemon=True,
                                          name=f"reward-pool-{i}")
                         for i, w in enumerate(self._workers)]
        self._closed = False
        for t in self._threads:
            t.start()

    def submit(self, item: RewardItem) -> Future[Grade]:
        """Queue one item (blocks while the queue is full); its Future yields a Grade."""
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        fut: Future[Grade] = Future()
        self._queue.put((item, fut))
        return fut

    def grade_batch(self, items: Iterable[RewardItem]) -> list[Grade]:
        """Grades in the order of ``items``; a failure reason is logged once per batch."""
        futures = [self.submit(item) for item in items]
        grades = [f.result() for f in futures]
        errors = Counter(g.reason.split(":", 2)[1].strip() for g in grades if g.grader_failed)
        if errors:
            logger.warning("reward batch: %d of %d items failed to grade (%s)",
                           sum(errors.values()), len(grades), dict(errors))
        return grades

    def score_batch(self, items: Iterable[RewardItem]) -> list[float]:
        """Scores in the order of ``items`` (see ``grade_batch``)."""
        return [g.score for g in self.grade_batch(items)]

    def _call_args(self, item: RewardItem) -> tuple[tuple[Any, ...], dict[str, Any], float]:
        if item.kind == "math":
            inner = max(1, int(self.math_timeout_s // 4))
            kwargs = {"timeout_s": inner, "require_think_close": self.require_think_close}
            return (item.response, item.reference), kwargs, self.math_timeout_s
        n_tests = _count_tests(item.reference)
        kwargs = {"timeout_s": self.code_timeout_s, "backend": self.code_backend}
        # The sandbox enforces per-test limits itself; this outer deadline only catches a
        # wedged worker, so it allows every test its full time plus start-up.
        return (item.response, item.reference), kwargs, n_tests * (self.code_timeout_s + 2) + 10

    def _grade(self, worker: WorkerProcess, item: RewardItem) -> Grade:
        if item.kind not in _TARGETS:
            return grader_error(f"unknown reward kind {item.kind!r}")
        args, kwargs, deadline = self._call_args(item)
        ok, value = worker.call(_TARGETS[item.kind], args, kwargs, deadline)
        if not ok:
            logger.warning("%s grader failed (grade unknown): %s", item.kind, value)
            return grader_error(value)
        return value

    def _serve(self, worker: WorkerProcess) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                worker.close()
                return
            item, fut = job
            try:
                fut.set_result(self._grade(worker, item))
            except Exception as e:  # never lose an item: a bug here is a grader failure
                logger.exception("reward pool: unexpected error")
                fut.set_result(grader_error(f"{type(e).__name__}: {e}"))

    def close(self) -> None:
        """Finish queued items, then stop the worker processes."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _count_tests(tests: Any) -> int:
    try:
        from megatron_rl.rewards.code_tests import parse_tests

        return max(1, len(parse_tests(tests)))
    except Exception:  # malformed: the worker will report it; any deadline will do
        return 1
