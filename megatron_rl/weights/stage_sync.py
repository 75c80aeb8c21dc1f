"""Weight sync from a live TP/PP Megatron actor, one sender per pipeline stage, full or delta.

``ActorSync`` is opened once and syncs many times (every actor rank calls ``open``, ``sync``
and ``close``: they are collective). Roles:

- *stage leader* (TP, CP and DP rank 0 of each stage): owns that stage's buckets
  (``buckets.plan_stage``, computed once), two flat buffers reused across syncs, and its own
  link to the servers: a weight group of its own (``<group_name>-pp<stage>``, SGLang's
  protocol) for ``distributed``, or files in shared memory (``shm``, colocated). A thread
  fills bucket k+1 from the TP shards while bucket k is sent. Stage leaders send in parallel:
  rank 0 no longer relays the other stages.
- *TP peers* of a leader write their shards of each bucket into it. On the leader's node
  (checked at ``open``: each peer maps the leader's files and reads back a random token) the
  buckets are shared-memory files every TP rank maps, and the leader's fill thread only hands
  each peer a bucket slot and waits for its "done" (``fill_own_shards`` on every rank, in
  parallel; nothing crosses a socket). Otherwise, or with ``SyncOptions.shared_fill`` off,
  they send their shards point to point (``buckets.send_shards``).
- every other rank (CP/DP replicas) only joins the outcome check.

Rank 0 (stage 0's leader) pauses generation first and flushes / continues after every stage
is done; then all ranks learn every stage's outcome and raise together on a failure.

Delta sync (``SyncOptions.delta``): each leader keeps the bytes it last sent (memory: one
copy of its stage's weights in the sync dtype, e.g. 0.99 GB for a 494M bf16 model) and
sends each bucket as a ``delta.encode`` payload with a checksum per tensor. A server that
finds a checksum mismatch refuses the bucket; the leader sends that bucket in full at once
and every later bucket of that sync in full too, so no server keeps weights that differ
from the actor's without an error. Every ``full_every``-th sync, the first one, and any
``sync(full=True)`` are full.

Every stage leader needs a ``WeightReceiver`` (a rollout client) of its own: with PP > 1 the
trainer creates one on each leader, not only on rank 0.

Test hook (fault injection): ``MEGATRON_RL_FAULT_CORRUPT_DELTA=<i>`` in a leader's environment
makes it flip one byte of its first non-empty delta payload in the sync of index i (0-based,
counted per ``ActorSync``), as a corrupted transfer would; the server's checksum must refuse
it and the bucket go again in full. Read once, at ``open``; tests set it, nothing else should.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist

from megatron_rl.errors import RolloutError, UserError
from megatron_rl.models.hf_config import ModelDims
from megatron_rl.weights import delta as D
from megatron_rl.weights.buckets import (
    BucketSpec,
    fill_bucket,
    fill_own_shards,
    named_params,
    peer_ranks,
    plan_stage,
    send_shards,
)
from megatron_rl.weights.shm import DEFAULT_ROOT, ShmSlots, handle
from megatron_rl.weights.sync import DistributedSender, WeightReceiver, broadcast_during

if TYPE_CHECKING:
    from megatron_rl.parallel.topology import Topology

log = logging.getLogger(__name__)
StageTransport = Literal["distributed", "shm"]
FAULT_CORRUPT_DELTA = "MEGATRON_RL_FAULT_CORRUPT_DELTA"
"""Test hook (see the module docstring): the index of the sync whose first delta payload is corrupted."""


def _fault_sync_index() -> int | None:
    value = os.environ.get(FAULT_CORRUPT_DELTA, "").strip()
    return int(value) if value else None


@dataclass(frozen=True)
class SyncOptions:
    """How ``ActorSync`` sends (the trainer fills it from ``RolloutConfig``)."""

    transport: StageTransport = "distributed"
    """distributed: a weight group per stage (SGLang's broadcast); shm: shared-memory files (same node)."""
    bucket_bytes: int = 512 << 20
    """Bucket size; two buckets per stage leader are allocated once (plus the TP receive scratch)."""
    delta: bool = False
    """Send only the elements that changed since the last sync (with per-tensor checksums)."""
    full_every: int = 10
    """With delta: every full_every-th sync is full (0 = only the first and ``sync(full=True)``)."""
    shm_dir: str | None = None
    """shm: the directory the servers were started with (``serve --weight-shm-dir``)."""
    persistent_shm: bool = False
    """shm without delta: one file per bucket, kept for the link's life (memory: the stage's
    weights once, instead of two buckets); a server holding the wire dtype row-major maps them
    as its weights (zero copy: a sync is the TP ranks' writes). Set when servers run in the
    actor's dtype."""
    shared_fill: bool = True
    """TP > 1: when the TP team shares the leader's node, every rank writes its own shards into
    shared-memory buckets (a private directory under /dev/shm unless the shm transport's files
    are the buckets). False, or another node: shards are sent to the leader point to point."""
    group_name: str = "megatron_rl_weights"
    backend: str = "gloo"
    master_address: str = "127.0.0.1"
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.transport not in ("distributed", "shm"):
            raise ValueError(f"transport {self.transport!r}: use 'distributed' or 'shm'")
        if self.bucket_bytes < 1 or self.full_every < 0:
            raise ValueError("bucket_bytes must be >= 1 and full_every >= 0")


@dataclass
class StageStats:
    """What one stage leader sent in one sync."""

    full_bytes: int = 0
    sent_bytes: int = 0
    tensors: int = 0
    buckets: int = 0
    delta_buckets: int = 0
    changed: int = 0
    """Elements that differed from the previous sync (counted in delta buckets)."""
    elements: int = 0
    fallbacks: int = 0
    """Buckets a server refused on a checksum mismatch and that were then sent in full."""
    fill_s: float = 0.0
    """Seconds filling buckets from the TP shards (the fill thread; overlaps sending)."""
    encode_s: float = 0.0
    """Seconds encoding deltas and computing their checksums."""
    send_s: float = 0.0
    """Seconds in the transmits (broadcast or shared-memory write, plus the servers' load)."""

    def add(self, other: StageStats) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))


