"""n seeded samples per problem, graded as each arrives, appended to ``samples.jsonl``.

Seeds: sample i of problem p gets ``trainer.generate.sample_seed(seed, 0, 0, p, i)``, a hash
of (--seed, problem index, sample index). The same for every model, so models compared on
one benchmark face the same draws, and the same on a resumed run, so with deterministic
servers (the embedded engine's ``--deterministic``, SGLang's
``--enable-deterministic-inference``) a resumed evaluation writes exactly the samples the
uninterrupted one would have. Samples already in the store are not asked again.

A sample that comes back aborted is asked again with the same seed, twice; one that still
fails is left out (not graded wrong) and reported, so rerunning the command retries it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from megatron_rl.eval.backends import Backend
from megatron_rl.eval.metrics import math_answer
from megatron_rl.eval.problems import EvalProblem
from megatron_rl.eval.records import SampleRecord, SampleStore
from megatron_rl.rewards import Grade, RewardItem, RewardPool
from megatron_rl.trainer.generate import gather_all, grader_kind, sample_seed

log = logging.getLogger(__name__)

ABORT_RETRIES = 2


@dataclass(frozen=True)
class SamplingJob:
    """What to sample: ``n`` per problem from ``model`` (its label in the records)."""

    model: str
    n: int
    seed: int = 0
    default_kind: str = "math"
    """Grader of data sources that name neither math nor code (``trainer.generate.grader_kind``)."""


async def sample_all(backend: Backend, pool: RewardPool, store: SampleStore,
                     problems: Sequence[EvalProblem], job: SamplingJob) -> int:
    """Fill ``store`` with every (problem, sample) it lacks; returns how many were left out."""
    todo = [(p, i) for p in problems for i in range(job.n) if (job.model, p.dataset, p.index, i) not in store]
    done = len(problems) * job.n - len(todo)
    log.info("%s: %d samples to generate (%d already in %s)", job.model, len(todo), done, store.path)
    progress = _Progress(len(todo))
    results = await gather_all([_one(backend, pool, store, p, i, job, progress) for p, i in todo])
    return sum(not ok for ok in results)


async def _one(backend: Backend, pool: RewardPool, store: SampleStore, problem: EvalProblem, index: int,
               job: SamplingJob, progress: _Progress) -> bool:
    seed = sample_seed(job.seed, 0, 0, problem.index, index)
    for _ in range(ABORT_RETRIES + 1):
        completion = await backend.complete(problem, seed)
        if completion.finish_reason != "abort":
            break
    else:
        log.warning("%s problem %d sample %d aborted %d times; left out (rerun to retry)",
                    problem.dataset, problem.index, index, ABORT_RETRIES + 1)
        return False
    kind = grader_kind(problem.data_source, job.default_kind)
    grade = await _grade(pool, RewardItem(kind, completion.text, problem.answer))
    store.add(SampleRecord(
        model=job.model, dataset=problem.dataset, problem=problem.index, sample=index, seed=seed,
        data_source=problem.data_source, kind=kind, response=completion.text,
        response_tokens=completion.tokens, finish_reason=completion.finish_reason, score=float(grade.score),
        grade=grade.reason, answer=math_answer(completion.text) if kind == "math" else None,
        prefix=completion.prefix))
    progress.tick()
    return True


async def _grade(pool: RewardPool, item: RewardItem) -> Grade:
    # submit blocks while the pool's queue is full: keep that off the event loop.
    future: Future[Grade] = await asyncio.get_running_loop().run_in_executor(None, pool.submit, item)
    return await asyncio.wrap_future(future)


class _Progress:
    """A log line every 10% (or 60 s), so long evaluations show they are alive."""

    def __init__(self, total: int):
        self.total, self.count, self.last = total, 0, time.monotonic()
        self.step = max(1, total // 10)

    def tick(self) -> None:
        self.count += 1
        now = time.monotonic()
        if self.count % self.step == 0 or now - self.last > 60 or self.count == self.total:
            self.last = now
            log.info("samples: %d/%d", self.count, self.total)
