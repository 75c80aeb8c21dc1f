"""Exact resume, pre-emption, stages, a 4-process layout and dying servers (multi-process: slow)."""

from __future__ import annotations

import signal
import time

import psutil
import pytest

from tests.trainer.conftest import sections
from tests.trainer.helpers import (
    kill_tree,
    metrics,
    one_paragraph,
    run,
    start,
    wait_for_lines,
    write_recipe,
)

pytestmark = pytest.mark.slow


def _tp2(tiny, run_dir, **over):
    """The recipe's own layout: TP=2 on 2 processes (the supervisor starts torchrun)."""
    over.setdefault("train", {}).setdefault("num_steps", 4)
    over["train"].setdefault("mini_batch_prompts", 1)  # two updates per step: the separate old-log-prob pass
    return sections(tiny, run_dir, parallel={"tp": 2}, **over)


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
    # A step of the tiny model takes 0.1-0.3 s: with 4 steps a loaded CI machine once finished
    # them all before the signal arrived. 16 steps leave seconds for it to land mid-run.
    steps = 16
    recipe = write_recipe(tmp_path / "r.yaml", **_tp2(tiny, run_dir, train={"num_steps": steps},
                                                      checkpoint={"save_every": 100}))
    job = start(["train", recipe], tmp_path / "job.log")
    wait_for_lines(run_dir / "metrics.jsonl", 1, job)
    job.send_signal(signal.SIGTERM)  # to the supervisor alone, as `kill` or Slurm would
    assert job.wait(timeout=300) == 0, (tmp_path / "job.log").read_text()[-3000:]
    done = len(metrics(run_dir))
    assert 1 <= done < steps
    assert (run_dir / "ckpt" / "latest").read_text().strip() == f"step_{done:08d}"
    again = run(["train", recipe], timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["step"] for r in metrics(run_dir)] == list(range(steps))


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
    """The job's live server processes (a killed one not yet reaped is a zombie: gone, skipped)."""
    def cmdline(p: psutil.Process) -> list[str]:
        try:
            return p.cmdline()
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            return []

    return [p for p in psutil.Process(job.pid).children(recursive=True) if "serve" in cmdline(p)]


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
    msg = one_paragraph(log)
    assert "dead" in msg or "down" in msg
    saved = int((run_dir / "ckpt" / "latest").read_text().strip()[5:])
    assert saved == len(metrics(run_dir))  # every completed step is kept


def test_dp2_trains_the_same_update_as_one_process(tiny, tmp_path):
    """Each DP rank trains its own share with the step's normaliser reduced over DP: the
    first step's loss and gradient norm equal a single process's (same samples: seeded)."""
    one, two = tmp_path / "one", tmp_path / "two"
    base = dict(train={"num_steps": 1, "prompts_per_step": 4, "mini_batch_prompts": 4},
                rollout={"n_samples": 3})
    assert run(["train", write_recipe(tmp_path / "one.yaml", **sections(tiny, one, **base))]).returncode == 0
    proc = run(["train", write_recipe(tmp_path / "two.yaml", **sections(tiny, two, parallel={"dp": 2}, **base))])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (a,), (b,) = metrics(one), metrics(two)
    assert a["reward/mean"] == b["reward/mean"] and a["rollout/samples"] == b["rollout/samples"] == 12
    for key in ("actor/loss", "actor/grad_norm", "actor/entropy_mean", "actor/pg_loss"):
        assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a[key], b[key])


def test_ctrl_c_stops_trainers_and_servers(tiny, tmp_path):
    run_dir = tmp_path / "run"
    job = start(["train", write_recipe(tmp_path / "r.yaml", **_tp2(tiny, run_dir, train={"num_steps": 50}))],
                tmp_path / "job.log")
    wait_for_lines(run_dir / "metrics.jsonl", 1, job)
    family = [job.pid] + [p.pid for p in psutil.Process(job.pid).children(recursive=True)]
    assert any("serve" in psutil.Process(p).cmdline() for p in family)
    import os

    os.killpg(job.pid, signal.SIGINT)  # what a terminal sends to the foreground job
    assert job.wait(timeout=120) != 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                              for p in family):
        time.sleep(0.5)
    alive = [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert not alive, [psutil.Process(p).cmdline() for p in alive]


def test_attached_server_with_untempered_logprobs_trips_the_gate(tiny, tmp_path):
    """Attach mode (rollout.server_urls); a server returning log-probs of the untempered
    distribution (SGLANG_RETURN_ORIGINAL_LOGPROB) while sampling at 0.6 is caught at once."""
    import socket
    import subprocess
    import urllib.request

    from tests.trainer.helpers import CLI, env

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([CLI, "serve", "--model", str(tiny / "hf"), "--port", str(port),
                               "--return-original-logprob"], env=env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health_generate", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        sec = sections(tiny, tmp_path / "run", rollout={"server_urls": [f"http://127.0.0.1:{port}"],
                                                        "temperature": 0.6, "deterministic": False})
        proc = run(["train", write_recipe(tmp_path / "r.yaml", **sec)], timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "weights in the engine are not the trainer's" in one_paragraph(proc.stderr)
        assert server.poll() is None  # an attached server is the user's: left running
    finally:
        server.terminate()
        server.wait(timeout=30)