@dataclass(frozen=True)
class ActorSyncReport:
    """One sync, all stages together (rank 0's view)."""

    transport: str
    seconds: float
    full: bool
    stats: StageStats = field(default_factory=StageStats)

    @property
    def gb_per_s(self) -> float:
        """Model bytes (not wire bytes) per second, GB/s."""
        return self.stats.full_bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")

    @property
    def sent_fraction(self) -> float:
        return self.stats.sent_bytes / max(self.stats.full_bytes, 1)


class _Leader:
    """A stage leader's buffers, link to the servers and delta base."""

    def __init__(self, receiver: WeightReceiver, specs: list[BucketSpec], opts: SyncOptions, tp: int,
                 sender: DistributedSender | None, slots: ShmSlots | None):
        self.receiver, self.specs, self.opts, self.sender, self.slots = receiver, specs, opts, sender, slots
        self.tp = tp
        size = max((s.nbytes for s in specs), default=0)
        self.direct = slots is not None and not opts.delta  # the transport's shared files are the fill buffers
        self.persistent = self.direct and opts.persistent_shm  # one file per bucket, kept: zero-copy servers
        self.fill: ShmSlots | None = None  # shared fill buffers of our own (TP peers map them)
        self.fill_dir: str | None = None
        if not self.direct and tp > 1 and opts.shared_fill:
            self.fill = _private_fill_slots(size)
            self.fill_dir = None if self.fill is None else str(self.fill.directory)
        self.peers_share = False  # set by ActorSync.open once every TP peer has mapped the buffers
        shared = self.slots if self.direct else self.fill
        self.buffers = list(shared.tensors) if shared is not None else [torch.zeros(size, dtype=torch.uint8)
                                                                         for _ in range(2)]
        self._scratch_bytes = max((s.recv_bytes for s in specs), default=0) * (tp - 1)
        self.scratch: torch.Tensor | None = None
        """The point-to-point path's receive buffer (TP > 1 and the peers do not share the buckets)."""
        self.base: list[torch.Tensor | None] = [None] * len(specs)
        self.algo = D.checksum_algos()[0]
        self.corrupt_at = _fault_sync_index()  # test hook only
        self.corrupt_now = False

    @classmethod
    async def open(cls, receiver: WeightReceiver, specs: list[BucketSpec], opts: SyncOptions, topo: Topology) -> _Leader:
        sender = slots = None
        if opts.transport == "distributed":
            sender = await DistributedSender.connect(
                receiver, master_address=opts.master_address, group_name=f"{opts.group_name}-pp{topo.pp_rank}",
                backend=opts.backend, timeout_s=opts.timeout_s)
        else:
            size = max((s.nbytes for s in specs), default=0)
            count = 1 if opts.delta else len(specs) if opts.persistent_shm else 2
            slots = ShmSlots(opts.shm_dir or DEFAULT_ROOT, size, count=max(count, 1), tag=f"pp{topo.pp_rank}")
        return cls(receiver, specs, opts, topo.tp, sender, slots)

    def shared_buffers(self) -> ShmSlots | None:
        """The shared-memory files the fill buffers live in (None: private buffers)."""
        return self.slots if self.direct else self.fill

    def share_token(self) -> dict | None:
        """What TP peers need to map the fill buffers, with a random token written into the
        first one so each peer can prove it maps the same memory (None: nothing to share)."""
        shared = self.shared_buffers() if self.tp > 1 and self.opts.shared_fill else None
        if shared is None:
            return None
        token = secrets.token_bytes(16)
        shared.tensors[0][:16].copy_(torch.frombuffer(bytearray(token), dtype=torch.uint8))
        return {"dir": str(shared.directory), "names": shared.names, "nbytes": shared.nbytes, "token": token}

    def shared_by_peers(self, ok: bool) -> None:
        """After every peer tried to map the buffers: use them (and drop the private files'
        names, so a killed run leaves nothing in /dev/shm) or fall back to point to point."""
        self.peers_share = ok
        if not ok and self._scratch_bytes:
            self.scratch = torch.zeros(self._scratch_bytes, dtype=torch.uint8)
        if self.fill is not None:
            self.fill.unlink()
            _remove_dir(self.fill_dir)
        if not ok and self.shared_buffers() is not None:
            log.warning("weight sync: the TP peers cannot map this leader's shared-memory buckets (another "
                        "node?); they send their shards point to point")

    def drop_files(self) -> None:
        """Unmap and remove this leader's shared-memory files (transport slots and fill buffers)."""
        if self.slots is not None:
            self.slots.close()
        if self.fill is not None:
            self.fill.close()
            _remove_dir(self.fill_dir)

    async def close(self) -> None:
        self.drop_files()
        if self.sender is not None:
            await self.sender.close()

    async def run(self, params: dict[str, torch.Tensor], dims: ModelDims, tp_group, *, full: bool,
                  weight_version: str | None, index: int = -1) -> StageStats:
        """Fill (thread) and send (here) every bucket; the fill of k+1 overlaps the send of k."""
        self.corrupt_now = index == self.corrupt_at
        filled: queue.Queue[Any] = queue.Queue()
        free: queue.Queue[int] = queue.Queue()
        for i in range(len(self.buffers)):
            free.put(i)

        stats, error, force_full = StageStats(), None, full

        def produce() -> None:
            try:
                for k, spec in enumerate(self.specs):
                    i = free.get()
                    if self.persistent:
                        i = k  # bucket k's own file (a free slot was taken only to keep the count)
                    t0 = time.perf_counter()
                    if self.peers_share:
                        _fill_shared(spec, params, dims, tp_group, self.buffers[i], i)
                    else:
                        fill_bucket(spec, params, dims, tp_group, self.buffers[i][:spec.nbytes], self.scratch)
                    stats.fill_s += time.perf_counter() - t0
                    filled.put(i)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
                filled.put(e)

        producer = threading.Thread(target=produce, name="weight-fill", daemon=True)
        producer.start()
        try:
            for k, spec in enumerate(self.specs):
                item = await asyncio.to_thread(filled.get)
                if isinstance(item, BaseException):
                    raise item
                if error is None:  # after a failure keep draining: the TP peers are mid-send
                    try:
                        force_full = await self._send(k, spec, self.buffers[item][:spec.nbytes], force_full,
                                                      weight_version, stats, item)
                    except Exception as e:  # noqa: BLE001 - raised once the fill is drained
                        error = e
                free.put(item)
        finally:
            await asyncio.to_thread(producer.join)
        if error is not None:
            raise error
        return stats

    async def _send(self, k: int, spec: BucketSpec, flat: torch.Tensor, force_full: bool,
                    version: str | None, stats: StageStats, slot: int) -> bool:
        """Send bucket k (delta or full); returns whether the rest of this sync goes full."""
        stats.full_bytes += spec.nbytes
        stats.tensors += len(spec.entries)
        stats.buckets += 1
        base = self.base[k]
        if self.opts.delta and base is not None and not force_full:
            t0 = time.perf_counter()
            kind, changed, payload, idx_K = D.encode(flat, base, spec.elem_size)
            if self.corrupt_now and changed > 0:  # test hook: a value byte flipped on the way
                log.warning("%s: corrupting a delta payload on purpose (test hook)", FAULT_CORRUPT_DELTA)
                payload, self.corrupt_now = payload.clone(), False
                payload[-1] ^= 0x10
            sums = tuple(D.checksum(flat[e.offset:e.offset + e.nbytes], self.algo) for e in spec.entries)
            header = D.DeltaHeader(kind, changed, payload.numel(), self.algo, sums)
            stats.encode_s += time.perf_counter() - t0
            stats.delta_buckets += 1
            stats.changed += changed
            stats.elements += spec.nbytes // spec.elem_size
            try:
                await self._transmit(spec, payload, header, version, slot, stats)
                stats.sent_bytes += payload.numel()
            except UserError as e:
                if D.MISMATCH_MARKER not in str(e):
                    raise
                log.warning("weight sync: a server refused a delta bucket (%s); sending it and the rest of this "
                            "sync in full", e)
                stats.fallbacks += 1
                await self._transmit(spec, flat, None, version, slot, stats)
                stats.sent_bytes += payload.numel() + spec.nbytes
                base.copy_(flat)
                return True
            if idx_K is None:
                base.copy_(flat)
            else:  # only the changed elements differ from the base
                words = D.as_words(base, spec.elem_size)
                words[idx_K] = D.as_words(flat, spec.elem_size)[idx_K]
            return force_full
        await self._transmit(spec, flat, None, version, slot, stats)
        stats.sent_bytes += spec.nbytes
        if self.opts.delta:
            if base is None:
                self.base[k] = flat.clone()
            else:
                base.copy_(flat)
        return force_full

    async def _transmit(self, spec: BucketSpec, payload: torch.Tensor, header: D.DeltaHeader | None,
                        version: str | None, slot: int, stats: StageStats) -> None:
        t0 = time.perf_counter()
        try:
            await self._transmit_now(spec, payload, header, version, slot)
        finally:
            stats.send_s += time.perf_counter() - t0

    async def _transmit_now(self, spec: BucketSpec, payload: torch.Tensor, header: D.DeltaHeader | None,
                            version: str | None, slot: int) -> None:
        names, dtypes, shapes = spec.wire()
        meta = None if header is None else header.to_json()
        if self.sender is not None:
            body = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": self.sender.group.name,
                    "load_format": "delta" if meta else "flattened_bucket", "delta": meta, "flush_cache": False,
                    "weight_version": version}
            await broadcast_during(self.receiver.post_weights("/update_weights_from_distributed", body),
                                   self.sender.group, [payload])
            return
        assert self.slots is not None
        if self.opts.delta:  # the fill buffers are private: copy the payload into the shared file
            slot = 0
            self.slots.tensors[0][:payload.numel()].copy_(payload)
        h = handle(self.slots.names[slot], payload.numel(), names, dtypes, shapes, meta, persistent=self.persistent)
        await self.receiver.post_weights("/update_weights_from_tensor", {
            "serialized_named_tensors": [h], "load_format": "shared_memory", "flush_cache": False,
            "weight_version": version})


