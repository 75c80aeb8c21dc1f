"""The trainer world: join the one we are in (torchrun, srun), or start it on this machine.

``megatron-rl train`` run plainly starts ``torchrun --nproc-per-node W`` on itself (W =
``parallel.world_size``) and supervises it: SIGTERM / SIGUSR1 (Slurm's pre-emption warning)
are forwarded to every trainer process, which checkpoint after the current step and exit
0; Ctrl-C stops everything. torchrun is started with a parent-death signal, so killing the
supervisor (even with SIGKILL) takes the world down with it instead of leaving orphans.
Under torchrun the variables it sets (RANK, WORLD_SIZE, MASTER_ADDR, ...) are used as they
are; under srun without torchrun, Slurm's (SLURM_PROCID, SLURM_NTASKS, ...) are mapped to them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from megatron_rl.rollout.servers import set_parent_death_signal
from megatron_rl.weights.sync import free_port


def in_launched_world() -> bool:
    """True under torchrun (or srun, after ``adopt_slurm_env``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def adopt_slurm_env() -> None:
    """Map srun's task variables to torch.distributed's when no torchrun set them."""
    env = os.environ
    if in_launched_world() or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env or "MASTER_ADDR" not in env:
        return
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
    env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    env.setdefault("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    env.setdefault("MASTER_PORT", "29500")


def _workers(torchrun_pid: int) -> list[int]:
    """torchrun's own children: the trainer ranks (not their rollout servers or graders,
    which rank 0 stops itself once it has checkpointed)."""
    import psutil

    try:
        return [p.pid for p in psutil.Process(torchrun_pid).children(recursive=False)]
    except psutil.NoSuchProcess:
        return []


def supervise(argv: list[str], nproc: int) -> int:
    """Run ``megatron-rl <argv>`` as ``nproc`` local trainer processes; returns their exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
           f"--master-port={free_port()}", "--master-addr=127.0.0.1", "-m", "megatron_rl", *argv]
    proc = subprocess.Popen(cmd, preexec_fn=set_parent_death_signal)

    def forward(signum, frame):
        # torchrun would kill its workers on SIGTERM and die on SIGUSR1: tell the workers
        # themselves, which checkpoint and exit 0, and torchrun then exits 0 too.
        for pid in _workers(proc.pid):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, forward)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the terminal sent SIGINT to the whole foreground group
        try:
            return proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.kill()
            return 130


def preflight(cfg, *, rl: bool = True) -> None:
    """Refuse, before any process starts, a run whose inputs are missing (one clear error)."""
    from pathlib import Path

    from megatron_rl.errors import ConfigError, DataError

    problems = []
    model = Path(cfg.model.path) if cfg.model.path else None
    if model is None:
        problems.append("`model.path` is empty: set it to a Hugging Face model directory or a checkpoint")
    elif not model.exists():
        problems.append(f"`model.path` {model} does not exist (download the base model there, e.g. "
                        f"`huggingface-cli download <repo> --local-dir {model}`)")
    if not cfg.data.train_files:
        problems.append("`data.train_files` is empty: give parquet files (see `megatron-rl data --help`)")
    missing = [f for f in [*cfg.data.train_files, *(cfg.eval.files if rl else [])] if not Path(f).is_file()]
    if missing:
        problems.append(f"data file(s) {missing} do not exist (convert them with `megatron-rl data`)")
    if problems:
        error = DataError if not any("model.path" in p for p in problems) else ConfigError
        raise error("Cannot start the run: " + "; ".join(problems) + ".")


def run_job(command: str, recipe: str, overrides: list[str]) -> int:
    """``megatron-rl train|sft RECIPE [overrides]``: validate, then lead or join the world.

    Every config error and missing input is reported before any process starts; run plainly
    with a world larger than one, this process becomes the supervisor of a local torchrun.
    """
    from megatron_rl.config.run import load_config

    cfg = load_config(recipe, overrides)
    preflight(cfg, rl=command == "train")
    adopt_slurm_env()
    if not in_launched_world() and cfg.parallel.world_size > 1:
        return supervise([command, recipe, *overrides], cfg.parallel.world_size)
    if in_launched_world():
        set_parent_death_signal()  # torchrun's worker: go when torchrun goes
    if command == "train":
        from megatron_rl.trainer.loop import train

        return train(cfg)
    from megatron_rl.trainer.sft import sft

    return sft(cfg)
