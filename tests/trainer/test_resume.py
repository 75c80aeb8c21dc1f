"""Exact resume, pre-emption, stages, a 4-process layout and dying servers (multi-process: slow)."""

from __future__ import annotations

import signal
import time

import psutil
import pytest

from tests.trainer.conftest import sections
from tests.trainer.helpers import kill_tree, metrics, one_paragraph, run, start, wait_for_lines, write_recipe

pytestmark = pytest.mark.slow


def _tp2(tiny, run_dir, **over):
    """The recipe's own layout: TP=2 on 2 processes (the supervisor starts torchrun)."""
    return sections(tiny, run_dir, parallel={"tp": 2}, train={"num_steps": 4}, **over)


def test_kill9_mid_run_then_same_command_gives_identical_metrics(tiny, tmp_path):
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref = run(["train", write_recipe(tmp_path / "ref.yaml", **_tp2(tiny, ref_dir))], timeout=900)
    assert ref.returncode == 0, ref.stderr[-4000:]
    recipe = write_recipe(tmp_path / "cut.yaml", **_tp2(tiny, cut_dir))
    job = start(["train", recipe], tmp_path / "cut1.log")
    wait_for_lines(cut_dir / "metrics.jsonl", 2, job)
    time.sleep(0.7)  # somewhere inside step 3 (generation, training, sync or the save)
    kill_tree(job)
    again = run(["train", recipe], timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    want, got = metrics(ref_dir), metrics(cut_dir)
    assert [r["step"] for r in got] == [0, 1, 2, 3]
    assert got == want


def test_sigterm_checkpoints_after_the_step_and_exits_0_then_resumes(tiny, tmp_path):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", **_tp2(tiny, run_dir, checkpoint={"save_every": 100}))
    job = start(["train", recipe], tmp_path / "job.log")
    wait_for_lines(run_dir / "metrics.jsonl", 1, job)
    job.send_signal(signal.SIGTERM)  # to the supervisor alone, as `kill` or Slurm would
    assert job.wait(timeout=300) == 0, (tmp_path / "job.log").read_text()[-3000:]
    done = len(metrics(run_dir))
    assert 1 <= done < 4
    assert (run_dir / "ckpt" / "latest").read_text().strip() == f"step_{done:08d}"
    again = run(["train", recipe], timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["step"] for r in metrics(run_dir)] == [0, 1, 2, 3]


def test_stage_change_keeps_optimizer_state_and_step_count(tiny, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    stage1 = write_recipe(tmp_path / "stage1.yaml", **sections(tiny, one, train={"num_steps": 2}))
    assert run(["train", stage1]).returncode == 0
    stage2 = tmp_path / "stage2.yaml"
    stage2.write_text(
        "base: stage1.yaml\n"
        "train: {num_steps: 3}\n"
        "rollout: {n_samples: 4, max_new_tokens: 12}\n"
        f"checkpoint: {{init_from: {one / 'ckpt'}, dir: {two / 'ckpt'}}}\n"
        f"logging: {{output_dir: {two}}}\n")
    proc = run(["train", stage2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = metrics(one)
    (row,) = metrics(two)
    assert row["step"] == 2  # the step count carried over
    assert row["optimizer/adam_step"] == first[-1]["optimizer/adam_step"] + 1 == 3  # Adam's state too
    assert row["rollout/samples"] == 2 * 4 and row["response/length_max"] <= 12
    assert (two / "ckpt" / "latest").read_text().strip() == "step_00000003"


def test_tp2_dp2_trains_from_parquet_with_the_math_grader(tiny, tmp_path):
    run_dir = tmp_path / "run"
    sec = sections(tiny, run_dir, parallel={"tp": 2, "dp": 2}, train={"num_steps": 2})
    proc = run(["train", write_recipe(tmp_path / "r.yaml", **sec)], timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1] and rows[0]["rollout/samples"] == 4
    assert (run_dir / "ckpt" / "latest").read_text().strip() == "step_00000002"
    assert (run_dir / "hf" / "model.safetensors").exists()


def _servers(job) -> list[psutil.Process]:
    return [p for p in psutil.Process(job.pid).children(recursive=True) if "serve" in p.cmdline()]


def test_a_server_killed_mid_run_loses_nothing_and_none_left_stops_cleanly(tiny, tmp_path):
    run_dir = tmp_path / "run"
    sec = sections(tiny, run_dir, train={"num_steps": 4, "prompts_per_step": 4, "mini_batch_prompts": 4},
                   rollout={"num_servers": 2, "health_timeout_s": 20, "max_new_tokens": 24})
    recipe = write_recipe(tmp_path / "r.yaml", **sec)
    job = start(["train", recipe], tmp_path / "job.log")
    wait_for_lines(run_dir / "metrics.jsonl", 1, job)
    servers = _servers(job)
    assert len(servers) == 2
    servers[0].kill()
    assert job.wait(timeout=600) == 0, (tmp_path / "job.log").read_text()[-3000:]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and all(r["rollout/samples"] == 8 for r in rows)
    # Now every server dies: the run keeps what it has and says so.
    more = run_dir / "more.yaml"
    more.write_text(f"base: {recipe}\ntrain: {{num_steps: 8}}\n")
    job = start(["train", more], tmp_path / "job2.log")
    wait_for_lines(run_dir / "metrics.jsonl", 5, job)
    for p in _servers(job):
        p.kill()
    assert job.wait(timeout=600) == 2
    log = (tmp_path / "job2.log").read_text()
    assert "down" in one_paragraph(log) or "failed" in one_paragraph(log)
    saved = int((run_dir / "ckpt" / "latest").read_text().strip()[5:])
    assert saved == len(metrics(run_dir))  # every completed step is kept