def _private_fill_slots(nbytes: int) -> ShmSlots | None:
    """Two fill buffers in a fresh directory on this node's RAM file system, or None (with a
    warning) where there is none or it is too small: the TP peers then send point to point."""
    if not os.path.isdir(DEFAULT_ROOT):
        return None
    path = tempfile.mkdtemp(prefix="megatron-rl-fill-", dir=DEFAULT_ROOT)
    try:
        return ShmSlots(path, nbytes, count=2, tag="fill")
    except OSError as e:
        _remove_dir(path)
        log.warning("weight sync: no shared-memory buckets for the TP team (%s); shards go point to point", e)
        return None


def _remove_dir(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)


def _fill_shared(spec: BucketSpec, params: dict[str, torch.Tensor], dims: ModelDims, tp_group,
                 flat: torch.Tensor, slot: int) -> None:
    """Leader's fill thread: tell every peer which shared buffer bucket ``spec`` goes in, write
    its own shards there, and return once every peer reported its shards written."""
    peers = peer_ranks(tp_group)
    works = [dist.isend(torch.tensor([slot], dtype=torch.int64), dst=p, group=tp_group) for p in peers]
    fill_own_shards(spec, params, dims, 0, len(peers) + 1, flat[:spec.nbytes])
    for w in works:
        w.wait()
    done = torch.zeros(1, dtype=torch.int64)
    for p in peers:
        dist.recv(done, src=p, group=tp_group)


