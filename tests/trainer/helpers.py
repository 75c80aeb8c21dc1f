"""Run `megatron-rl train` / `sft` from tests exactly as users do: the console script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "megatron-rl")
# Measured, or placed by timing (async modes sync whenever the producer waits): not compared.
TIMING = ("time/", "perf/", "mem/", "sync/")


def write_recipe(path: Path, base: str = "tiny_cpu.yaml", **sections) -> Path:
    """A recipe over configs/<base> with the given sections merged in."""
    tree = {"base": str(ROOT / "configs" / base), **sections}
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


# Set in this pytest process by in-process single-rank tests (Topology.initialize): a job
# started with them would think torchrun had launched it.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return dict(clean, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", WANDB_MODE="offline")


def run(args: list[str], timeout: float = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env(),
                          cwd=cwd)


def run_patched(prelude: str, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``megatron-rl ARGS`` in a Python that first runs ``prelude`` (monkeypatches a test needs
    inside the CLI process)."""
    script = prelude + "\nimport sys\nfrom megatron_rl.cli.main import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env())


def start(args: list[str], log: Path, cwd: Path = ROOT) -> subprocess.Popen:
    """Start in its own session (so a test can signal or kill the whole job)."""
    out = open(log, "w")
    return subprocess.Popen([CLI, *map(str, args)], stdout=out, stderr=subprocess.STDOUT, env=env(), cwd=cwd,
                            start_new_session=True)


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the job exited ({proc.returncode}) before writing {n} lines to {path}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {n} lines in {path}")


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """SIGKILL the job's whole session: the supervisor, torchrun, trainers, servers, graders."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    for p in procs:  # servers live in sessions of their own
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)


def metrics(run_dir: Path, *, drop_timings: bool = True) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if drop_timings:
        rows = [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]
    return rows


def one_paragraph(stderr: str) -> str:
    """The CLI's error line(s): no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if "error:" in ln]
    assert lines, stderr[-3000:]
    return lines[-1]
