"""`megatron-rl launch --launcher slurm` against the real one-node test cluster (tests/launch/slurm).

Every command runs as a user types it: the console script, in a scratch directory holding
`configs/` and the `runs/demo/` files the recipe names (a random tiny model and arithmetic
data), with the virtual environment's bin/ first on PATH (as after `source .venv/bin/activate`:
the job's torchrun and python come from there) and SLURM_CONF pointing to the test cluster.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch.slurm.cluster import free_port
from tests.trainer.helpers import env as trainer_env

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CLI = str(BIN / "megatron-rl")
# Small and quick on 2 cores: two ranks (dp=2), 2 prompts x 2 samples a step, no eval.
TINY = ["parallel.dp=2", "train.prompts_per_step=2", "train.mini_batch_prompts=2", "rollout.n_samples=2",
        "eval.at_start=false", "eval.every_steps=0", "eval.files=[]"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """configs/ and the runs/demo/ paths configs/tiny_cpu.yaml names, a random tiny model in place."""
    from megatron_rl.data.synthetic import write_arithmetic_parquet
    from megatron_rl.demo.tiny import build_model, build_tokenizer

    wd = tmp_path_factory.mktemp("slurm_launch")
    shutil.copytree(ROOT / "configs", wd / "configs")
    demo = wd / "runs" / "demo"
    for name, seed in (("sft", 0), ("other", 1)):
        tok = build_tokenizer(demo / name / "hf")
        build_model(demo / name / "hf", tok, seed=seed, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128)
    write_arithmetic_parquet(demo / "data" / "train.parquet", 48, seed=1)
    write_arithmetic_parquet(demo / "data" / "heldout.parquet", 4, seed=2, split="heldout")
    write_arithmetic_parquet(demo / "data" / "heldout_b.parquet", 4, seed=3, split="heldout")
    return wd


@pytest.fixture(scope="module")
def user_env(slurm_cluster) -> dict[str, str]:
    env = slurm_cluster.job_env(trainer_env())
    env["PATH"] = f"{BIN}:{env['PATH']}"
    env["VIRTUAL_ENV"] = str(BIN.parent)
    return env


def launch(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    cmd = [CLI, "launch", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return proc.stdout


def steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def job_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"({path} missing)"


def assert_completed(recs: list[dict], *logs: Path) -> None:
    bad = [r for r in recs if r.get("JobState") != "COMPLETED" or r.get("ExitCode") != "0:0"]
    if bad:
        text = "\n".join(f"--- {p}\n{job_log(p)[-5000:]}" for p in logs)
        raise AssertionError(f"{[(r.get('JobId'), r.get('ArrayTaskId'), r.get('JobState'), r.get('ExitCode')) for r in bad]}"
                             f"\n{text}")


def test_train_two_ranks_checkpoints(slurm_cluster, workdir, user_env):
    """The tiny training as a Slurm job: torchrun with 2 ranks on the node; it trains and checkpoints."""
    run = workdir / "runs" / "slurm_train"
    out = launch(["configs/tiny_cpu.yaml", "--launcher", "slurm", "--nodes", "1", "--procs-per-node", "2",
                  "--master-port", free_port(), *TINY, "train.num_steps=4", "checkpoint.save_every=2",
                  f"checkpoint.dir={run.relative_to(workdir)}/ckpt", f"logging.output_dir={run.relative_to(workdir)}"],
                 workdir, user_env)
    assert "trainer: 2 ranks" in out, out
    job = re.search(r"submitted job (\d+): (\S+); log (\S+)", out)
    assert job, out
    log = workdir / job.group(3)
    assert (workdir / job.group(2)).read_text().startswith("#!/bin/bash")
    assert_completed(slurm_cluster.wait_done(job.group(1), timeout=170), log)
    text = job_log(log)
    assert "step 4/4" in text, text[-3000:]
    assert steps(run) == [0, 1, 2, 3]
    ckpt = run / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "step_00000004"
    assert (ckpt / "step_00000002").is_dir() and (ckpt / "step_00000004").is_dir()


def test_eval_array_gathered_into_one_table(slurm_cluster, workdir, user_env):
    """2 checkpoints x 2 datasets = a 4-task array; the gather job writes one table; a second
    launch finds nothing missing and gathers again without submitting."""
    args = ["--launcher", "slurm", "--array", "eval", "--checkpoints", "runs/demo/sft/hf", "runs/demo/other/hf",
            "--data", "runs/demo/data/heldout.parquet", "runs/demo/data/heldout_b.parquet", "--out", "runs/array",
            "--eval-args", "--n 1 --max-new-tokens 8"]
    out = launch(args, workdir, user_env)
    m = re.search(r"submitted array job (\d+) \(tasks 0-3\).*gather job (\d+)", out)
    assert m, out
    array_job, gather_job = m.groups()
    arr = workdir / "runs" / "array"
    recs = slurm_cluster.wait_done(array_job, timeout=170)
    assert_completed(recs, *sorted((arr / "logs").glob("task-*.out")))
    assert sorted(r["ArrayTaskId"] for r in recs) == ["0", "1", "2", "3"]
    assert_completed(slurm_cluster.wait_done(gather_job, timeout=60), *sorted((arr / "logs").glob("gather-*.out")))
    rows = (arr / "results.csv").read_text().splitlines()
    assert rows[0].startswith("checkpoint,dataset,"), rows
    assert sorted(tuple(r.split(",")[:2]) for r in rows[1:]) == [
        ("runs/demo/other/hf", "heldout"), ("runs/demo/other/hf", "heldout_b"),
        ("runs/demo/sft/hf", "heldout"), ("runs/demo/sft/hf", "heldout_b")]
    table = (arr / "results.md").read_text()
    assert table.count("\n| runs/demo/") == 4, table
    again = launch(args, workdir, user_env)
    assert "to run: none" in again and "submitted" not in again, again
    assert "(4 rows)" in again, again


def test_preemption_checkpoints_then_requeue_resumes(slurm_cluster, workdir, user_env):
    """Slurm's warning (SIGUSR1 to the batch shell, what --signal=B:USR1@S sends) makes the trainer
    checkpoint after its step and the job requeue itself; the rerun resumes from that checkpoint
    and finishes with every step once."""
    run = workdir / "runs" / "slurm_preempt"
    total = 60  # steps of ~0.1-0.2 s: the warning must land while some are left
    out = launch(["configs/tiny_cpu.yaml", "--launcher", "slurm", "--nodes", "1", "--procs-per-node", "2",
                  "--master-port", free_port(), *TINY, f"train.num_steps={total}", "checkpoint.save_every=1000",
                  f"checkpoint.dir={run.relative_to(workdir)}/ckpt", f"logging.output_dir={run.relative_to(workdir)}"],
                 workdir, user_env)
    m = re.search(r"submitted job (\d+): \S+; log (\S+)", out)
    assert m, out
    job, log = m.group(1), workdir / m.group(2)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 150
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        state = slurm_cluster.state(job)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} {state}\n{job_log(log)[-4000:]}"
        assert time.monotonic() < deadline, f"no 3 steps in 150 s\n{job_log(log)[-4000:]}"
        time.sleep(0.2)
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job])

    # It stops with a checkpoint and requeues itself (pending again, Restarts=1).
    rec = slurm_cluster.wait_state(job, ("PENDING", "FAILED", "COMPLETED", "CANCELLED"), timeout=90)
    assert rec["JobState"] == "PENDING" and rec["Restarts"] == "1", f"{rec}\n{job_log(log)[-4000:]}"
    stopped = re.search(r"stopped by signal after step (\d+); checkpoint saved", job_log(log))
    assert stopped, job_log(log)[-4000:]
    k = int(stopped.group(1))
    assert 3 <= k < total, k
    assert (run / "ckpt" / "latest").read_text().strip() == f"step_{k:08d}"
    assert steps(run) == list(range(k))

    slurm_cluster.release(job)  # Slurm holds a requeued job ~2 minutes (BeginTime); start it now
    assert_completed(slurm_cluster.wait_done(job, timeout=170), log)
    text = job_log(log)
    assert f"job {job} (restart 1)" in text, text[-4000:]
    assert f"step {k + 1}/{total}" in text.split(f"job {job} (restart 1)")[1], text[-4000:]
    assert steps(run) == list(range(total))  # no step lost, none repeated
    assert (run / "ckpt" / "latest").read_text().strip() == f"step_{total:08d}"


def test_nemo_run_slurm_dry_run_accepted_by_sbatch(slurm_cluster, workdir, user_env):
    """nemo-run's SlurmExecutor renders the sbatch script (dry run); the cluster's `sbatch --test-only` takes it."""
    script = launch(["configs/tiny_cpu.yaml", "--launcher", "nemo-run", "--executor", "slurm", "--nodes", "1",
                     "--procs-per-node", "2", "--partition", slurm_cluster.partition, "--time", "00:10:00",
                     "--dry-run", *TINY, "train.num_steps=2", "checkpoint.dir=runs/nemo/ckpt",
                     "logging.output_dir=runs/nemo"], workdir, user_env)
    assert script.startswith("#!/bin/bash"), script[:2000]
    assert "torchrun" in script and "--nproc-per-node 2" in script, script
    path = workdir / "nemo.sbatch"
    path.write_text(script if script.endswith("\n") else script + "\n")
    proc = slurm_cluster.run(["sbatch", "--test-only", str(path)], cwd=workdir, env=user_env)
    assert re.search(r"Job \d+ to start at \S+ using \d+ processors on nodes \S+ in partition "
                     + slurm_cluster.partition, proc.stderr + proc.stdout), proc.stderr + proc.stdout


def test_failed_array_task_named_then_only_it_resubmitted(slurm_cluster, workdir, user_env):
    """A task whose dataset is missing fails; the gather names its index and log; once the file
    exists the same command submits only that task, and the table is complete."""
    data = workdir / "runs" / "demo" / "data"
    late = data / "late.parquet"
    args = ["--launcher", "slurm", "--array", "eval", "--checkpoints", "runs/demo/sft/hf",
            "--data", "runs/demo/data/heldout.parquet", "runs/demo/data/late.parquet", "--out", "runs/array_retry",
            "--eval-args", "--n 1 --max-new-tokens 8"]
    out = launch(args, workdir, user_env)
    m = re.search(r"submitted array job (\d+) \(tasks 0-1\).*gather job (\d+)", out)
    assert m, out
    arr = workdir / "runs" / "array_retry"
    recs = {r["ArrayTaskId"]: r for r in slurm_cluster.wait_done(m.group(1), timeout=170)}
    assert_completed([recs["0"]], arr / "logs" / "task-0.out")
    assert recs["1"]["JobState"] == "FAILED", recs["1"]
    slurm_cluster.wait_done(m.group(2), timeout=60)  # the gather job runs after any end (and fails: a task did)
    table = (arr / "results.md").read_text()
    assert re.search(r"task 1 \(.*late.*\).*log runs/array_retry/logs/task-1\.out", table), table

    shutil.copy(data / "heldout_b.parquet", late)
    out = launch(args, workdir, user_env)
    assert "to run: 1" in out, out
    m = re.search(r"submitted array job (\d+) \(tasks 1\).*gather job (\d+)", out)
    assert m, out
    assert [r["ArrayTaskId"] for r in slurm_cluster.wait_done(m.group(1), timeout=170)] == ["1"]
    assert_completed(slurm_cluster.wait_done(m.group(2), timeout=60), *sorted((arr / "logs").glob("gather-*.out")))
    rows = (arr / "results.csv").read_text().splitlines()[1:]
    assert sorted(r.split(",")[1] for r in rows) == ["heldout", "late"], rows
    assert "Failed" not in (arr / "results.md").read_text()


def test_node_that_cannot_start_is_named(slurm_cluster, workdir, user_env):
    """Submitted without the environment on PATH (the node has no megatron_rl): the job fails at its
    start-up check, naming the node, before torchrun starts."""
    env = dict(user_env, PATH=":".join(p for p in user_env["PATH"].split(":") if p != str(BIN)))
    env.pop("VIRTUAL_ENV", None)
    # The submission-time check would refuse this shell; a site whose jobs set up their own
    # environment (modules, wrappers) turns it off, and then the node itself is the one to fail.
    env["MEGATRON_RL_LAUNCH_TRUST_PATH"] = "1"
    out = launch(["configs/tiny_cpu.yaml", "--launcher", "slurm", "--nodes", "1", "--procs-per-node", "2", *TINY,
                  "train.num_steps=2", "checkpoint.dir=runs/broken/ckpt", "logging.output_dir=runs/broken"],
                 workdir, env)
    m = re.search(r"submitted job (\d+): \S+; log (\S+)", out)
    assert m, out
    rec = slurm_cluster.wait_done(m.group(1), timeout=60)[0]
    text = job_log(workdir / m.group(2))
    assert rec["JobState"] == "FAILED", f"{rec}\n{text}"
    assert f"node {slurm_cluster.hostname} (SLURM_NODEID 0) cannot import megatron_rl and torch" in text, text
    assert "start-up check failed" in text, text
    assert not (workdir / "runs" / "broken" / "metrics.jsonl").exists()