def _peer_fill_shared(specs: list[BucketSpec], params: dict[str, torch.Tensor], dims: ModelDims, topo: Topology,
                      buffers: list[torch.Tensor]) -> None:
    """A TP peer: for each bucket, wait for the leader's slot, write this rank's shards, say done."""
    leader = dist.get_global_rank(topo.tp_group, 0)
    slot = torch.zeros(1, dtype=torch.int64)
    for spec in specs:
        dist.recv(slot, src=leader, group=topo.tp_group)
        fill_own_shards(spec, params, dims, topo.tp_rank, topo.tp, buffers[int(slot)][:spec.nbytes])
        dist.send(torch.zeros(1, dtype=torch.int64), dst=leader, group=topo.tp_group)


def _agree(error: Exception | None, topo: Topology, what: str, extra: Any = None) -> list[Any]:
    """All ranks: share each rank's error and ``extra``; raise on every rank if any failed."""
    summary = None if error is None else (isinstance(error, UserError), f"{type(error).__name__}: {error}")
    gathered: list[Any] = [(summary, extra)]
    if topo.world_size > 1:
        gathered = [None] * topo.world_size
        dist.all_gather_object(gathered, (summary, extra))
    if error is not None:
        raise error
    failed = [(r, s) for r, (s, _) in enumerate(gathered) if s is not None]
    if failed:
        rank, (user_error, message) = failed[0]
        cls = RolloutError if user_error else RuntimeError
        raise cls(f"{what} failed on actor rank {rank}, so this rank stops too. Its error: {message}")
    return [x for _, x in gathered]


