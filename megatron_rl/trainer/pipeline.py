"""Generation ahead of training (``rollout.mode`` one_step_off / async): rank 0's producer.

Versions: the servers hold "version v" after the trainer's v-th optimizer step has been
synced to them (``weight_version`` ``step{v}``); step t trains with the trainer at version t.
A batch generated at version v and trained at step t is ``t - v`` versions stale.

The producer, a coroutine on the run's loop thread, generates the batches of steps t, t+1, ...
in order (so the data stream and the per-sample seeds are the same as in a sync run), each
batch entirely under one version: it starts batch b only when ``b - server_version <= k``
(``rollout.staleness``), and the trainer pushes new weights only while the producer is
between batches (``claim_idle``). So with k = 1 (one_step_off) batch b is always generated at
version b - 1, exactly, whatever the timing; with k >= 2 the version of a batch depends on how
generation and training interleave, and only the bound is guaranteed.

A checkpoint first drains the producer (no batch in flight), then stores the batches that
are generated but not yet trained (``to_json``) beside the data position that follows them:
a resumed run trains on exactly those samples and generates the rest as the original would
have. A run killed between checkpoints regenerates what was in flight, from the checkpoint's
weights.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

from megatron_rl.errors import RolloutError
from megatron_rl.trainer.samples import ScoredSample

log = logging.getLogger(__name__)


@dataclass
class Batch:
    step: int
    """The training step this batch is for."""
    groups: list[list[ScoredSample]]
    metrics: dict[str, float]
    version: int
    """The weights version the servers held while generating it."""
    error: str | None = None
    """A RolloutError's message: the producer stopped at this batch."""
    seconds: float = 0.0
    """How long its generation took (the trainer may have waited for only part of it)."""

    def to_json(self) -> dict:
        return {"step": self.step, "groups": [[asdict(s) for s in g] for g in self.groups],
                "metrics": self.metrics, "version": self.version}

    @classmethod
    def from_json(cls, d: dict) -> Batch:
        return cls(step=int(d["step"]), groups=[[ScoredSample(**s) for s in g] for g in d["groups"]],
                   metrics=dict(d["metrics"]), version=int(d["version"]))


def version_of(weight_version: str | None, default: int) -> int:
    """``step{v}`` (what the trainer's sync sends) -> v; anything else -> ``default``."""
    if weight_version and weight_version.startswith("step") and weight_version[4:].isdigit():
        return int(weight_version[4:])
    return default


def oldest_version(s: ScoredSample, batch_version: int) -> int:
    """The oldest weights that generated any of the sample's tokens: from the per-token versions
    when the server reports them, else the batch's (the weights when its generation started;
    ``weight_version`` is the version at the *end*, newer after a partial rollout's sync)."""
    if s.token_versions:
        return min(version_of(v, batch_version) for v in s.token_versions)
    return batch_version


def staleness_metrics(step: int, batch_version: int, groups: list[list[ScoredSample]]) -> dict[str, float]:
    """How many versions behind the trainer (at version ``step``) the samples were generated:
    a sample counts with its oldest token; ``rollout/partial_samples``: samples whose tokens
    span a weight update."""
    samples = [s for g in groups for s in g]
    lags = [step - oldest_version(s, batch_version) for s in samples] or [step - batch_version]
    spanning = sum(1 for s in samples if s.token_versions and len(set(s.token_versions)) > 1)
    return {"rollout/staleness_max": float(max(lags)), "rollout/staleness_mean": sum(lags) / len(lags),
            "rollout/weight_version": float(batch_version), "rollout/partial_samples": float(spanning)}


@dataclass
class RolloutPipeline:
    """Rank 0: generates the batches of steps ``next_step`` .. ``num_steps - 1`` ahead of training."""

    generate: Callable[[int], Awaitable[tuple[list[list[ScoredSample]], dict[str, float]]]]
    """step -> (groups, metrics): one step's generation and grading (``Generator.step``)."""
    next_step: int
    num_steps: int
    staleness: int
    server_version: int
    partial: bool = False
    """Syncs may land while a batch is in flight (its requests paused in place, not aborted)."""
    ready: dict[int, Batch] = field(default_factory=dict)
    busy: bool = False
    hold: int = 0
    task: asyncio.Task | None = None
    cond: asyncio.Condition | None = None

    # ---------------------------------------------------------------- on the loop thread
    async def start(self) -> None:
        self.cond = asyncio.Condition()
        self.task = asyncio.get_running_loop().create_task(self._produce())

    async def _produce(self) -> None:
        cond = self.cond
        step = self.next_step
        while step < self.num_steps:
            async with cond:
                await cond.wait_for(lambda b=step: self.hold == 0 and b - self.server_version <= self.staleness)
                self.busy, version = True, self.server_version
            t0 = time.perf_counter()
            try:
                groups, metrics = await self.generate(step)
                batch = Batch(step, groups, metrics, version)
            except RolloutError as e:
                batch = Batch(step, [], {}, version, error=str(e))
            except Exception as e:  # noqa: BLE001 - a bug: the trainer raises it at take()
                batch = Batch(step, [], {}, version, error=f"{type(e).__name__}: {e}")
                log.exception("generation of step %d failed", step)
            batch.seconds = time.perf_counter() - t0
            async with cond:
                self.ready[step], self.busy = batch, False
                self.next_step = step + 1
                cond.notify_all()
            if batch.error is not None:
                return
            step += 1

    async def take(self, step: int) -> Batch:
        """The batch for ``step`` (waits for it). Its generation never waits on a sync the caller
        has yet to make: the producer blocks at batch b only while the servers are older than
        b - k, and the trainer, past step b - 1 by then, has synced at least that version."""
        async with self.cond:
            await self.cond.wait_for(lambda: step in self.ready)
            return self.ready.pop(step)

    async def claim_idle(self, version: int) -> bool:
        """True (and the producer held) when the producer waits for weights newer than the
        servers' and ``version`` is newer: the caller syncs, then ``release``s.

        Never while a batch is in flight, nor when the producer could start its next batch with
        the weights it has: a sync then would race its start, and with one_step_off the version
        of a batch would depend on timing."""
        async with self.cond:
            blocked = (self.next_step >= self.num_steps
                       or self.next_step - self.server_version > self.staleness)
            if version <= self.server_version or (not self.partial and (self.busy or not blocked)):
                return False
            self.hold += 1
            return True

    async def drain(self) -> list[Batch]:
        """Hold the producer and wait until no batch is in flight; the batches not yet trained."""
        async with self.cond:
            self.hold += 1
            await self.cond.wait_for(lambda: not self.busy)
            return [self.ready[k] for k in sorted(self.ready)]

    async def release(self, version: int | None = None) -> None:
        """End a hold; ``version``: the weights the servers now hold (after a sync)."""
        async with self.cond:
            self.hold -= 1
            if version is not None:
                self.server_version = version
            self.cond.notify_all()

    async def stop(self) -> None:
        """Stop producing (a batch in flight is cancelled); holds and syncs still work."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        async with self.cond:
            self.busy = False
            self.cond.notify_all()
