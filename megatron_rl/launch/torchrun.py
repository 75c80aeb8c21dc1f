"""torchrun commands for a placement: the trainer (one command per node) and the servers the
launcher starts (sglang on their node's GPUs).

Pure functions returning argv lists (``shlex.join`` them to print). ``run_local`` runs the
one-node command and forwards SIGTERM / SIGUSR1 to the trainer ranks, as `megatron-rl train`
does, so a pre-emption warning checkpoints instead of killing torchrun.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from megatron_rl.config.run import RunConfig
from megatron_rl.launch.placement import Placement, ServerSlot
from megatron_rl.rollout.servers import LaunchSpec, sglang_command

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class Rendezvous:
    """Where the trainer's nodes meet: static master address and port, this node's rank."""

    master_addr: str = "127.0.0.1"
    """Host name or address of node 0 (global rank 0)."""
    master_port: int | str = DEFAULT_MASTER_PORT
    """TCP port on node 0 for torch.distributed's store."""
    node_rank: int | str = 0
    """This node's index among the trainer's nodes (0 .. nnodes-1); a shell variable in scripts."""


def trainer_args(recipe: str, overrides: list[str], p: Placement) -> list[str]:
    """``train RECIPE overrides`` plus what the placement adds (servers' GPUs, memory saver)."""
    return ["train", recipe, *overrides, *p.trainer_overrides()]


def torchrun_argv(nnodes: int | str, nproc: int | str, rdzv: Rendezvous, args: list[str],
                  torchrun: tuple[str, ...] = ("torchrun",)) -> list[str]:
    """``torchrun ... -m megatron_rl ARGS`` (static rendezvous: node 0's address and port)."""
    return [*torchrun, f"--nnodes={nnodes}", f"--node-rank={rdzv.node_rank}", f"--nproc-per-node={nproc}",
            f"--master-addr={rdzv.master_addr}", f"--master-port={rdzv.master_port}", "-m", "megatron_rl", *args]


def torchrun_command(p: Placement, recipe: str, overrides: list[str], rdzv: Rendezvous = Rendezvous(),
                     torchrun: tuple[str, ...] = ("torchrun",)) -> list[str]:
    """One node's torchrun: ``nproc_per_node`` trainer ranks of a ``trainer_nodes``-node world."""
    return torchrun_argv(p.trainer_nodes, p.nproc_per_node, rdzv, trainer_args(recipe, overrides, p), torchrun)


def shell_join(argv: list[str]) -> str:
    """Like ``shlex.join``, but words holding a shell variable (``"$X"``, ``--opt="$X"``) stay
    as written, so rendered scripts expand them."""
    return " ".join(a if "$" in a and '"' in a else shlex.quote(a) for a in argv)


def server_command(cfg: RunConfig, p: Placement, s: ServerSlot, python: str = "python") -> list[str]:
    """A launcher-started SGLang server, listening on every interface of its node; colocated
    servers get SGLang's memory saver so the trainer can release their memory."""
    spec = LaunchSpec(engine="sglang", model_path=cfg.model.path, port=s.port, host="0.0.0.0", tp_size=s.tp_size,
                      mem_fraction=s.mem_fraction, gpu_ids=list(s.gpu_ids), python=python,
                      deterministic=cfg.rollout.deterministic,
                      extra_args=["--enable-memory-saver"] if p.mode == "colocated" else [])
    return sglang_command(spec)


def launcher_servers(p: Placement) -> list[ServerSlot]:
    """The servers the launcher (not the trainer) must start."""
    return list(p.servers) if p.started_by == "launcher" else []


def render_torchrun(cfg: RunConfig, p: Placement, recipe: str, overrides: list[str],
                    master_port: int = DEFAULT_MASTER_PORT) -> str:
    """What to run on each node, as text (``--dry-run``)."""
    if p.trainer_nodes == 1 and not launcher_servers(p):
        return shlex.join(torchrun_command(p, recipe, overrides, Rendezvous(master_port=master_port)))
    lines = [f"# On every trainer node (nodes 0-{p.trainer_nodes - 1}); MASTER_ADDR = node 0's address, "
             f"NODE_RANK = 0 .. {p.trainer_nodes - 1}:"]
    servers = launcher_servers(p)
    if servers:
        lines.insert(0, "# First the rollout servers, on their nodes (URLs http://<node>:<port>):")
        for s in servers:
            lines.insert(1 + s.index, f"# node {s.node}: CUDA_VISIBLE_DEVICES={','.join(map(str, s.gpu_ids))} "
                                      + shlex.join(server_command(cfg, p, s)))
        urls = ",".join(f"http://NODE{s.node}:{s.port}" for s in servers)
        overrides = [*overrides, f"rollout.server_urls=[{urls}]"]
    cmd = torchrun_command(p, recipe, overrides, Rendezvous('"$MASTER_ADDR"', master_port, '"$NODE_RANK"'))
    lines.append(shell_join(cmd))
    return "\n".join(lines)


def run_local(p: Placement, recipe: str, overrides: list[str]) -> int:
    """Run the one-node torchrun command here and wait. SIGTERM / SIGUSR1 go to the trainer ranks
    (torchrun's children), which checkpoint after the current step and exit 0; torchrun would
    kill them on SIGTERM and die of SIGUSR1."""
    import os
    import signal
    import subprocess
    import sys

    import psutil

    from megatron_rl.rollout.servers import set_parent_death_signal
    from megatron_rl.weights.sync import free_port

    cmd = torchrun_command(p, recipe, overrides, Rendezvous(master_port=free_port()),
                           torchrun=(sys.executable, "-m", "torch.distributed.run"))
    print("running: " + shlex.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, preexec_fn=set_parent_death_signal)

    def forward(signum, frame):
        try:
            children = psutil.Process(proc.pid).children(recursive=False)
        except psutil.NoSuchProcess:
            return
        for child in children:
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:
                pass

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return proc.wait()
    except KeyboardInterrupt:
        try:
            return proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.kill()
            return 130
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
