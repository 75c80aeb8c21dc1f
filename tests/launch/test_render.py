"""Rendered commands and scripts: the multi-node sbatch script, its shell logic (pre-emption
signal to the trainer ranks, requeue, failure report) run under stand-in srun / scontrol /
torchrun commands, the array script and its gather, and launchers/ kept equal to the renderers.

The stand-ins check the scripts' own plumbing on any machine; tests/launch/test_slurm_*.py run
the same scripts on a real Slurm cluster.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.launch.launch_helpers import ROOT, cli

sys.path.insert(0, str(ROOT / "tools"))
import render_launchers  # noqa: E402

VENV_BIN = str(Path(sys.executable).parent)


def bash_n(text: str, tmp_path: Path) -> None:
    path = tmp_path / "check.sh"
    path.write_text(text)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_deepcoder_32k_on_4_nodes_is_a_real_multinode_sbatch_script(tmp_path):
    proc = cli("launch", "configs/deepcoder_14b_32k.yaml", "--launcher", "slurm", "--nodes", "4",
               "--gpus-per-node", "8", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    assert script.startswith("#!/bin/bash\n")
    for line in ["#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@600",
                 "#SBATCH --job-name=deepcoder_14b_32k", "#SBATCH --output=runs/deepcoder_14b_32k/slurm/%x-%j.out",
                 "export TRAINER_NODES=4", "export NPROC_PER_NODE=8", "RECIPE=configs/deepcoder_14b_32k.yaml"]:
        assert line in script.splitlines() or any(x.startswith(line) for x in script.splitlines()), line
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
    assert "srun --kill-on-bad-exit=1" in script and 'torchrun --nnodes="$TRAINER_NODES"' in script
    assert '--node-rank="$SLURM_NODEID"' in script and "-m megatron_rl train" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    servers = [x for x in script.splitlines() if x.startswith("server ")]
    assert len(servers) == 16 and all("--tp-size 2" in x and "--enable-memory-saver" in x for x in servers)
    assert "rollout.attached_memory_saver=true" in script
    assert "colocated" in proc.stderr  # the placement, on stderr: stdout is the script alone
    bash_n(script, tmp_path)


def test_options_reach_the_script(tmp_path):
    proc = cli("launch", "configs/deepcoder_14b_16k.yaml", "--launcher", "slurm", "--gpus-per-node", "8",
               "--partition", "batch", "--account", "rl", "--time", "04:00:00", "--container", "nvcr.io/x:1",
               "--job-name", "dc16", "--signal-seconds", "900", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    for line in ["#SBATCH --partition=batch", "#SBATCH --account=rl", "#SBATCH --time=04:00:00",
                 "#SBATCH --job-name=dc16", "#SBATCH --signal=B:USR1@900", "#SBATCH --nodes=1"]:
        assert line in proc.stdout.splitlines(), line
    assert "--container-image=nvcr.io/x:1" in proc.stdout
    assert "'rollout.gpu_ids=[0,1,2,3,4,5,6,7]'" in proc.stdout  # servers started by rank 0 on its GPUs
    assert not [x for x in proc.stdout.splitlines() if x.startswith("server ")]
    bash_n(proc.stdout, tmp_path)


def test_launchers_are_up_to_date_and_parse(tmp_path):
    for name, text in render_launchers.render_all().items():
        path = ROOT / "launchers" / name
        assert path.read_text() == text, f"launchers/{name} is stale: run tools/render_launchers.py"
        bash_n(text, tmp_path)
    compile((ROOT / "launchers" / "nemo_run_local.py").read_text(), "nemo_run_local.py", "exec")


def test_the_cli_renders_launchers_slurm_train_sbatch_exactly():
    proc = cli("launch", *render_launchers.TRAIN_EXAMPLE, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (ROOT / "launchers" / "slurm_train.sbatch").read_text()


# ---------------------------------------------------------------- the script's shell logic
STUBS = {
    # srun: drop the options (the scripts write them all as --opt=value), run the command here.
    "srun": '#!/bin/bash\nwhile [[ $# -gt 0 && $1 == --* ]]; do shift; done\n'
            'export SLURM_NODEID=0 SLURM_NNODES=1\nexec "$@"\n',
    "scontrol": '#!/bin/bash\nif [ "$1 $2" = "show hostnames" ]; then echo localhost; fi\n'
                'if [ "$1" = requeue ]; then echo "$2" >> "$STUB_LOG/requeued"; fi\n',
    # torchrun: one "trainer rank" (a child); dies of SIGUSR1 itself, as the real one does.
    "torchrun": '#!/bin/bash\necho "$@" > "$STUB_LOG/torchrun_args"\n'
                f'{sys.executable} "$STUB_LOG/rank.py" &\nwait $!\n',
}
RANK = """import os, signal, sys, time
log = os.environ["STUB_LOG"]
def on_usr1(*_):
    open(os.path.join(log, "rank_got_usr1"), "w").write("checkpointed")
    sys.exit(0)
