"""`megatron-rl train` with generation ahead of training (rollout.mode one_step_off / async)."""

from __future__ import annotations

import time

import pytest

from tests.trainer.conftest import sections
from tests.trainer.helpers import kill_tree, metrics, run, start, wait_for_lines, write_recipe

pytestmark = pytest.mark.slow


def _recipe(tiny, tmp_path, name, **rollout):
    run_dir = tmp_path / name
    return write_recipe(tmp_path / f"{name}.yaml", **sections(
        tiny, run_dir, train={"num_steps": 5}, rollout=rollout,
        eval={"files": [str(tiny / "eval.parquet")], "every_steps": 2, "temperature": 0.0})), run_dir


def test_one_step_off_trains_one_version_behind_and_resumes_exactly_after_kill9(tiny, tmp_path):
    ref_recipe, ref_dir = _recipe(tiny, tmp_path, "ref", mode="one_step_off")
    ref = run(["train", ref_recipe], timeout=900)
    assert ref.returncode == 0, ref.stderr[-4000:]
    rows = metrics(ref_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    # Step t trains on samples of the weights before step t-1's update: exactly one behind.
    assert [r["rollout/staleness_max"] for r in rows] == [0, 1, 1, 1, 1]
    assert [r["rollout/weight_version"] for r in rows] == [0, 0, 1, 2, 3]
    assert all(r["mismatch/abs_logp_diff_max"] > 0 for r in rows[1:])  # stale samples: logged, not gated

    cut_recipe, cut_dir = _recipe(tiny, tmp_path, "cut", mode="one_step_off")
    job = start(["train", cut_recipe], tmp_path / "cut1.log")
    wait_for_lines(cut_dir / "metrics.jsonl", 2, job)
    time.sleep(0.5)
    kill_tree(job)  # kill -9: the batch generated ahead is lost with the process
    again = run(["train", cut_recipe], timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    # The checkpoint kept the batch generated ahead: the resumed run is the uninterrupted one.
    assert metrics(cut_dir) == rows


def test_async_staleness_two_stays_within_the_bound_across_kill9_and_resume(tiny, tmp_path):
    recipe, run_dir = _recipe(tiny, tmp_path, "async", mode="async", max_staleness=2)
    job = start(["train", recipe], tmp_path / "async1.log")
    wait_for_lines(run_dir / "metrics.jsonl", 2, job)
    kill_tree(job)
    again = run(["train", recipe], timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert all(0 <= r["rollout/staleness_max"] <= 2 for r in rows), [r["rollout/staleness_max"] for r in rows]


def test_partial_rollouts_continue_across_syncs_within_the_bound(tiny, tmp_path):
    recipe, run_dir = _recipe(tiny, tmp_path, "partial", mode="one_step_off", partial=True)
    proc = run(["train", recipe], timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    # A sync may land mid-batch: requests then finish on newer weights, never older than the bound.
    assert all(0 <= r["rollout/staleness_max"] <= 1 for r in rows)
    assert all("rollout/partial_samples" in r for r in rows)
