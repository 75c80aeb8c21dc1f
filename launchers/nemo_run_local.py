"""megatron-rl through nemo-run on this machine: LocalExecutor with the torchrun launcher.

    pip install nemo-run==0.11.1 leptonai==0.27.3     # or: pip install -e .[launch]
    python launchers/nemo_run_local.py RECIPE NPROC [key.sub=value ...]

NPROC is the recipe's trainer world, parallel.tp*pp*cp*dp. The same as
`megatron-rl launch RECIPE --launcher nemo-run` (megatron_rl/launch/nemo.py); for a cluster,
swap the executor for run.SlurmExecutor(account=..., partition=..., nodes=..., ntasks_per_node=...,
launcher="torchrun", tunnel=run.SSHTunnel(...) or run.LocalTunnel(job_dir=...)).
"""

from __future__ import annotations

import sys
from pathlib import Path

import nemo_run as run


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[1].isdigit():
        print(__doc__, file=sys.stderr)
        return 2
    recipe, nproc, overrides = str(Path(argv[0]).resolve()), int(argv[1]), argv[2:]
    script = run.Script(path="megatron_rl", m=True, entrypoint=sys.executable,
                        args=["train", recipe, *overrides])  # torchrun runs `python -m megatron_rl train ...`
    executor = run.LocalExecutor(ntasks_per_node=nproc, launcher="torchrun")
    with run.Experiment("megatron-rl", executor=executor, log_level="WARN") as exp:
        exp.add(script, name="train")
        exp.run(sequential=True, tail_logs=True)
    ok = all(str(job.state).endswith("SUCCEEDED") for job in exp.jobs)
    print("nemo-run: " + ", ".join(str(job.state) for job in exp.jobs))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
