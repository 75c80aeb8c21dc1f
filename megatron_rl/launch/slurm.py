"""Slurm: the multi-node training sbatch script and the array-job script, rendered as text.

The training script (``render_train_sbatch``) runs one srun task per trainer node, each
running torchrun for that node's ranks (master address = the first host of
``scontrol show hostnames``). Pre-emption: ``--signal=B:USR1@S`` warns the batch shell S
seconds before the time limit; the shell passes SIGUSR1 to the trainer ranks on every node
(torchrun's children, by the PID each node task recorded: torchrun itself would die of
SIGUSR1), they checkpoint after the current step and exit 0, and the shell requeues the job
(``--requeue``, log appended with ``--open-mode=append``). The requeued job runs the same
script, and `megatron-rl train` resumes from ``checkpoint.dir/latest`` (``checkpoint.resume:
auto``). Servers the placement gives to other nodes run as background steps
(``srun --overlap``), their URLs passed as ``rollout.server_urls``.

``render_array_sbatch`` runs one task per entry of ``OUT/tasks.json`` (``launch.array``):
a ``case`` on ``$SLURM_ARRAY_TASK_ID`` holding each task's exact command; each task records
its exit status in its directory for ``megatron-rl launch gather``.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from megatron_rl.config.run import RunConfig
from megatron_rl.errors import UserError
from megatron_rl.launch.placement import Placement, format_placement
from megatron_rl.launch.torchrun import (
    DEFAULT_MASTER_PORT,
    launcher_servers,
    server_command,
    trainer_args,
)


@dataclass(frozen=True)
class SlurmOptions:
    """sbatch settings from the command line."""

    job_name: str = "megatron-rl"
    """--job-name."""
    partition: str = ""
    """--partition (empty: the cluster's default)."""
    account: str = ""
    """--account (empty: the user's default)."""
    time: str = ""
    """--time limit, e.g. 04:00:00 (empty: the partition's default)."""
    container: str = ""
    """Container image run through pyxis (srun --container-image); empty = the host environment."""
    signal_seconds: int = 600
    """SIGUSR1 this many seconds before the time limit: longer than one step plus a checkpoint."""
    log_dir: str = "runs/slurm"
    """Where the job's log (and the servers' logs) go; must exist before sbatch (the launcher makes it)."""
    master_port: int = DEFAULT_MASTER_PORT
    """torch.distributed's store port on the first node."""


def _sbatch_header(o: SlurmOptions, nodes: int, gpus_per_node: int, output: str, extra: list[str]) -> list[str]:
    lines = [f"#SBATCH --job-name={o.job_name}", f"#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=1"]
    lines += [f"#SBATCH --gpus-per-node={gpus_per_node}"] if gpus_per_node else []
    lines += [f"#SBATCH --partition={o.partition}"] if o.partition else []
    lines += [f"#SBATCH --account={o.account}"] if o.account else []
    lines += [f"#SBATCH --time={o.time}"] if o.time else []
    lines += [f"#SBATCH --output={output}", "#SBATCH --open-mode=append", "#SBATCH --requeue",
              f"#SBATCH --signal=B:USR1@{o.signal_seconds}", *extra]
    return lines


def _container(o: SlurmOptions) -> str:
    if not o.container:
        return "CONTAINER=()                 # e.g. (--container-image=IMAGE): pyxis runs each srun step in it"
    return ("CONTAINER=(" + shlex.quote(f"--container-image={o.container}")
            + ' --container-mounts="$PWD:$PWD" --container-workdir="$PWD")')


def _bash_array(items: list[str]) -> str:
    return "(" + " ".join(shlex.quote(x) for x in items) + ")"


def render_train_sbatch(cfg: RunConfig, p: Placement, recipe: str, overrides: list[str], o: SlurmOptions,
                        command: str = "") -> str:
    """The multi-node training job script."""
    args = trainer_args(recipe, overrides, p)[1:]  # RECIPE and overrides, placement's included
    head = ["#!/bin/bash", f"# megatron-rl training job{': rendered by `' + command + '`' if command else ''}",
            "#", *[f"# {x}" for x in format_placement(p).splitlines()],
            *_sbatch_header(o, p.nodes, p.cluster.gpus_per_node, f"{o.log_dir}/%x-%j.out", [])]
    settings = [
        "", "# ---- settings (rendered from the recipe and the placement) ----",
        f"RECIPE={shlex.quote(args[0])}",
        f"OVERRIDES={_bash_array(args[1:])}",
        f"export TRAINER_NODES={p.trainer_nodes}      # the trainer runs on the first TRAINER_NODES nodes",
        f"export NPROC_PER_NODE={p.nproc_per_node}    # trainer ranks per node (torchrun --nproc-per-node)",
        f"export MASTER_PORT={o.master_port}",
        f"LOG_DIR={shlex.quote(o.log_dir)}",
        _container(o),
        (f"STEP_GPUS=(--gpus-per-node={p.cluster.gpus_per_node})   # every step sees the node's GPUs (cgroups)"
         if p.gpu else "STEP_GPUS=()                 # CPU nodes"),
    ]
    servers = [f"server {s.node} {','.join(map(str, s.gpu_ids))} {s.port} " + shlex.join(server_command(cfg, p, s))
               for s in launcher_servers(p)]
    return "\n".join([*head, *settings, TRAIN_BODY_START, *(SERVERS_BLOCK + servers if servers else []),
                      TRAIN_BODY_END]) + "\n"


TRAIN_BODY_START = r'''
set -uo pipefail
mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
export MASTER_ADDR=${HOSTS[0]}
TRAINER_HOSTS=$(IFS=,; echo "${HOSTS[*]:0:TRAINER_NODES}")
echo "$(date) job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${HOSTS[*]}; master $MASTER_ADDR:$MASTER_PORT"

# ---- start-up check: every node can run the trainer; a node that cannot is named here ----
if ! srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 "${CONTAINER[@]}" bash -c \
    'python -c "import megatron_rl, torch" || { echo "node $(hostname) (SLURM_NODEID $SLURM_NODEID) cannot import megatron_rl and torch" >&2; exit 1; }'; then
  echo "start-up check failed on the node(s) named above: fix their environment or leave them out (sbatch --exclude=HOST)" >&2
  exit 1
fi'''

SERVERS_BLOCK = [r'''
# ---- rollout servers on the nodes the placement gives them (background steps) ----
URLS=()
server() {  # server NODE GPUS PORT COMMAND...
  local host=${HOSTS[$1]} gpus=$2 port=$3; shift 3
  srun --overlap --nodes=1 --ntasks=1 --nodelist="$host" "${STEP_GPUS[@]}" "${CONTAINER[@]}" \
    env CUDA_VISIBLE_DEVICES="$gpus" "$@" > "$LOG_DIR/server-$SLURM_JOB_ID-$host-$port.log" 2>&1 &
  URLS+=("http://$host:$port")
}''']

TRAIN_BODY_END = r'''if [ -n "${URLS+x}" ] && [ "${#URLS[@]}" -gt 0 ]; then
  OVERRIDES+=("rollout.server_urls=[$(IFS=,; echo "${URLS[*]}")]")
fi

# ---- the trainer: one task per node, torchrun starting NPROC_PER_NODE ranks ----
# Each node task records torchrun's PID, so the pre-emption warning reaches the trainer ranks
# (torchrun's children) and not torchrun, which would die of SIGUSR1.
export PID_PREFIX="$LOG_DIR/torchrun-$SLURM_JOB_ID"
NODE_TASK='torchrun --nnodes="$TRAINER_NODES" --node-rank="$SLURM_NODEID" --nproc-per-node="$NPROC_PER_NODE" \
  --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" -m megatron_rl train "$@" &
echo $! > "$PID_PREFIX.$SLURM_NODEID.pid"
wait $!'
PREEMPTED=0
forward() {  # SIGUSR1 from Slurm (--signal=B:USR1@S): every trainer rank checkpoints after its step, exits 0
  PREEMPTED=1
  echo "$(date) pre-emption warning: the trainer checkpoints after the current step"
  srun --overlap --nodes="$TRAINER_NODES" --ntasks-per-node=1 --nodelist="$TRAINER_HOSTS" \
    bash -c 'pkill -USR1 -P "$(cat "$PID_PREFIX.$SLURM_NODEID.pid")"'
}
trap forward USR1
srun --kill-on-bad-exit=1 --nodes="$TRAINER_NODES" --ntasks-per-node=1 --nodelist="$TRAINER_HOSTS" \
  "${STEP_GPUS[@]}" "${CONTAINER[@]}" bash -c "$NODE_TASK" node-task "$RECIPE" "${OVERRIDES[@]}" &
TRAINER=$!
while :; do  # a trapped signal interrupts `wait`: wait again until the trainer step ends
  wait "$TRAINER"; rc=$?
  kill -0 "$TRAINER" 2>/dev/null || { wait "$TRAINER"; rc=$?; break; }
done
rm -f "$PID_PREFIX".*.pid
if [ "$rc" -ne 0 ]; then
  echo "$(date) the trainer failed (exit $rc); srun names the failing node above; servers' logs: $LOG_DIR" >&2
elif [ "$PREEMPTED" -eq 1 ]; then
  echo "$(date) checkpointed after the pre-emption warning: requeueing; the same script resumes from checkpoint.dir"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"'''


def render_array_sbatch(out: str, commands: list[tuple[int, str, list[str]]], indices: str, o: SlurmOptions,
                        gpus_per_node: int, command: str = "") -> str:
    """One array task per (index, directory, argv); ``indices`` is the --array value to run."""
    head = ["#!/bin/bash", f"# megatron-rl array job: {len(commands)} tasks listed in {out}/tasks.json"
            + (f"; rendered by `{command}`" if command else ""),
            *_sbatch_header(o, 1, gpus_per_node, f"{out}/logs/task-%a.out", [f"#SBATCH --array={indices}"])]
    cases = [f"  {i}) DIR={shlex.quote(d)}; CMD={_bash_array(argv)} ;;" for i, d, argv in commands]
    body = [
        "", "set -uo pipefail", f"OUT={shlex.quote(out)}", _container(o).replace("srun step", "task"),
        'i=$SLURM_ARRAY_TASK_ID',
        'case "$i" in', *cases,
        '  *) echo "task $i is not in $OUT/tasks.json" >&2; exit 2 ;;', "esac",
        ARRAY_BODY,
    ]
    return "\n".join([*head, *body]) + "\n"


ARRAY_BODY = r'''mkdir -p "$DIR"
rm -f "$DIR/exit_code"
echo "$(date) task $i (job ${SLURM_ARRAY_JOB_ID}_$i, restart ${SLURM_RESTART_COUNT:-0}): ${CMD[*]}"
RUN=()
if [ "${#CONTAINER[@]}" -gt 0 ]; then RUN=(srun --ntasks=1 "${CONTAINER[@]}"); fi
PREEMPTED=0
trap 'PREEMPTED=1; kill -USR1 "$CHILD" 2>/dev/null' USR1  # training checkpoints; eval resumes from samples.jsonl
"${RUN[@]}" "${CMD[@]}" &
CHILD=$!
while :; do
  wait "$CHILD"; rc=$?
  kill -0 "$CHILD" 2>/dev/null || { wait "$CHILD"; rc=$?; break; }
done
if [ "$PREEMPTED" -eq 1 ]; then
  echo "$(date) pre-empted: requeueing task $i"
  scontrol requeue "${SLURM_ARRAY_JOB_ID}_$i"
  exit "$rc"
fi
echo "$rc" > "$DIR/exit_code"
exit "$rc"'''


def sbatch(script: Path, *extra: str) -> str:
    """Submit with ``sbatch --parsable``; returns the job id."""
    try:
        proc = subprocess.run(["sbatch", "--parsable", *extra, str(script)], capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError("`sbatch` is not on PATH: run this on a Slurm login node, or use --dry-run to see the "
                        f"script ({script} is written).") from None
    if proc.returncode:
        raise UserError(f"sbatch refused {script}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]
