"""Everything one run holds, built in order and torn down in reverse.

All ranks: the topology, the actor (DDP model + optimizer, loaded from the start point),
the frozen reference model when ``kl_coef > 0``, and the weight sync (``link``: an
``ActorSync`` for the distributed and shm transports, one sender per pipeline stage; the
leaders of stages > 0 hold a rollout client of their own for it). Rank 0 only:
the tokenizer and datasets, the rollout servers (launched, or attached via
``rollout.server_urls``), the rollout client and the reward pool. Steps that only rank 0
performs share their outcome with every rank (``dist_utils.on_rank0``), so a bad data file
or a server that will not start stops the whole world with one clear error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import shutil
import tempfile
import threading
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_rl.config.run import RunConfig, dump_config
from megatron_rl.errors import ConfigError, DataError, RolloutError
from megatron_rl.trainer.dist_utils import any_rank, broadcast, on_rank0
from megatron_rl.trainer.resume import StartPoint, find_start

log = logging.getLogger("megatron_rl.train")


def check_world(cfg: RunConfig) -> None:
    """The launched world must be the recipe's (tp*pp*cp*dp)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = cfg.parallel.world_size
    if world != want:
        p = cfg.parallel
        raise ConfigError(
            f"This job runs {world} trainer processes, but the recipe's layout tp={p.tp} x pp={p.pp} x "
            f"cp={p.cp} x dp={p.dp} needs {want}: launch {want} processes (torchrun --nproc-per-node "
            f"{want}), or set `parallel.dp={max(world // p.model_parallel_size, 1)}` when {world} is a "
            f"multiple of tp*pp*cp = {p.model_parallel_size}.")