class ActorSync:
    """Per-stage weight sync of a live actor (see the module docstring). Every actor rank holds one."""

    def __init__(self, model: torch.nn.Module, dims: ModelDims, topo: Topology, receiver: WeightReceiver | None,
                 opts: SyncOptions, specs: list[BucketSpec], leader: _Leader | None, peer_fill: ShmSlots | None = None):
        self.model, self.dims, self.topo, self.receiver, self.opts = model, dims, topo, receiver, opts
        self.specs, self.leader, self.syncs = specs, leader, 0
        self.peer_fill = peer_fill
        """A TP peer: the leader's shared fill buffers, mapped (None: it sends its shards)."""

    @staticmethod
    def roles(topo: Topology) -> tuple[bool, bool]:
        """(in a stage's TP team that sends, is that team's leader)."""
        team = topo.cp_rank == 0 and topo.dp_rank == 0
        return team, team and topo.tp_rank == 0

    @classmethod
    async def open(cls, model: torch.nn.Module, dims: ModelDims, topo: Topology, receiver: WeightReceiver | None,
                   opts: SyncOptions) -> ActorSync:
        """All actor ranks: plan the buckets, allocate, connect each stage leader to the servers."""
        team, is_leader = cls.roles(topo)
        specs = plan_stage(model, dims, tp=topo.tp, pp_rank=topo.pp_rank, pp=topo.pp,
                           bucket_bytes=opts.bucket_bytes) if team else []
        leader, error = None, None
        if is_leader:
            try:
                if receiver is None:
                    raise ValueError(f"actor rank {topo.rank} leads pipeline stage {topo.pp_rank}'s weight sync and "
                                     "needs a WeightReceiver (a rollout client) of its own")
                leader = await _Leader.open(receiver, specs, opts, topo)
            except Exception as e:  # noqa: BLE001 - shared with every rank below
                error = e
        peer_fill = None
        try:
            if team and topo.tp > 1:
                peer_fill = _share_fill_buffers(leader, topo)
        except Exception as e:  # noqa: BLE001 - shared with every rank below
            error = error or e
        try:
            _agree(error, topo, "Opening the weight sync")
        except BaseException:
            if peer_fill is not None:
                peer_fill.close()
            if leader is not None:
                await leader.close()
            raise
        return cls(model, dims, topo, receiver, opts, specs, leader, peer_fill)

    async def sync(self, *, weight_version: str | None = None, full: bool = False,
                   control: WeightReceiver | None = None) -> ActorSyncReport | None:
        """All actor ranks: send the weights (delta where allowed); rank 0 gets the report.

        ``control`` (rank 0): the receiver that pauses, flushes and continues generation for
        this sync (e.g. one that pauses in place); default the one given to ``open``."""
        topo, start = self.topo, time.perf_counter()
        control = control or self.receiver
        every = self.opts.full_every
        full = full or not self.opts.delta or self.syncs == 0 or bool(every and self.syncs % every == 0)
        error = None
        if topo.rank == 0:
            try:
                await control.pause_generation()  # type: ignore[union-attr]
            except Exception as e:  # noqa: BLE001 - shared below
                error = e
        _agree(error, topo, "Pausing generation for the weight sync")
        team, _ = self.roles(topo)
        stats, error = None, None
        try:
            if self.leader is not None:
                stats = await self.leader.run(named_params(self.model), self.dims, topo.tp_group if topo.tp > 1 else None,
                                              full=full, weight_version=weight_version, index=self.syncs)
            elif team and topo.tp > 1 and self.peer_fill is not None:
                await asyncio.to_thread(_peer_fill_shared, self.specs, named_params(self.model), self.dims, topo,
                                        self.peer_fill.tensors)
            elif team and topo.tp > 1:
                params = named_params(self.model)
                await asyncio.to_thread(lambda: [send_shards(s, params, topo.tp_group) for s in self.specs])
        except Exception as e:  # noqa: BLE001 - shared below
            error = e
        try:
            per_rank = _agree(error, topo, "Weight sync", stats)
        except BaseException:
            if topo.rank == 0:
                await _continue_quietly(control)
            raise
        error = None
        if topo.rank == 0:
            try:
                await control.flush_cache()  # type: ignore[union-attr]
                await control.continue_generation()  # type: ignore[union-attr]
            except Exception as e:  # noqa: BLE001 - shared below
                error = e
        _agree(error, topo, "Continuing generation after the weight sync")
        self.syncs += 1
        if topo.rank != 0:
            return None
        total = StageStats()
        for s in per_rank:
            if s is not None:
                total.add(s)
        return ActorSyncReport(self.opts.transport, time.perf_counter() - start, full, total)

    def abandon(self) -> None:
        """This rank only: drop the weight group and shared files without calling the servers
        (after servers died: the group cannot be used again). Open a new ActorSync to go on."""
        if self.leader is not None:
            self.leader.drop_files()
            if self.leader.sender is not None:
                self.leader.sender.group.close()
            self.leader = None
        if self.peer_fill is not None:
            self.peer_fill.close()
            self.peer_fill = None

    async def close(self, *, collective: bool = True) -> None:
        """All actor ranks: leaders leave their weight groups and remove their shared files.

        ``collective=False``: this rank alone, errors raised here (teardown after a failure,
        when the other ranks may be gone)."""
        error = None
        if self.peer_fill is not None:
            self.peer_fill.close()
            self.peer_fill = None
        if self.leader is not None:
            leader, self.leader = self.leader, None
            try:
                await leader.close()
            except Exception as e:  # noqa: BLE001 - shared below
                error = e
        if not collective:
            if error is not None:
                raise error
            return
        _agree(error, self.topo, "Closing the weight sync")


