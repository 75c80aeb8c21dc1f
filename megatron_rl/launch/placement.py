"""Placement: which nodes and GPUs hold the trainer ranks and which hold rollout servers.

Pure arithmetic on the recipe (``RunConfig``) and the cluster's shape; nothing is started.
Two layouts, picked by ``rollout.colocate``:

- **colocated**: the trainer spans every node (``nproc_per_node`` ranks each) and the servers
  sit on the trainer's own GPUs with ``rollout.mem_fraction`` of each; the trainer releases
  their memory while the actor trains (``trainer.loop.server_memory``).
- **disaggregated**: the trainer takes the first GPUs (whole nodes once it needs more than
  one), the servers take the GPUs left, ``tp_size`` consecutive GPUs of one node each.

Servers that all land on node 0 (where global rank 0 runs) are started by the trainer itself,
as `megatron-rl train` does on one machine (``rollout.gpu_ids`` tells it which GPUs); servers
on other nodes are started by the launcher, one per node step, and handed to the trainer as
``rollout.server_urls`` (with ``rollout.attached_memory_saver`` when colocated). With
``rollout.server_urls`` in the recipe nothing is placed: the servers are the user's.

Every layout that cannot work is refused here, before anything is submitted, with what to
change (``ConfigError``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_rl.config.run import RunConfig
from megatron_rl.errors import ConfigError

DEFAULT_SERVER_PORT = 30000
"""First port of launcher-started servers when the recipe asks for free ports (base_port 0):
a free port cannot be picked on another node before the job runs."""


@dataclass(frozen=True)
class Cluster:
    """The shape of the allocation a job runs on."""

    nodes: int = 1
    """Nodes in the job (Slurm --nodes, torchrun --nnodes)."""
    gpus_per_node: int = 0
    """GPUs on each node; 0 = CPU nodes (gloo trainer, embedded rollout engine)."""
    procs_per_node: int = 0
    """CPU nodes only: trainer processes per node; 0 = the trainer world split evenly over the nodes."""

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"--nodes must be >= 1, got {self.nodes}.")
        if self.gpus_per_node < 0 or self.procs_per_node < 0:
            raise ConfigError("--gpus-per-node and --procs-per-node must be >= 0.")
        if self.gpus_per_node and self.procs_per_node:
            raise ConfigError(
                f"--procs-per-node {self.procs_per_node} is for CPU nodes (--gpus-per-node 0); on GPU nodes "
                f"the trainer runs one process per GPU: drop --procs-per-node.")


@dataclass(frozen=True)
class ServerSlot:
    """One rollout server: where it runs and what it is started with."""

    index: int
    """Server number (0 .. num_servers-1)."""
    node: int
    """Node index in the job (0 = the node of global rank 0)."""
    gpu_ids: tuple[int, ...]
    """Node-local GPU ids (CUDA_VISIBLE_DEVICES); empty for the embedded CPU engine."""
    tp_size: int
    """SGLang --tp-size (= len(gpu_ids) on GPUs)."""
    port: int
    """HTTP port; 0 = a free port the trainer picks when it starts the server."""
    mem_fraction: float
    """SGLang --mem-fraction-static."""


@dataclass(frozen=True)
class Placement:
    """The whole job's layout, as `megatron-rl launch` prints and renders it."""

    cluster: Cluster
    """The allocation."""
    mode: Literal["colocated", "disaggregated", "attached"]
    """Where the servers sit; attached = the recipe's rollout.server_urls, nothing placed."""
    engine: str
    """rollout.engine (sglang or embedded)."""
    world_size: int
    """Trainer processes in all (parallel.tp * pp * cp * dp)."""
    parallel: tuple[int, int, int, int]
    """(tp, pp, cp, dp) of the trainer world."""
    trainer_nodes: int
    """The trainer runs on nodes 0 .. trainer_nodes-1."""
    nproc_per_node: int
    """Trainer processes on each of those nodes (torchrun --nproc-per-node)."""
    servers: tuple[ServerSlot, ...] = ()
    """Rollout servers this job starts (empty when attached)."""
    started_by: Literal["trainer", "launcher", "none"] = "trainer"
    """Who starts the servers: the trainer's rank 0 (all on node 0) or the launcher (per node)."""
    attached_urls: tuple[str, ...] = field(default_factory=tuple)
    """The recipe's rollout.server_urls when attached."""

    @property
    def gpu(self) -> bool:
        return self.cluster.gpus_per_node > 0

    @property
    def nodes(self) -> int:
        return self.cluster.nodes

    def trainer_gpus(self) -> tuple[int, ...]:
        """Node-local GPUs of the trainer ranks on each trainer node (torchrun's LOCAL_RANK)."""
        return tuple(range(self.nproc_per_node)) if self.gpu else ()

    def trainer_overrides(self) -> list[str]:
        """Overrides the launch adds to the trainer's command (the URLs of launcher-started
        servers are added by the rendered script, which alone knows the host names)."""
        if self.started_by == "trainer" and self.gpu and self.engine == "sglang":
            ids = [g for s in self.servers for g in s.gpu_ids]
            return [f"rollout.gpu_ids=[{','.join(map(str, ids))}]"]
        if self.started_by == "launcher" and self.mode == "colocated":
            return ["rollout.attached_memory_saver=true"]
        return []


