"""The one-node test cluster itself, with plain sbatch: multi-task jobs, array jobs, signals, requeue.

These are what `megatron-rl launch --launcher slurm` relies on (tests/launch/test_slurm_launch.py):
if one fails, the cluster (tests/launch/slurm) is broken, not the launcher.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def wait_for(path: Path, cluster, job_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        state = cluster.state(job_id)
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED", "COMPLETING"):
            raise AssertionError(f"job {job_id} is {state} before {path} appeared\n{cluster.diagnostics()}")
        time.sleep(0.2)
    raise AssertionError(f"{path} did not appear within {timeout:.0f} s\n{cluster.diagnostics()}")


def completed(recs: list[dict], outputs: list[Path]) -> None:
    for rec in recs:
        if rec.get("JobState") != "COMPLETED" or rec.get("ExitCode") != "0:0":
            logs = "\n".join(f"--- {p}\n{p.read_text()}" for p in outputs if p.exists())
            raise AssertionError(f"job {rec.get('JobId')}: {rec.get('JobState')} exit {rec.get('ExitCode')}"
                                 f" ({rec.get('Reason')})\n{logs}")


def test_two_task_job(slurm_cluster, tmp_path):
    script = "#!/bin/bash\nsrun -n 2 bash -c 'echo \"$SLURM_PROCID/$SLURM_NTASKS $(hostname -s)\" > out.$SLURM_PROCID'\n"
    job = slurm_cluster.sbatch(script, "-n", "2", "-o", "job.out", "--chdir", str(tmp_path), cwd=tmp_path)
    completed(slurm_cluster.wait_done(job, timeout=60), [tmp_path / "job.out"])
    host = slurm_cluster.hostname
    assert [(tmp_path / f"out.{i}").read_text().split() for i in range(2)] == [["0/2", host], ["1/2", host]]


def test_array_job(slurm_cluster, tmp_path):
    script = "#!/bin/bash\necho \"$SLURM_ARRAY_JOB_ID $SLURM_ARRAY_TASK_COUNT\" > task.$SLURM_ARRAY_TASK_ID\n"
    job = slurm_cluster.sbatch(script, "--array=0-3", "-n", "1", "-o", "job_%a.out", "--chdir", str(tmp_path),
                               cwd=tmp_path)
    recs = slurm_cluster.wait_done(job, timeout=90)
    completed(recs, sorted(tmp_path.glob("job_*.out")))
    assert sorted(r["ArrayTaskId"] for r in recs) == ["0", "1", "2", "3"]
    assert {(tmp_path / f"task.{i}").read_text().split()[0] for i in range(4)} == {job}
    assert (tmp_path / "task.0").read_text().split()[1] == "4"


def test_usr1_reaches_batch_shell(slurm_cluster, tmp_path):
    """`scancel --batch --signal=USR1`: what a trainer's batch script sees before the time limit."""
    script = ("#!/bin/bash\ntrap 'echo got USR1 > batch.sig; exit 0' USR1\ntouch ready\n"
              "for i in $(seq 600); do sleep 0.2; done\nexit 3\n")
    job = slurm_cluster.sbatch(script, "-n", "1", "-o", "job.out", "--chdir", str(tmp_path), cwd=tmp_path)
    wait_for(tmp_path / "ready", slurm_cluster, job)
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job])
    completed(slurm_cluster.wait_done(job, timeout=60), [tmp_path / "job.out"])
    assert (tmp_path / "batch.sig").read_text() == "got USR1\n"


def test_usr1_reaches_job_step(slurm_cluster, tmp_path):
    """`scancel --signal=USR1` (no --batch) goes to the job's steps: the srun-launched processes."""
    (tmp_path / "step.sh").write_text(
        "trap 'echo got USR1 > step.sig.$SLURM_PROCID; exit 0' USR1\ntouch ready.$SLURM_PROCID\n"
        "for i in $(seq 600); do sleep 0.2; done\nexit 3\n")
    script = "#!/bin/bash\nsrun -n 2 bash step.sh\n"
    job = slurm_cluster.sbatch(script, "-n", "2", "-o", "job.out", "--chdir", str(tmp_path), cwd=tmp_path)
    wait_for(tmp_path / "ready.0", slurm_cluster, job)
    wait_for(tmp_path / "ready.1", slurm_cluster, job)
    slurm_cluster.run(["scancel", "--signal=USR1", job])
    completed(slurm_cluster.wait_done(job, timeout=60), [tmp_path / "job.out"])
    assert [(tmp_path / f"step.sig.{i}").read_text() for i in range(2)] == ["got USR1\n"] * 2


def test_time_limit_signal(slurm_cluster, tmp_path):
    """`sbatch --signal=B:USR1@50 --time=1`: Slurm itself signals the batch shell ahead of the limit."""
    script = ("#!/bin/bash\ntrap 'echo got USR1 at $SECONDS s > batch.sig; exit 0' USR1\n"
              "for i in $(seq 600); do sleep 0.2; done\nexit 3\n")
    t0 = time.monotonic()
    job = slurm_cluster.sbatch(script, "-n", "1", "--time=1", "--signal=B:USR1@55", "-o", "job.out",
                               "--chdir", str(tmp_path), cwd=tmp_path)
    completed(slurm_cluster.wait_done(job, timeout=100), [tmp_path / "job.out"])
    assert (tmp_path / "batch.sig").read_text().startswith("got USR1")
    assert time.monotonic() - t0 < 60  # before the limit, not at it


def test_requeue_reruns_with_restart_count(slurm_cluster, tmp_path):
    script = ("#!/bin/bash\necho \"run ${SLURM_RESTART_COUNT:-0}\" >> runs.txt\n"
              "if [ \"${SLURM_RESTART_COUNT:-0}\" = 0 ]; then touch started; "
              "for i in $(seq 600); do sleep 0.2; done; exit 3; fi\n")
    job = slurm_cluster.sbatch(script, "-n", "1", "--requeue", "-o", "job.out", "--open-mode=append",
                               "--chdir", str(tmp_path), cwd=tmp_path)
    wait_for(tmp_path / "started", slurm_cluster, job)
    t0 = time.monotonic()
    slurm_cluster.requeue(job)  # scontrol requeue, then StartTime=now instead of a 2-minute BeginTime hold
    recs = slurm_cluster.wait_done(job, timeout=90)
    completed(recs, [tmp_path / "job.out"])
    assert recs[0]["Restarts"] == "1"
    assert (tmp_path / "runs.txt").read_text().splitlines() == ["run 0", "run 1"]
    assert time.monotonic() - t0 < 30
