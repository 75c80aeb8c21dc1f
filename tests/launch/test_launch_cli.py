"""`megatron-rl launch` end to end: user errors (exit 2, one paragraph, before anything runs)
and the torchrun launcher running the tiny CPU training on two processes."""

from __future__ import annotations

import json

import pytest

from tests.launch.launch_helpers import cli, tiny_model, tiny_recipe  # noqa: F401  (fixture)
from tests.trainer.helpers import one_paragraph


@pytest.mark.parametrize("args, says", [
    (["configs/deepcoder_14b_32k.yaml", "--launcher", "slurm", "--nodes", "3", "--gpus-per-node", "8", "--dry-run"],
     "set parallel.dp=3"),
    (["configs/tiny_cpu.yaml", "--launcher", "slurm", "--dry-run", "checkpoint.dir="],
     "needs `checkpoint.dir` set"),
    (["configs/tiny_cpu.yaml", "--launcher", "torchrun", "--nodes", "2", "--dry-run"],
     "do not split evenly over 2 nodes"),
    (["--launcher", "slurm", "--array", "eval", "--checkpoints", "a", "--data", "x.parquet", "--dry-run"],
     "--array needs --out DIR"),
    (["--launcher", "torchrun", "--array", "seeds", "--seeds", "0", "--out", "o"], "use --launcher slurm"),
    (["--launcher", "slurm", "--array", "eval", "--checkpoints", "a", "--data", "x.parquet", "--out", "o",
      "--eval-args", "--temperature hot", "--dry-run"], "`megatron-rl eval` refuses them"),
    (["--launcher", "slurm", "--array", "eval", "--checkpoints", "a", "--data", "x.parquet", "--out", "o",
      "--eval-args", "--out elsewhere", "--dry-run"], "must not set --model, --data or --out"),
    (["configs/tiny_cpu.yaml", "--launcher", "torchrun", "--dry-run", "parallel.tpp=2"], "parallel.tp"),
    (["gather"], "Usage: `megatron-rl launch gather OUT`"),
])
def test_user_errors_are_one_paragraph_and_exit_2(args, says):
    proc = cli("launch", *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert says in one_paragraph(proc.stderr)


def test_gather_without_tasks_json(tmp_path):
    proc = cli("launch", "gather", tmp_path)
    assert proc.returncode == 2 and "tasks.json does not exist" in proc.stderr


def test_torchrun_dry_run_prints_the_exact_command():
    proc = cli("launch", "configs/tiny_cpu.yaml", "--launcher", "torchrun", "--procs-per-node", "2", "--dry-run",
               "parallel.tp=2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("torchrun --nnodes=1 --node-rank=0 --nproc-per-node=2 --master-addr=127.0.0.1 "
                                   "--master-port=29500 -m megatron_rl train configs/tiny_cpu.yaml parallel.tp=2")
    assert "trainer ranks 0-1" in proc.stderr


def test_multinode_torchrun_is_printed_per_node_and_not_run():
    proc = cli("launch", "configs/deepcoder_14b_32k.yaml", "--launcher", "torchrun", "--nodes", "4",
               "--gpus-per-node", "8")
    assert proc.returncode == 2 and "run the commands above on each node" in proc.stderr
    assert '--node-rank="$NODE_RANK"' in proc.stdout and "--nnodes=4" in proc.stdout
    assert proc.stdout.count("sglang.launch_server") == 16


@pytest.mark.slow
def test_torchrun_launcher_trains_the_tiny_recipe_on_two_processes(tiny_model, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    recipe = tiny_recipe(tiny_model, run)
    proc = cli("launch", recipe, "--launcher", "torchrun", "--procs-per-node", "2", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "trainer ranks 0-1" in proc.stdout and "--nproc-per-node=2" in proc.stdout
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]  # two steps, numbered from 0
    assert (run / "ckpt" / "latest").exists()
    assert "  tp: 2\n" in (run / "config.yaml").read_text()


def test_slurm_submission_refuses_a_shell_whose_path_is_another_environment(tmp_path):
    """The job inherits this shell's PATH: without the venv on it, `torchrun` would be another
    environment's (or none), so nothing is submitted (sbatch is never reached: none is on PATH)."""
    proc = cli("launch", "configs/tiny_cpu.yaml", "--launcher", "slurm", "--procs-per-node", "1",
               f"checkpoint.dir={tmp_path / 'ckpt'}", extra_env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    text = one_paragraph(proc.stderr)
    assert "from this shell's PATH" in text and "activate it first" in text and "Nothing was submitted" in text
    from megatron_rl.launch.slurm import SlurmOptions
    from megatron_rl.launch.submit import check_job_environment

    check_job_environment(SlurmOptions(container="img:1"))  # the container brings its own tools
