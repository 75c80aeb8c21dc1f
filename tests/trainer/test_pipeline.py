"""The rollout pipeline (generation ahead of training) on its own: versions, holds, errors.

A fake generation (random durations) and a fake trainer (random step times) drive the real
``RolloutPipeline`` on an event loop in a thread, as the trainer does.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from megatron_rl.config.rollout import RolloutConfig
from megatron_rl.errors import ConfigError, RolloutError
from megatron_rl.trainer.pipeline import Batch, RolloutPipeline, staleness_metrics, version_of
from megatron_rl.trainer.samples import ScoredSample
from megatron_rl.trainer.session import LoopThread


class Loop(LoopThread):
    """The trainer's loop thread; a hang fails the test instead of stalling it."""

    def run(self, coro):
        return self.submit(coro).result(timeout=30)


def sample(version: int, step: int = 0) -> ScoredSample:
    return ScoredSample(uid=step, group=0, sample_index=0, prompt_ids=[1], response_ids=[2], rollout_logprobs=[-0.5],
                        finish_reason="stop", data_source="arithmetic", weight_version=f"step{version}")


def drive(staleness: int, steps: int, seed: int, fail_at: int | None = None):
    """Train ``steps`` steps against a pipeline; returns [(step, batch version)] and the syncs."""
    rng = random.Random(seed)
    loop = Loop()
    versions_seen: dict[int, int] = {}

    async def generate(step):
        await asyncio.sleep(rng.uniform(0.0, 0.01))
        if step == fail_at:
            raise RolloutError("every server is down")
        return [[sample(pipe.server_version, step)]], {"n": 1.0}

    pipe = RolloutPipeline(generate, next_step=0, num_steps=steps, staleness=staleness, server_version=0)
    loop.run(pipe.start())
    trained, syncs = [], []

    def try_sync(version):
        if loop.run(pipe.claim_idle(version)):
            syncs.append(version)
            loop.run(pipe.release(version))

    for step in range(steps):
        batch = loop.run(pipe.take(step))
        if batch.error:
            return trained, syncs, batch.error
        try_sync(step)  # the trainer's order: take the batch, then sync, then train
        versions_seen[step] = batch.version
        assert all(version_of(s.weight_version, -1) == batch.version for g in batch.groups for s in g)
        trained.append((step, batch.version))
        time.sleep(rng.uniform(0.0, 0.01))  # training
        try_sync(step + 1)
    return trained, syncs, None


def test_one_step_off_trains_every_batch_exactly_one_version_behind_whatever_the_timing():
    for seed in range(5):
        trained, _, _ = drive(staleness=1, steps=8, seed=seed)
        assert trained == [(0, 0)] + [(t, t - 1) for t in range(1, 8)]


@pytest.mark.parametrize("k", [2, 3])
def test_async_never_exceeds_the_staleness_bound(k):
    for seed in range(5):
        trained, syncs, _ = drive(staleness=k, steps=12, seed=seed)
        assert [t for t, _ in trained] == list(range(12))
        assert all(0 <= t - v <= k for t, v in trained), trained
        assert syncs == sorted(syncs) and syncs  # weights only move forward


def test_a_generation_error_reaches_the_trainer_at_its_step():
    trained, _, error = drive(staleness=2, steps=6, seed=0, fail_at=3)
    assert [t for t, _ in trained] == [0, 1, 2] and "every server is down" in error


def test_drain_holds_the_producer_until_released():
    loop = Loop()
    started = []

    async def generate(step):
        started.append(step)
        await asyncio.sleep(0.01)
        return [], {}

    pipe = RolloutPipeline(generate, next_step=0, num_steps=10, staleness=3, server_version=0)
    loop.run(pipe.start())
    pending = loop.run(pipe.drain())  # waits for the batch in flight, starts none
    n = len(started)
    time.sleep(0.05)
    assert len(started) == n and not pipe.busy
    assert [b.step for b in pending] == list(range(n))
    loop.run(pipe.release())
    deadline = time.monotonic() + 5
    while len(started) < 4 and time.monotonic() < deadline:  # bound: steps 0..3 at version 0
        time.sleep(0.01)
    assert started == [0, 1, 2, 3]
    loop.run(pipe.stop())


def test_a_checkpointed_batch_round_trips_through_json():
    import json

    b = Batch(step=4, groups=[[sample(3, 4), sample(3, 4)]], metrics={"reward/mean": 0.5}, version=3)
    back = Batch.from_json(json.loads(json.dumps(b.to_json())))
    assert back.step == 4 and back.version == 3 and back.groups == b.groups and back.metrics == b.metrics


def test_staleness_counts_each_sample_by_its_oldest_token():
    spanning = sample(4)
    spanning.token_versions = ["step3", "step3", "step4"]  # a partial rollout across one sync
    m = staleness_metrics(5, 3, [[sample(4), spanning]])
    # No per-token versions: the batch's start version (3), not the finish version (4).
    assert m["rollout/staleness_max"] == 2 and m["rollout/staleness_mean"] == 2
    assert m["rollout/partial_samples"] == 1
    fresh = sample(5)
    fresh.token_versions = ["step5"]
    assert staleness_metrics(5, 4, [[fresh]])["rollout/staleness_max"] == 0
    assert staleness_metrics(2, 2, [[sample(2)]])["rollout/staleness_max"] == 0


def test_modes_are_checked():
    assert RolloutConfig(mode="one_step_off").staleness == 1 and RolloutConfig().staleness == 0
    assert RolloutConfig(mode="async", max_staleness=4).staleness == 4
    with pytest.raises(ConfigError, match="colocate"):
        RolloutConfig(mode="one_step_off", colocate=True)
    with pytest.raises(ConfigError, match="max_staleness"):
        RolloutConfig(mode="async", max_staleness=0)