def compute_placement(cfg: RunConfig, cluster: Cluster) -> Placement:
    """The layout of ``cfg`` on ``cluster``; ConfigError when it cannot work."""
    par, ro = cfg.parallel, cfg.rollout
    world = par.world_size
    base = dict(cluster=cluster, engine=ro.engine, world_size=world, parallel=(par.tp, par.pp, par.cp, par.dp))
    if not cluster.gpus_per_node:
        return _cpu_placement(cfg, cluster, base)
    if ro.engine == "embedded":
        pass  # the embedded engine runs on CPU even on GPU nodes: started by rank 0, no GPUs
    elif ro.tp_size > cluster.gpus_per_node:
        raise ConfigError(
            f"`rollout.tp_size` is {ro.tp_size} but a node has {cluster.gpus_per_node} GPUs, and one server "
            f"cannot span nodes: set rollout.tp_size to at most {cluster.gpus_per_node}.")
    if ro.server_urls:
        trainer_nodes, nproc = _disaggregated_trainer(world, cluster, "attached")
        _refuse_idle_nodes(cluster, trainer_nodes, "the trainer (the servers are attached)")
        return Placement(**base, mode="attached", trainer_nodes=trainer_nodes, nproc_per_node=nproc,
                         started_by="none", attached_urls=tuple(ro.server_urls))
    if ro.colocate:
        return _colocated(cfg, cluster, base)
    return _disaggregated(cfg, cluster, base)


def _cpu_placement(cfg: RunConfig, cluster: Cluster, base: dict) -> Placement:
    ro, world = cfg.rollout, cfg.parallel.world_size
    if ro.engine == "sglang" and not ro.server_urls:
        raise ConfigError(
            "`rollout.engine` is sglang, which needs GPUs, but --gpus-per-node is 0 (CPU nodes): give "
            "--gpus-per-node, or use rollout.engine=embedded (the CPU engine).")
    if world % cluster.nodes:
        raise ConfigError(
            f"The trainer world is parallel.tp*pp*cp*dp = {world} processes, which do not split evenly over "
            f"{cluster.nodes} nodes: use --nodes dividing {world} or change parallel.dp.")
    nproc = world // cluster.nodes
    if cluster.procs_per_node and cluster.procs_per_node != nproc:
        raise ConfigError(
            f"--procs-per-node {cluster.procs_per_node} x --nodes {cluster.nodes} = "
            f"{cluster.procs_per_node * cluster.nodes} processes, but the trainer world is parallel.tp*pp*cp*dp "
            f"= {world}: set parallel.dp={_dp_for(cfg, cluster.procs_per_node * cluster.nodes)} or "
            f"--procs-per-node {nproc}.")
    if ro.server_urls:
        return Placement(**base, mode="attached", trainer_nodes=cluster.nodes, nproc_per_node=nproc,
                         started_by="none", attached_urls=tuple(ro.server_urls))
    servers = tuple(ServerSlot(i, 0, (), 1, ro.base_port + i if ro.base_port else 0, ro.mem_fraction)
                    for i in range(ro.num_servers))
    return Placement(**base, mode="colocated" if ro.colocate else "disaggregated", trainer_nodes=cluster.nodes,
                     nproc_per_node=nproc, servers=servers, started_by="trainer")


