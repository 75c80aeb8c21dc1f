"""What `megatron-rl launch` does per launcher: print the placement, then print (dry run),
run or submit. The CLI (``megatron_rl.cli.launch``) only parses and calls these."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megatron_rl.config.run import RunConfig, load_config
from megatron_rl.errors import UserError
from megatron_rl.launch import array
from megatron_rl.launch.placement import Cluster, Placement, compute_placement, format_placement
from megatron_rl.launch.slurm import SlurmOptions, render_array_sbatch, render_train_sbatch, sbatch
from megatron_rl.launch.torchrun import render_torchrun


@dataclass
class LaunchRequest:
    """One `megatron-rl launch` invocation, parsed."""

    recipe: str
    """The recipe (configs/*.yaml)."""
    overrides: list[str]
    """key.sub=value overrides for the trainer."""
    launcher: str
    """torchrun, nemo-run or slurm."""
    cluster: Cluster
    """Nodes and GPUs (or processes) per node."""
    slurm: SlurmOptions
    """sbatch settings (slurm, nemo-run's SlurmExecutor)."""
    dry_run: bool = False
    """Print what would run; run and submit nothing."""
    executor: str = "auto"
    """nemo-run: local, slurm, or auto (local on one node without partition/account)."""
    command: str = ""
    """The command line, quoted in rendered scripts."""
    out: str = ""
    """Array jobs: the output directory (tasks.json, task-<i>/ or seed-<s>/, logs/, results)."""
    array: str = ""
    """Array jobs: eval or seeds ('' = a training job)."""
    checkpoints: list[str] = field(default_factory=list)
    """--array eval: the models (checkpoints or HF directories)."""
    data: list[str] = field(default_factory=list)
    """--array eval: the parquet datasets."""
    seeds: list[int] = field(default_factory=list)
    """--array seeds: one training per seed."""
    eval_args: list[str] = field(default_factory=list)
    """--array eval: more `megatron-rl eval` options (sampling, servers, grading)."""


def placement_for(req: LaunchRequest) -> tuple[RunConfig, Placement]:
    cfg = load_config(req.recipe, req.overrides)
    p = compute_placement(cfg, req.cluster)
    # A dry run's stdout is exactly the commands or script (redirectable into a file); the
    # placement, also in the script's header, then goes to stderr.
    print(format_placement(p), file=sys.stderr if req.dry_run else sys.stdout, flush=True)
    return cfg, p


def launch(req: LaunchRequest) -> int:
    if req.array:
        return launch_array(req)
    if not req.recipe:
        raise UserError("Give a recipe: `megatron-rl launch configs/RECIPE.yaml --launcher ...` (only "
                        "`--array eval` runs without one).")
    cfg, p = placement_for(req)
    if req.launcher == "slurm":
        return launch_slurm(req, cfg, p)
    if req.launcher == "torchrun":
        return launch_torchrun(req, cfg, p)
    return launch_nemo(req, cfg, p)


def launch_torchrun(req: LaunchRequest, cfg: RunConfig, p: Placement) -> int:
    from megatron_rl.launch.torchrun import launcher_servers, run_local

    print(render_torchrun(cfg, p, req.recipe, req.overrides, req.slurm.master_port), flush=True)
    if req.dry_run:
        return 0
    if p.trainer_nodes > 1 or launcher_servers(p):
        raise UserError(
            f"This placement spans {p.nodes} nodes: torchrun runs on one, so run the commands above on each node "
            "(MASTER_ADDR and NODE_RANK set; see launchers/torchrun_multinode.sh), or use --launcher slurm.")
    return run_local(p, req.recipe, req.overrides)


def _checkpointed(cfg: RunConfig) -> None:
    if not cfg.checkpoint.dir or cfg.checkpoint.resume == "none":
        raise UserError(
            "A Slurm job checkpoints on the pre-emption warning and resumes when requeued, which needs "
            "`checkpoint.dir` set and `checkpoint.resume: auto`: add e.g. checkpoint.dir="
            f"{cfg.logging.output_dir or 'runs/NAME'}/ckpt.")


def check_job_environment(slurm: SlurmOptions, tools: tuple[str, ...] = ("python", "torchrun")) -> None:
    """Refuse to submit a job that would run another environment's tools: the job inherits this
    shell's PATH (sbatch --export=ALL), so ``python`` and ``torchrun`` must be this interpreter's
    (an activated venv), unless a container provides them."""
    if slurm.container or os.environ.get("MEGATRON_RL_LAUNCH_TRUST_PATH") == "1":
        return  # a container, or a site that sets the job's environment itself (modules, wrappers)
    here = Path(sys.executable).parent
    for tool in tools:
        found = shutil.which(tool)
        if found is None or Path(found).parent.resolve() != here.resolve():
            raise UserError(
                f"the job would run `{tool}` from this shell's PATH ({found or 'not found'}), not from the "
                f"environment megatron-rl runs in ({here}): activate it first (`source {here}/activate`), or "
                f"give --container IMAGE (or set MEGATRON_RL_LAUNCH_TRUST_PATH=1 where the job's environment is "
                f"set up another way). Nothing was submitted.")


def launch_slurm(req: LaunchRequest, cfg: RunConfig, p: Placement) -> int:
    _checkpointed(cfg)
    script = render_train_sbatch(cfg, p, req.recipe, req.overrides, req.slurm, req.command)
    if req.dry_run:
        print(script, end="")
        return 0
    check_job_environment(req.slurm)
    log_dir = Path(req.slurm.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{req.slurm.job_name}.sbatch"
    path.write_text(script)
    job = sbatch(path)
    print(f"submitted job {job}: {path}; log {log_dir}/{req.slurm.job_name}-{job}.out")
    return 0


def launch_nemo(req: LaunchRequest, cfg: RunConfig, p: Placement) -> int:
    from megatron_rl.launch import nemo

    executor = req.executor
    if executor == "auto":
        executor = "local" if p.nodes == 1 and not (req.slurm.partition or req.slurm.account) else "slurm"
    job_dir = Path(cfg.logging.output_dir or "runs") / "nemo-run"  # a directory named nemo_run confuses nemo-run's paths
    if executor == "local":
        if req.dry_run:
            print(f"nemo-run LocalExecutor(ntasks_per_node={p.nproc_per_node}, launcher='torchrun'): "
                  + shlex.join(["python", "-m", "megatron_rl", "train", req.recipe, *req.overrides,
                                *p.trainer_overrides()]))
            return 0
        return nemo.run_local(p, req.recipe, req.overrides, req.slurm.job_name, job_dir)
    _checkpointed(cfg)
    if req.dry_run:
        print(nemo.slurm_dry_run(p, req.recipe, req.overrides, req.slurm, job_dir), end="")
        return 0
    nemo.submit_slurm(p, req.recipe, req.overrides, req.slurm, job_dir)
    return 0


def launch_array(req: LaunchRequest) -> int:
    if req.launcher != "slurm":
        raise UserError(f"--array runs as a Slurm array job: use --launcher slurm (not {req.launcher}).")
    if not req.out:
        raise UserError("--array needs --out DIR: the tasks' outputs, tasks.json and the gathered table go there.")
    if req.array == "eval":
        if not req.checkpoints or not req.data:
            raise UserError("--array eval needs --checkpoints CKPT... and --data FILE.parquet... "
                            "(one task per checkpoint x dataset).")
        if req.recipe or req.overrides:
            raise UserError("--array eval takes no recipe or overrides: pass `megatron-rl eval` options with "
                            "--eval-args '...'.")
        tasks = array.eval_tasks(req.out, req.checkpoints, req.data, req.eval_args)
    else:
        if not req.recipe or not req.seeds:
            raise UserError("--array seeds needs a recipe and --seeds S... (one training per seed).")
        load_config(req.recipe, req.overrides)  # refuse a bad recipe before anything is submitted
        tasks = array.seed_tasks(req.out, req.seeds, req.recipe, req.overrides)
    out = Path(req.out)
    if not req.dry_run:
        array.keep_tasks(out, req.array, tasks)
    todo = array.missing(tasks)
    print(f"{len(tasks)} tasks in {out}/tasks.json; to run: {array.array_spec(todo) or 'none'}",
          file=sys.stderr if req.dry_run else sys.stdout, flush=True)
    if not todo:
        return gather(out) if not req.dry_run else 0
    script = render_array_sbatch(req.out, [(t.index, t.dir, t.argv) for t in tasks], array.array_spec(todo),
                                 req.slurm, req.cluster.gpus_per_node, req.command)
    if req.dry_run:
        print(script, end="")
        return 0
    check_job_environment(req.slurm, ("megatron-rl",))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    path = out / "array.sbatch"
    path.write_text(script)
    job = sbatch(path)
    extra = [f"--partition={req.slurm.partition}"] if req.slurm.partition else []
    extra += [f"--account={req.slurm.account}"] if req.slurm.account else []
    gather_job = sbatch_wrap(f"megatron-rl launch gather {shlex.quote(req.out)}",
                             [f"--dependency=afterany:{job}", f"--job-name={req.slurm.job_name}-gather",
                              f"--output={out}/logs/gather-%j.out", "--ntasks=1", *extra])
    print(f"submitted array job {job} (tasks {array.array_spec(todo)}), logs {out}/logs/task-<i>.out; "
          f"gather job {gather_job} writes {out}/results.md and results.csv when they end")
    return 0


def sbatch_wrap(command: str, options: list[str]) -> str:
    import subprocess

    proc = subprocess.run(["sbatch", "--parsable", *options, f"--wrap={command}"], capture_output=True, text=True)
    if proc.returncode:
        raise UserError(f"sbatch refused the gather job: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def gather(out: Path) -> int:
    g = array.gather(out)
    print((out / "results.md").read_text(), end="")
    print(f"wrote {out}/results.md and {out}/results.csv ({len(g.rows)} rows)")
    return 1 if g.failed else 0


__all__ = ["LaunchRequest", "launch", "gather", "sbatch"]
