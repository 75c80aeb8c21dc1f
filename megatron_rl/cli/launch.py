"""``megatron-rl launch``: a recipe on a cluster through torchrun, nemo-run or Slurm.

    megatron-rl launch RECIPE --launcher torchrun|nemo-run|slurm [--nodes N --gpus-per-node G
        --procs-per-node P --partition P --account A --time T --container IMAGE --job-name J
        --signal-seconds S --dry-run] [key.sub=value ...]
    megatron-rl launch --launcher slurm --array eval --checkpoints A B --data X.parquet Y.parquet \\
        --out OUT [--eval-args '--n 16 ...']
    megatron-rl launch RECIPE --launcher slurm --array seeds --seeds 0 1 2 3 --out OUT [overrides]
    megatron-rl launch gather OUT

Prints the placement (``megatron_rl.launch.placement``), then the exact commands or sbatch
script (``--dry-run``), or runs / submits them (``megatron_rl.launch.submit``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "launch", help="launch a recipe with torchrun, nemo-run or Slurm (placement, multi-node, arrays)",
        description="Compute and print where the trainer ranks and rollout servers run, then print (--dry-run), "
                    "run or submit the job. `megatron-rl launch gather OUT` gathers an array job's results.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("recipe", nargs="?", default="", help="YAML recipe (or `gather` followed by an array's OUT)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    p.add_argument("--launcher", choices=["torchrun", "nemo-run", "slurm"], default="torchrun")
    p.add_argument("--dry-run", action="store_true", help="print the commands or script; run and submit nothing")
    c = p.add_argument_group("cluster")
    c.add_argument("--nodes", type=int, default=1, help="nodes in the job")
    c.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0 = CPU nodes)")
    c.add_argument("--procs-per-node", type=int, default=0,
                   help="CPU nodes: trainer processes per node (0 = the trainer world over the nodes)")
    s = p.add_argument_group("slurm / nemo-run")
    s.add_argument("--partition", default="")
    s.add_argument("--account", default="")
    s.add_argument("--time", default="", help="time limit, e.g. 04:00:00")
    s.add_argument("--container", default="", metavar="IMAGE", help="run in this image (pyxis --container-image)")
    s.add_argument("--job-name", default="", help="default: the recipe's name")
    s.add_argument("--signal-seconds", type=int, default=600,
                   help="SIGUSR1 this long before the time limit (more than one step + a checkpoint)")
    s.add_argument("--master-port", type=int, default=29500, help="torch.distributed port on the first node")
    s.add_argument("--executor", choices=["auto", "local", "slurm"], default="auto",
                   help="nemo-run: LocalExecutor or SlurmExecutor (auto: local on one node without "
                        "--partition/--account)")
    a = p.add_argument_group("array jobs (slurm)")
    a.add_argument("--array", choices=["eval", "seeds"], default="",
                   help="eval: one `megatron-rl eval` per checkpoint x dataset; seeds: one training per seed")
    a.add_argument("--out", default="", help="array output directory (tasks.json, per-task dirs, logs, results)")
    a.add_argument("--checkpoints", nargs="+", default=[], help="--array eval: models or checkpoints")
    a.add_argument("--data", nargs="+", default=[], help="--array eval: parquet datasets")
    a.add_argument("--seeds", nargs="+", type=int, default=[], help="--array seeds: seeds")
    a.add_argument("--eval-args", default="", help="--array eval: more `megatron-rl eval` options, one string")
    p.set_defaults(run=run)


def run(args) -> int:
    from megatron_rl.errors import UserError
    from megatron_rl.launch.placement import Cluster
    from megatron_rl.launch.slurm import SlurmOptions
    from megatron_rl.launch.submit import LaunchRequest, gather, launch

    if args.recipe == "gather":
        if len(args.overrides) != 1:
            raise UserError("Usage: `megatron-rl launch gather OUT` (the --out of an array launch).")
        return gather(Path(args.overrides[0]))
    cluster = Cluster(args.nodes, args.gpus_per_node, args.procs_per_node)
    name = args.job_name or (Path(args.recipe).stem if args.recipe else f"{args.array}-array")
    eval_args = shlex.split(args.eval_args)
    if eval_args:
        _check_eval_args(eval_args)
    log_dir = _log_dir(args)
    slurm = SlurmOptions(job_name=name, partition=args.partition, account=args.account, time=args.time,
                         container=args.container, signal_seconds=args.signal_seconds, log_dir=log_dir,
                         master_port=args.master_port)
    argv = [x for x in sys.argv[1:] if x != "--dry-run"]
    command = shlex.join(["megatron-rl", *argv]) if argv[:1] == ["launch"] else ""
    req = LaunchRequest(recipe=args.recipe, overrides=list(args.overrides), launcher=args.launcher, cluster=cluster,
                        slurm=slurm, dry_run=args.dry_run, executor=args.executor, command=command, out=args.out,
                        array=args.array, checkpoints=args.checkpoints, data=args.data, seeds=args.seeds,
                        eval_args=eval_args)
    return launch(req)


def _log_dir(args) -> str:
    if args.array or not args.recipe:
        return f"{args.out or 'runs'}/logs"
    from megatron_rl.config.run import load_config

    return f"{load_config(args.recipe, list(args.overrides)).logging.output_dir or 'runs'}/slurm"


def _check_eval_args(eval_args: list[str]) -> None:
    """Refuse eval options `megatron-rl eval` would refuse, before anything is submitted."""
    from megatron_rl.cli.eval import add_sampling_arguments
    from megatron_rl.errors import UserError

    probe = argparse.ArgumentParser(prog="megatron-rl eval", add_help=False, exit_on_error=False)
    add_sampling_arguments(probe, n=16)
    probe.add_argument("--out")
    if any(x in ("--model", "--data", "--out") for x in eval_args):
        raise UserError("--eval-args must not set --model, --data or --out: the array sets them per task "
                        "(--checkpoints, --data, --out).")
    try:
        _, unknown = probe.parse_known_args(["--model", "M", "--data", "D", *eval_args])
    except (argparse.ArgumentError, SystemExit) as e:
        raise UserError(f"--eval-args {shlex.join(eval_args)}: `megatron-rl eval` refuses them ({e}).") from None
    if unknown:
        raise UserError(f"--eval-args: `megatron-rl eval` has no option(s) {' '.join(unknown)} "
                        "(see `megatron-rl eval --help`).")