def _dp_for(cfg: RunConfig, procs: int) -> str:
    mp = cfg.parallel.model_parallel_size
    return str(procs // mp) if procs % mp == 0 else f"<a multiple of tp*pp*cp = {mp}>"


def _colocated(cfg: RunConfig, cluster: Cluster, base: dict) -> Placement:
    ro, world = cfg.rollout, cfg.parallel.world_size
    n, g = cluster.nodes, cluster.gpus_per_node
    if world % n or world // n > g or (n > 1 and world != n * g):
        raise ConfigError(
            f"Colocated, the trainer spans every node, but its world parallel.tp*pp*cp*dp = {world} does not fill "
            f"{n} node(s) x {g} GPUs = {n * g}: set parallel.dp={_dp_for(cfg, n * g)} (or --nodes "
            f"{max(1, world // g)}), or run disaggregated (rollout.colocate=false).")
    nproc = world // n
    if ro.engine == "embedded":
        servers = tuple(ServerSlot(i, 0, (), 1, ro.base_port + i if ro.base_port else 0, ro.mem_fraction)
                        for i in range(ro.num_servers))
        return Placement(**base, mode="colocated", trainer_nodes=n, nproc_per_node=nproc, servers=servers)
    free = {node: list(range(nproc)) for node in range(n)}
    return _place_servers(cfg, cluster, base, "colocated", n, nproc, free)


def _disaggregated_trainer(world: int, cluster: Cluster, what: str) -> tuple[int, int]:
    g = cluster.gpus_per_node
    if world <= g:
        return 1, world
    if world % g:
        raise ConfigError(
            f"The trainer world parallel.tp*pp*cp*dp = {world} does not fill whole {g}-GPU nodes (torchrun runs "
            f"the same number of ranks on every node): make it a multiple of {g} (change parallel.dp) or at "
            f"most {g}.")
    if world // g > cluster.nodes:
        raise ConfigError(
            f"The trainer world of {world} GPUs needs {world // g} nodes of {g} GPUs but the job has "
            f"{cluster.nodes}: use --nodes {world // g} or more, or lower parallel.dp.")
    return world // g, g


def _disaggregated(cfg: RunConfig, cluster: Cluster, base: dict) -> Placement:
    ro, world = cfg.rollout, cfg.parallel.world_size
    g = cluster.gpus_per_node
    trainer_nodes, nproc = _disaggregated_trainer(world, cluster, "disaggregated")
    if ro.engine == "embedded":
        _refuse_idle_nodes(cluster, trainer_nodes, "the trainer (embedded servers run on node 0's CPUs)")
        servers = tuple(ServerSlot(i, 0, (), 1, ro.base_port + i if ro.base_port else 0, ro.mem_fraction)
                        for i in range(ro.num_servers))
        return Placement(**base, mode="disaggregated", trainer_nodes=trainer_nodes, nproc_per_node=nproc,
                         servers=servers)
    free = {node: list(range(nproc if node < trainer_nodes else 0, g)) for node in range(cluster.nodes)}
    return _place_servers(cfg, cluster, base, "disaggregated", trainer_nodes, nproc, free)


def _place_servers(cfg: RunConfig, cluster: Cluster, base: dict, mode: str, trainer_nodes: int, nproc: int,
                   free: dict[int, list[int]]) -> Placement:
    """Servers of tp_size consecutive free GPUs of one node, filling nodes in order."""
    ro = cfg.rollout
    tp = ro.tp_size
    chunks = [(node, tuple(gpus[i:i + tp])) for node, gpus in free.items() for i in range(0, len(gpus) - tp + 1, tp)]
    if len(chunks) < ro.num_servers:
        where = "on the trainer's GPUs" if mode == "colocated" else "left after the trainer's"
        fit = len(chunks)
        raise ConfigError(
            f"{ro.num_servers} rollout servers of tp_size {tp} do not fit: {fit} fit {where} ({mode}, "
            f"{cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs, trainer on {trainer_nodes * nproc} GPUs): "
            f"set rollout.num_servers={fit}" + ("" if mode == "colocated" else
                                                 f", or add nodes (--nodes {_nodes_needed(cfg, cluster, nproc, trainer_nodes)})")
            + (", or lower rollout.tp_size." if tp > 1 else "."))
    start = ro.base_port or DEFAULT_SERVER_PORT
    used: dict[int, int] = {}
    servers = []
    for i, (node, gpus) in enumerate(chunks[:ro.num_servers]):
        servers.append(ServerSlot(i, node, gpus, tp, start + used.get(node, 0), ro.mem_fraction))
        used[node] = used.get(node, 0) + 1
    busy = set(range(trainer_nodes)) | set(used)
    idle = [node for node in range(cluster.nodes) if node not in busy]
    if idle:
        raise ConfigError(
            f"Node(s) {idle} of the {cluster.nodes} would run nothing (trainer on {trainer_nodes}, servers on "
            f"{sorted(used)}): use --nodes {cluster.nodes - len(idle)}, or raise rollout.num_servers.")
    on_node0 = all(s.node == 0 for s in servers)
    started_by = "trainer" if on_node0 else "launcher"
    if started_by == "trainer" and not ro.base_port:  # the trainer picks free ports itself
        servers = [ServerSlot(s.index, s.node, s.gpu_ids, s.tp_size, 0, s.mem_fraction) for s in servers]
    return Placement(**base, mode=mode, trainer_nodes=trainer_nodes, nproc_per_node=nproc,  # type: ignore[arg-type]
                     servers=tuple(servers), started_by=started_by)


def _nodes_needed(cfg: RunConfig, cluster: Cluster, nproc: int, trainer_nodes: int) -> int:
    g, tp = cluster.gpus_per_node, cfg.rollout.tp_size
    left = cfg.rollout.num_servers - sum((g - (nproc if n < trainer_nodes else 0)) // tp for n in range(trainer_nodes))
    per_node = g // tp
    return trainer_nodes + max(0, -(-left // per_node))


def _refuse_idle_nodes(cluster: Cluster, trainer_nodes: int, who: str) -> None:
    if cluster.nodes > trainer_nodes:
        raise ConfigError(
            f"Only {who} needs nodes, {trainer_nodes} of them, but --nodes is {cluster.nodes}: "
            f"use --nodes {trainer_nodes}.")


def _span(ids: tuple[int, ...] | list[int]) -> str:
    ids = list(ids)
    if not ids:
        return "-"
    if ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 2:
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(map(str, ids))


def format_placement(p: Placement) -> str:
    """A readable table: one row per node for the trainer, one per server."""
    tp, pp, cp, dp = p.parallel
    hw = f"{p.cluster.gpus_per_node} GPUs" if p.gpu else "CPU"
    where = {"colocated": "colocated: servers share the trainer's GPUs, their memory released while the actor trains",
             "disaggregated": "disaggregated: servers on their own GPUs",
             "attached": "attached: the recipe's rollout.server_urls"}[p.mode]
    if not p.gpu and p.mode != "attached":
        where = "CPU: embedded servers beside rank 0"
    lines = [f"Placement: {p.nodes} node(s) x {hw}; {where}",
             f"trainer: {p.world_size} ranks (tp {tp} x pp {pp} x cp {cp} x dp {dp}), {p.nproc_per_node} per node "
             f"on node(s) {_span(list(range(p.trainer_nodes)))}"]
    rows = [("node", "role", "GPUs", "tp-size", "port", "mem-fraction")]
    for node in range(p.trainer_nodes):
        first = node * p.nproc_per_node
        rows.append((str(node), f"trainer ranks {first}-{first + p.nproc_per_node - 1}",
                     _span(p.trainer_gpus()), "", "", ""))
    for s in p.servers:
        rows.append((str(s.node), f"rollout server {s.index} ({p.engine})", _span(s.gpu_ids),
                     str(s.tp_size), str(s.port) if s.port else "free", f"{s.mem_fraction:g}" if p.gpu else "-"))
    rows.sort(key=lambda r: (r[0] != "node", int(r[0]) if r[0].isdigit() else 0))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if p.mode == "attached":
        lines.append("servers: " + ", ".join(p.attached_urls))
    elif p.started_by == "trainer":
        lines.append("servers started by the trainer's rank 0 on node 0")
    else:
        lines.append("servers started by the launcher on their nodes; their URLs are passed as rollout.server_urls")
    return "\n".join(lines)