signal.signal(signal.SIGUSR1, on_usr1)
open(os.path.join(log, "rank_started"), "w").write(str(os.getpid()))
time.sleep(float(os.environ.get("RANK_SECONDS", "60")))
sys.exit(int(os.environ.get("RANK_EXIT", "3")))
"""


def stub_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for name, text in STUBS.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    log = tmp_path / "stub_log"
    log.mkdir(exist_ok=True)
    (log / "rank.py").write_text(RANK)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PATH": f"{stubs}:{VENV_BIN}:{env['PATH']}", "STUB_LOG": str(log), "SLURM_JOB_ID": "77",
            "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1", **extra}


def tiny_script(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    proc = cli("launch", "configs/tiny_cpu.yaml", "--launcher", "slurm", "--procs-per-node", "1", "--dry-run",
               f"logging.output_dir={run}", f"checkpoint.dir={run}/ckpt")
    assert proc.returncode == 0, proc.stderr
    (run / "slurm").mkdir(parents=True)  # what `megatron-rl launch` does before sbatch
    script = tmp_path / "train.sbatch"
    script.write_text(proc.stdout)
    return script


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the script ended first ({proc.returncode}): {proc.communicate()}"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_usr1_reaches_the_trainer_ranks_not_torchrun_and_the_job_requeues(tmp_path):
    script = tiny_script(tmp_path)
    env = stub_env(tmp_path)
    log = Path(env["STUB_LOG"])
    proc = subprocess.Popen(["bash", str(script)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_for(log / "rank_started", proc)
    wait_for(tmp_path / "run" / "slurm" / "torchrun-77.0.pid", proc)
    os.kill(proc.pid, signal.SIGUSR1)  # what --signal=B:USR1@S does
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert (log / "rank_got_usr1").read_text() == "checkpointed"
    assert (log / "requeued").read_text().split() == ["77"]
    assert "pre-emption warning" in out and "requeueing" in out
    args = (log / "torchrun_args").read_text().split()
    assert args[:5] == ["--nnodes=1", "--node-rank=0", "--nproc-per-node=1", "--master-addr=localhost",
                        "--master-port=29500"]
    assert args[5:9] == ["-m", "megatron_rl", "train", "configs/tiny_cpu.yaml"]
    assert not list((tmp_path / "run" / "slurm").glob("*.pid"))


def test_a_failed_trainer_is_reported_and_not_requeued(tmp_path):
    script = tiny_script(tmp_path)
    env = stub_env(tmp_path, RANK_SECONDS="0", RANK_EXIT="1")
    proc = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "the trainer failed (exit 1)" in proc.stderr
    assert not (Path(env["STUB_LOG"]) / "requeued").exists()


def test_a_node_that_cannot_start_is_named(tmp_path):
    script = tiny_script(tmp_path)
    env = stub_env(tmp_path)
    bad = tmp_path / "badpython"
    bad.mkdir()
    (bad / "python").write_text("#!/bin/bash\nexit 1\n")
    (bad / "python").chmod(0o755)
    env["PATH"] = f"{bad}:{env['PATH']}"
    proc = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "node " in proc.stderr and "(SLURM_NODEID 0) cannot import megatron_rl" in proc.stderr
    assert "start-up check failed" in proc.stderr
    assert not (Path(env["STUB_LOG"]) / "torchrun_args").exists()


FAKE_EVAL = """#!/usr/bin/env python3
import json, sys
args = sys.argv[1:]
model, out = args[args.index("--model") + 1], args[args.index("--out") + 1]
data = args[args.index("--data") + 1].rsplit("/", 1)[-1].split(".")[0]
if model == "bad":
    sys.exit(1)