def _share_fill_buffers(leader: _Leader | None, topo: Topology) -> ShmSlots | None:
    """The TP team of a stage (collective over its TP group): the leader offers its shared fill
    buffers, each peer maps them and checks the token; all use them only if every peer can.
    Returns a peer's mapping (None on the leader, or when the shards go point to point)."""
    offer = [leader.share_token() if leader is not None else None]
    dist.broadcast_object_list(offer, src=dist.get_global_rank(topo.tp_group, 0), group=topo.tp_group)
    mine, ok = None, offer[0] is not None
    if ok and leader is None:
        try:
            mine = ShmSlots.attach(offer[0]["dir"], offer[0]["names"], offer[0]["nbytes"])
            ok = bytes(mine.tensors[0][:16].tolist()) == offer[0]["token"]
        except (OSError, ValueError):
            ok = False
        if not ok and mine is not None:
            mine.close()
            mine = None
    votes: list[Any] = [None] * topo.tp
    dist.all_gather_object(votes, ok, group=topo.tp_group)
    shared = offer[0] is not None and all(votes)
    if leader is not None:
        leader.shared_by_peers(shared)
    if not shared and mine is not None:
        mine.close()
        mine = None
    return mine


async def _continue_quietly(receiver: WeightReceiver | None) -> None:
    try:
        if receiver is not None:
            await receiver.continue_generation()
    except Exception as e:  # noqa: BLE001 - the sync's own failure is the one to report
        log.warning("continue_generation after a failed weight sync failed too: %s", e)
