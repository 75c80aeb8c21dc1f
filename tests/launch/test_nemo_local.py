"""nemo-run: the LocalExecutor (torchrun launcher) runs the tiny training on two processes, and
the SlurmExecutor dry run (LocalTunnel, plain Packager) renders an sbatch script. nemo-run is an
optional extra: these tests skip, saying so, only where it cannot be imported."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.launch.launch_helpers import cli, tiny_model, tiny_recipe  # noqa: F401  (fixture)


def nemo_run_or_skip() -> None:
    try:
        import nemo_run  # noqa: F401
    except ImportError as e:
        pytest.skip(f"nemo-run is not importable ({e}): pip install nemo-run==0.11.1 leptonai==0.27.3")


def test_slurm_executor_dry_run_renders_an_sbatch_script(tmp_path):
    nemo_run_or_skip()
    run = tmp_path / "run"
    proc = cli("launch", "configs/tiny_cpu.yaml", "--launcher", "nemo-run", "--executor", "slurm",
               "--procs-per-node", "2", "--partition", "debug", "--time", "00:10:00", "--dry-run",
               "parallel.tp=2", f"logging.output_dir={run}", f"checkpoint.dir={run}/ckpt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    script = proc.stdout
    assert script.startswith("#!/bin/bash") and "#SBATCH --partition=debug" in script
    assert "#SBATCH --nodes=1" in script and "#SBATCH --time=00:10:00" in script
    assert "--nproc-per-node 2" in script and "-m megatron_rl train" in script and "parallel.tp=2" in script
    check = tmp_path / "nemo.sbatch"
    check.write_text(script)
    assert subprocess.run(["bash", "-n", str(check)]).returncode == 0


def test_nemo_run_refuses_servers_on_other_nodes():
    nemo_run_or_skip()
    proc = cli("launch", "configs/deepcoder_14b_32k.yaml", "--launcher", "nemo-run", "--nodes", "4",
               "--gpus-per-node", "8", "--partition", "p", "--dry-run")
    assert proc.returncode == 2 and "use --launcher slurm" in proc.stderr


@pytest.mark.slow
def test_local_executor_trains_the_tiny_recipe_with_torchrun_on_two_processes(tiny_model, tmp_path):  # noqa: F811
    nemo_run_or_skip()
    run = tmp_path / "run"
    recipe = tiny_recipe(tiny_model, run)
    proc = cli("launch", recipe, "--launcher", "nemo-run", "--procs-per-node", "2", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stdout
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert (run / "ckpt" / "latest").exists() and (run / "nemo-run").is_dir()