res = {data: {"problems": 2, "avg": {"mean": 0.5}, "pass_at": {"1": 0.5, "2": 0.75}, "maj": None}}
open(out + "/results.json", "w").write(json.dumps({"settings": {}, "results": {model: res}}))
"""


def test_array_eval_tasks_gather_and_resubmit_only_the_missing(tmp_path):
    env = stub_env(tmp_path)
    stubs = tmp_path / "stubs"
    (stubs / "sbatch").write_text('#!/bin/bash\necho "$@" >> "$STUB_LOG/sbatch"\necho 4242\n')
    (stubs / "megatron-rl").write_text(FAKE_EVAL)
    for name in ("sbatch", "megatron-rl"):
        (stubs / name).chmod(0o755)
    out = tmp_path / "arr"
    args = ["launch", "--launcher", "slurm", "--array", "eval", "--checkpoints", "good", "bad", "--data",
            "x.parquet", "y.parquet", "--out", out, "--eval-args", "--n 2 --max-new-tokens 8"]
    proc = cli(*args, extra_env={"PATH": env["PATH"], "STUB_LOG": env["STUB_LOG"],
                                 "MEGATRON_RL_LAUNCH_TRUST_PATH": "1"})  # the stubs stand in for the tools
    assert proc.returncode == 0, proc.stderr
    assert "submitted array job 4242 (tasks 0-3)" in proc.stdout
    sbatch_calls = (Path(env["STUB_LOG"]) / "sbatch").read_text().splitlines()
    assert sbatch_calls[1].startswith("--parsable --dependency=afterany:4242")
    assert "megatron-rl launch gather" in sbatch_calls[1]
    doc = json.loads((out / "tasks.json").read_text())
    assert [(t["index"], t["labels"]["checkpoint"], t["labels"]["dataset"]) for t in doc["tasks"]] == [
        (0, "good", "x"), (1, "good", "y"), (2, "bad", "x"), (3, "bad", "y")]
    script = (out / "array.sbatch").read_text()
    assert "#SBATCH --array=0-3" in script
    for i in range(4):  # what Slurm does for each array index
        task = subprocess.run(["bash", str(out / "array.sbatch")], env={**env, "SLURM_ARRAY_TASK_ID": str(i),
                              "SLURM_ARRAY_JOB_ID": "4242"}, cwd=tmp_path, capture_output=True, text=True,
                              timeout=60)
        assert task.returncode == (0 if i < 2 else 1), task.stdout + task.stderr
    gathered = cli("launch", "gather", out)
    assert gathered.returncode == 1  # two tasks failed
    md = (out / "results.md").read_text()
    assert "| checkpoint | dataset | problems | avg | pass@1 | pass@2 |" in md
    assert "| good | x | 2 | 50.0 | 50.0 | 75.0 |" in md and "| good | y | 2 | 50.0 | 50.0 | 75.0 |" in md
    assert f"task 2 (checkpoint bad, dataset x): exit status 1; log {out}/logs/task-2.out" in md
    assert f"task 3 (checkpoint bad, dataset y): exit status 1; log {out}/logs/task-3.out" in gathered.stdout
    assert (out / "results.csv").read_text().splitlines()[0] == "checkpoint,dataset,problems,avg,pass@1,pass@2"
    again = cli(*args, "--dry-run")  # the same command again: only the failed tasks
    assert again.returncode == 0, again.stderr
    assert "#SBATCH --array=2-3" in again.stdout and "to run: 2-3" in again.stderr
    changed = cli(*args[:-2], "--eval-args", "--n 4", "--dry-run")
    assert changed.returncode == 0  # a dry run writes nothing, so it does not compare
    refused = cli(*args[:-2], "--eval-args", "--n 4", extra_env={"PATH": env["PATH"], "STUB_LOG": env["STUB_LOG"]})
    assert refused.returncode == 2 and "holds a different task list" in refused.stderr


def test_seed_array_renders_one_training_per_seed(tmp_path):
    proc = cli("launch", "configs/tiny_cpu.yaml", "--launcher", "slurm", "--array", "seeds", "--seeds", "0", "1",
               "2", "3", "--out", tmp_path / "seeds", "--dry-run", "train.num_steps=2")
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --array=0-3" in proc.stdout
    cases = [x for x in proc.stdout.splitlines() if x.strip().startswith(("0)", "3)"))]
    assert "seed=0" in cases[0] and f"logging.output_dir={tmp_path}/seeds/seed-0" in cases[0]
    assert "train.num_steps=2" in cases[0] and "seed=3" in cases[1]
    assert shlex.split(cases[0].split("CMD=(")[1].rstrip(") ;"))[:3] == ["megatron-rl", "train", "configs/tiny_cpu.yaml"]
    bash_n(proc.stdout, tmp_path)
