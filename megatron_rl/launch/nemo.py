"""nemo-run adapter: the trainer as a ``run.Script`` (``python -m megatron_rl train ...``) on a
``LocalExecutor`` (torchrun launcher, this machine) or a ``SlurmExecutor`` (clusters).

nemo-run is an optional extra (``pip install megatron-rl[launch]``: nemo-run 0.11.1 and
leptonai 0.27.3, the pin that lets it import) and is imported only in this module. The
Slurm dry run needs no cluster: a ``LocalTunnel`` and the plain ``run.Packager()``, after
which nemo-run writes the sbatch script into the experiment directory, read back here.
nemo-run's own sbatch runs each node's torchrun under ``srun`` (c10d rendezvous) and
requeues on failure; for pre-emption and the placement's servers on other nodes use
``--launcher slurm``, whose script handles both.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from megatron_rl.errors import UserError
from megatron_rl.launch.placement import Placement
from megatron_rl.launch.slurm import SlurmOptions
from megatron_rl.launch.torchrun import launcher_servers, trainer_args


def import_nemo_run():
    try:
        import nemo_run as run
    except ImportError as e:
        raise UserError(
            f"--launcher nemo-run needs nemo-run, which is not importable here ({e}): "
            "`pip install nemo-run==0.11.1 leptonai==0.27.3` (or `pip install -e .[launch]`).") from None
    return run


def trainer_script(run, p: Placement, recipe: str, overrides: list[str], python: str = sys.executable):
    """``python -m megatron_rl train RECIPE overrides`` as nemo-run's Script (torchrun adds the ranks)."""
    return run.Script(path="megatron_rl", m=True, entrypoint=python, args=trainer_args(recipe, overrides, p))


def _refuse_launcher_servers(p: Placement) -> None:
    if launcher_servers(p):
        raise UserError(
            "This placement puts rollout servers on nodes other than node 0, which nemo-run's script cannot "
            "start: use --launcher slurm (it starts them), or give their URLs in rollout.server_urls.")


def local_executor(run, p: Placement):
    return run.LocalExecutor(ntasks_per_node=p.nproc_per_node, launcher="torchrun")


def slurm_executor(run, p: Placement, o: SlurmOptions, job_dir: Path):
    """A SlurmExecutor for this placement; ``LocalTunnel`` = submit from this machine."""
    return run.SlurmExecutor(
        account=o.account or None, partition=o.partition or None, time=o.time or "", nodes=p.trainer_nodes,
        ntasks_per_node=p.nproc_per_node, gpus_per_node=p.cluster.gpus_per_node or None,
        container_image=o.container or None, launcher="torchrun", job_name_prefix=f"{o.job_name}-",
        tunnel=run.LocalTunnel(job_dir=str(job_dir)), packager=run.Packager())


def _with_python_bin_on_path() -> None:
    """torchrun (nemo-run's torchrun launcher calls it by name) from this interpreter's environment."""
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def run_local(p: Placement, recipe: str, overrides: list[str], name: str, base_dir: Path) -> int:
    """Run the trainer with nemo-run's LocalExecutor (torchrun launcher) and wait; returns 0 on success."""
    if p.nodes > 1:
        raise UserError("nemo-run's LocalExecutor runs on this machine only: use --nodes 1, or --launcher slurm.")
    run = import_nemo_run()
    _with_python_bin_on_path()
    script = trainer_script(run, p, str(Path(recipe).resolve()), overrides)
    base_dir.mkdir(parents=True, exist_ok=True)
    with run.Experiment(name, executor=local_executor(run, p), base_dir=str(base_dir), log_level="WARN",
                        enable_goodbye_message=False) as exp:
        exp.add(script, name="train")
        exp.run(sequential=True, tail_logs=True)
    states = [str(job.state) for job in exp.jobs]  # set once the context has waited for the jobs
    print(f"nemo-run experiment in {base_dir}: {', '.join(states)}")
    return 0 if all(s.endswith("SUCCEEDED") for s in states) else 1


def slurm_dry_run(p: Placement, recipe: str, overrides: list[str], o: SlurmOptions, job_dir: Path) -> str:
    """The sbatch script nemo-run's SlurmExecutor would submit (nothing is submitted)."""
    _refuse_launcher_servers(p)
    run = import_nemo_run()
    job_dir.mkdir(parents=True, exist_ok=True)
    script = trainer_script(run, p, str(Path(recipe).resolve()), overrides, python="python")
    # nemo-run's console goes to stderr: stdout is the script alone
    with contextlib.redirect_stdout(sys.stderr), \
            run.Experiment(o.job_name, executor=slurm_executor(run, p, o, job_dir), base_dir=str(job_dir),
                           log_level="WARN", enable_goodbye_message=False) as exp:
        exp.add(script, name="train")
        exp.dryrun(log=False, delete_exp_dir=False)
    found = sorted(job_dir.rglob("*_sbatch.sh"), key=lambda f: f.stat().st_mtime)
    if not found:
        raise RuntimeError(f"nemo-run's dry run wrote no *_sbatch.sh under {job_dir}")
    return found[-1].read_text()


def submit_slurm(p: Placement, recipe: str, overrides: list[str], o: SlurmOptions, job_dir: Path) -> None:
    """Submit through nemo-run's SlurmExecutor (from this machine: a login node)."""
    _refuse_launcher_servers(p)
    run = import_nemo_run()
    job_dir.mkdir(parents=True, exist_ok=True)
    script = trainer_script(run, p, str(Path(recipe).resolve()), overrides, python="python")
    with run.Experiment(o.job_name, executor=slurm_executor(run, p, o, job_dir), base_dir=str(job_dir),
                        log_level="WARN", enable_goodbye_message=False) as exp:
        exp.add(script, name="train")
        exp.run(detach=True)