class LoopThread:
    """The run's asyncio loop, in a thread of its own, so that rank 0 can generate the next
    batches (``rollout.mode`` one_step_off / async) while the main thread trains. Everything
    asynchronous (client, reward grading, weight sync) runs on this one loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        device = torch.cuda.current_device() if torch.cuda.is_available() else None
        self.thread = threading.Thread(target=self._main, args=(device,), name="megatron-rl-asyncio", daemon=True)
        self.thread.start()

    def _main(self, device: int | None) -> None:
        if device is not None:
            torch.cuda.set_device(device)  # CUDA's current device is per thread: the sync exports here
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro):
        """Run ``coro`` on the loop; block this thread until it is done (its error is raised here)."""
        return self.submit(coro).result()

    def cancel_all(self) -> None:
        """Cancel whatever still runs on the loop (an interrupted step's requests); waits for it."""
        async def cancel() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self.thread.is_alive():
            self.run(cancel())

    def close(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
        if not self.thread.is_alive():
            self.loop.close()


@dataclass
class Session:
    cfg: RunConfig
    topo: Any
    dims: Any
    hf_dir: Path
    actor: Any
    ref_actor: Any | None
    start: StartPoint
    start_step: int
    extra: dict[str, Any]
    out_dir: Path
    aio: LoopThread
    stack: ExitStack = field(default_factory=ExitStack)
    # rank 0 only
    tokenizer: Any = None
    stream: Any = None
    eval_set: Any = None
    client: Any = None
    pool: Any = None
    # every rank (distributed / shm transports): the per-stage weight sync
    link: Any = None
    sync_client: Any = None
    """A stage leader's own rollout client (leaders of stages > 0; rank 0 uses ``client``)."""
    shm_dir: str | None = None
    link_opens: int = 0
    sender: Any = None
    """Rank 0, distributed transport on a CUDA actor: the single weight group of ``sync_actor_weights``."""

    @property
    def rank0(self) -> bool:
        return self.topo.rank == 0

    def run(self, coro):
        """Run a coroutine on the run's loop thread and wait for it (any rank)."""
        return self.aio.run(coro)

    def drop_dead_servers(self) -> bool:
        """Collective: rank 0 forgets servers that are down and, if any, every rank abandons the
        weight sync (its groups' peers are gone) and opens a new one with the survivors, whose
        first sync is full. True when something was dropped. A run with no server left stops
        with a RolloutError (after saving, see ``loop``)."""
        def check() -> list[str]:
            health = self.run(self.client.health())
            dead = [s.url for s in self.client.pool.servers if not (s.alive and health.get(s.url))]
            if dead and len(dead) == len(self.client.pool.servers):
                raise RolloutError(f"Every rollout server is down ({', '.join(dead)}); see their logs in "
                                   f"{self.out_dir / 'servers'}.")
            if dead:
                log.error("rollout server(s) %s are down: continuing with %d survivor(s)", dead,
                          len(self.client.pool.servers) - len(dead))
                self.client.pool.servers = [s for s in self.client.pool.servers if s.url not in dead]
            return dead

        dead = on_rank0(check)
        if dead and self.link is not None:
            self.link.abandon()
            if self.sync_client is not None:
                self.sync_client.pool.servers = [s for s in self.sync_client.pool.servers if s.url not in dead]
            self.open_link()
        elif dead and self.cfg.rollout.sync_transport == "distributed":
            if self.sender is not None:
                self.sender.group.close()  # its peers are gone: the group cannot be reused
            self.connect_sender(f"megatron_rl_sync_{len(dead)}")
        return bool(dead)

    def connect_sender(self, group_name: str) -> None:
        """Collective (distributed transport, CUDA actor): rank 0 opens the one weight group."""
        from megatron_rl.weights.actor_sync import connect_actor_sender
        from megatron_rl.weights.sync import address_toward

        r = self.cfg.rollout
        address = (r.sync_address or address_toward([x.url for x in self.client.pool.servers])) if self.rank0 else ""
        self.sender = self.run(connect_actor_sender(self.topo, self.client if self.rank0 else None,
                                                    backend=weight_sync_backend(self.cfg), group_name=group_name,
                                                    master_address=address, timeout_s=r.health_timeout_s))

    def open_link(self) -> None:
        """Collective: open the per-stage weight sync (``ActorSync``) with the current servers."""
        from megatron_rl.weights.stage_sync import ActorSync, SyncOptions
        from megatron_rl.weights.sync import address_toward

        r = self.cfg.rollout
        self.link_opens += 1
        opts = SyncOptions(transport=r.sync_transport, bucket_bytes=r.bucket_size_mb << 20, delta=r.sync_delta,
                           full_every=r.sync_full_every, shm_dir=self.shm_dir,
                           persistent_shm=servers_map_buckets(self.cfg),
                           group_name=f"megatron_rl_weights_{self.link_opens}", backend=weight_sync_backend(self.cfg),
                           timeout_s=r.health_timeout_s)
        receiver = self.client if self.rank0 else self.sync_client
        if receiver is not None and r.sync_transport == "distributed":
            # Each stage's sender listens here: on a multi-node job the servers are elsewhere.
            address = r.sync_address or address_toward([x.url for x in receiver.pool.servers])
            opts = dataclasses.replace(opts, master_address=address)
        self.link = self.run(ActorSync.open(self.actor.model[0], self.dims, self.topo, receiver, opts))

    def close(self) -> None:
        """Best effort, in reverse: a dead server must not hide the error that ended the run."""
        try:
            self.aio.cancel_all()  # an interrupted step's generation, a pipeline still producing
        except Exception as e:  # noqa: BLE001 - teardown: log and go on
            log.debug("while cancelling pending work: %s", e)
        if self.link is not None:  # this rank alone: after a failure the others may be gone
            try:
                self.run(self.link.close(collective=False))
            except Exception as e:  # noqa: BLE001 - teardown: log and go on
                log.debug("while closing the weight sync: %s", e)
            self.link = None
        for closing in (self.sender, self.sync_client, self.client):
            if closing is None:
                continue
            try:
                self.run(closing.close())
            except Exception as e:  # noqa: BLE001 - teardown: log and go on
                log.debug("while closing %s: %s", type(closing).__name__, e)
        try:
            self.stack.close()
        finally:
            self.aio.close()


def build_actor(cfg: RunConfig, topo, dims, *, optimizer: bool = True):
    from megatron_rl.actor.actor import Actor
    from megatron_rl.actor.model import build_model, build_optimizer
    from megatron_rl.models.builder import DTYPES

    model = build_model(dims, cfg.parallel, cfg.model, topo, ddp=optimizer)
    opt = build_optimizer(model, cfg.optimizer, cfg.parallel, DTYPES[cfg.model.dtype]) if optimizer else None
    return Actor(model, dims, topo, opt)


def load_start(cfg: RunConfig, actor, start: StartPoint, topo, dims) -> tuple[int, dict[str, Any]]:
    """Fill the actor from the start point; returns (completed steps, the checkpoint's extra)."""
    from megatron_rl.actor.model import load_model_weights
    from megatron_rl.checkpoint.state import load_checkpoint

    if start.kind == "fresh":
        load_model_weights(actor.model, cfg.model.path, dims, cfg.parallel, cfg.model, topo)
        actor.optimizer.reload_model_params()
        return 0, {}
    extra = load_checkpoint(start.path, actor.model, actor.optimizer, load_optimizer=True,
                            load_rng=start.kind == "resume")
    return int(extra.get("step", 0)), extra


def open_session(cfg: RunConfig) -> Session:
    from megatron_rl.actor.model import load_model_weights, resolve_model_dir
    from megatron_rl.models.hf_config import read_dims
    from megatron_rl.parallel.topology import Topology

    check_world(cfg)
    topo = Topology.initialize(cfg.parallel, seed=cfg.seed)
    out_dir = Path(cfg.logging.output_dir)
    start = on_rank0(lambda: find_start(cfg))
    hf_dir = Path(on_rank0(lambda: str(resolve_model_dir(cfg.model.path))))
    dims = read_dims(hf_dir)
    actor = build_actor(cfg, topo, dims)
    start_step, extra = load_start(cfg, actor, start, topo, dims)
    ref_actor = None
    if cfg.algorithm.kl_coef > 0:
        # The reference is the stage's starting model, frozen: the previous stage's weights
        # for a stage, model.path otherwise (the same on every resume of this run).
        ref_actor = build_actor(cfg, topo, dims, optimizer=False)
        ref_src = cfg.checkpoint.init_from or cfg.model.path
        load_model_weights(ref_actor.model, ref_src, dims, cfg.parallel, cfg.model, topo)
        for p in ref_actor.model[0].parameters():
            p.requires_grad_(False)
    s = Session(cfg=cfg, topo=topo, dims=dims, hf_dir=hf_dir, actor=actor, ref_actor=ref_actor, start=start,
                start_step=start_step, extra=extra, out_dir=out_dir, aio=LoopThread())
    try:
        _open_services(s)
    except BaseException:
        s.close()
        raise
    return s


def _open_data(s: Session) -> str:
    from megatron_rl.data.prompts import PromptDataset, PromptStream
    from megatron_rl.data.template import load_tokenizer

    cfg = s.cfg
    s.out_dir.mkdir(parents=True, exist_ok=True)
    (s.out_dir / "config.yaml").write_text(dump_config(cfg))
    s.tokenizer = load_tokenizer(str(s.hf_dir))
    dataset = PromptDataset.from_config(cfg.data, s.tokenizer)
    s.stream = PromptStream(dataset, seed=cfg.seed, shuffle=cfg.data.shuffle)
    data_state = s.extra.get("data")
    if data_state and s.extra.get("data_files") == list(cfg.data.train_files):
        try:
            s.stream.load_state_dict(data_state)
        except DataError:
            if s.start.kind != "stage":  # the same run's data changed under it: refuse
                raise
            log.warning("stage: the data differs from the previous stage's (size or order): its stream starts over")
    if cfg.eval.files:
        s.eval_set = PromptDataset.from_config(cfg.data, s.tokenizer, files=list(cfg.eval.files))
    log.info("data: %d prompts (%d dropped over data.max_prompt_len=%d)%s", len(dataset), dataset.num_dropped,
             cfg.data.max_prompt_len, f", {len(s.eval_set)} eval problems" if s.eval_set is not None else "")
    return "ok"


def _server_model_dir(s: Session) -> Path:
    """An HF directory with weights for the servers to boot from (synced right after)."""
    from megatron_rl.trainer.export import export_hf_dir

    if any(s.hf_dir.glob("*.safetensors")) or (s.hf_dir / "model.safetensors.index.json").exists():
        return s.hf_dir
    return export_hf_dir(s.actor.model[0], s.dims, s.topo, s.out_dir / "hf_init", s.hf_dir)


def _shm_dir(s: Session) -> str:
    """Rank 0 (sync_transport shm): a private directory on this node's RAM file system for the
    weight buckets, given to the servers it launches (--weight-shm-dir) and removed after them."""
    root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = tempfile.mkdtemp(prefix="megatron-rl-weights-", dir=root)
    s.stack.callback(shutil.rmtree, path, True)  # entered before the servers: removed after they stop
    return path


def servers_map_buckets(cfg: RunConfig) -> bool:
    """Whether the servers this run launches (``--weight-layout auto``) hold the actor's dtype
    row-major, so they can take shared-memory buckets as their weights (zero-copy sync)."""
    from megatron_rl.rollout.layout import DTYPES, wants_transposed

    r = cfg.rollout
    dtype = DTYPES.get(r.server_dtype)
    return r.server_dtype == cfg.model.dtype and dtype is not None and not wants_transposed("auto", dtype, r.deterministic)


def stage_sync_enabled(cfg: RunConfig) -> bool:
    """Whether weights go through ``ActorSync`` (per-stage senders, delta, shared memory). It
    fills CPU buckets and moves TP shards with CPU tensors, so it serves CPU actors (gloo) only;
    a CUDA actor keeps rank 0's single-group ``sync_actor_weights`` over NCCL."""
    return cfg.rollout.sync_transport in ("distributed", "shm") and not torch.cuda.is_available()


def _open_services(s: Session) -> None:
    cfg = s.cfg
    if torch.cuda.is_available() and (cfg.rollout.sync_delta or cfg.rollout.sync_transport == "shm"):
        raise ConfigError(
            "`rollout.sync_delta` and `rollout.sync_transport: shm` go through the per-stage weight sync, "
            "which runs on CPU actors only today (CPU buckets, gloo); on GPUs use `rollout.sync_transport: "
            "distributed` with `rollout.sync_delta: false`.")
    on_rank0(lambda: _open_data(s))
    server_dir = _server_model_dir(s) if not cfg.rollout.server_urls else s.hf_dir
    shm = cfg.rollout.sync_transport == "shm"

    def start_services() -> str:
        from megatron_rl.rewards import RewardPool
        from megatron_rl.rollout.client import RolloutClient
        from megatron_rl.rollout.servers import ServerManager

        urls = list(cfg.rollout.server_urls)
        if not urls:
            extra = ["--threads", str(cpu_threads(cfg))] if cfg.rollout.engine == "embedded" else []
            if shm:
                s.shm_dir = _shm_dir(s)
                extra += ["--weight-shm-dir", s.shm_dir]
            manager = ServerManager(cfg.rollout, str(server_dir), log_dir=s.out_dir / "servers", extra_args=extra)
            urls = s.stack.enter_context(manager).urls  # entering starts them and waits until healthy
        s.client = RolloutClient.from_config(cfg.rollout, urls)
        s.pool = s.stack.enter_context(RewardPool(
            cfg.reward.num_workers, max_queue=max(64, 2 * cfg.reward.num_workers),
            math_timeout_s=cfg.reward.timeout_s, code_timeout_s=cfg.reward.code_test_timeout_s,
            require_think_close=cfg.reward.require_think_close))
        return ",".join(urls)

    urls = on_rank0(start_services)
    log.info("rollout servers: %s", urls) if s.rank0 else None
    if cfg.rollout.sync_transport == "distributed" and not stage_sync_enabled(cfg):
        s.connect_sender("megatron_rl_sync")
    elif stage_sync_enabled(cfg):
        from megatron_rl.rollout.client import RolloutClient
        from megatron_rl.weights.stage_sync import ActorSync

        if shm:
            s.shm_dir = broadcast(s.shm_dir)
            if any_rank(s.shm_dir is None or not os.path.isdir(s.shm_dir)):
                raise ConfigError(
                    f"`rollout.sync_transport: shm` needs every trainer rank on the node of the servers it "
                    f"launched (their shared-memory directory {s.shm_dir} is not on every rank's node); use "
                    "`rollout.sync_transport: distributed` for a multi-node job.")
        if ActorSync.roles(s.topo)[1] and not s.rank0:  # the leader of a later pipeline stage sends itself
            s.sync_client = RolloutClient.from_config(cfg.rollout, urls.split(","))
        s.open_link()
    broadcast(None)


def weight_sync_backend(cfg: RunConfig) -> str:
    """The weight group's backend: NCCL between GPUs; gloo when the servers are embedded
    engines, which hold their weights in CPU memory even on a GPU machine."""
    return "nccl" if torch.cuda.is_available() and cfg.rollout.engine != "embedded" else "gloo"


def cpu_threads(cfg: RunConfig) -> int:
    """Torch threads per process on a CPU machine: the cores shared out between this machine's
    trainer ranks and the embedded servers rank 0 launches. Oversubscribed OpenMP regions wait
    for descheduled workers (measured: 2 threads each on 2 cores made a step ~20% slower)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    servers = cfg.rollout.num_servers if cfg.rollout.engine == "embedded" and not cfg.rollout.server_urls else 0
    return max(1, (os.cpu_count() or 1) // (local + servers))


def torch_threads(cfg: RunConfig) -> None:
    if not torch.cuda.is_available():
        torch.set_num_threads(cpu_threads(cfg))
