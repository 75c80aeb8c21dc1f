"""Weight sync: stream ``(hf_name, tensor)`` pairs from the trainer into rollout servers.

The source is any iterator of Hugging Face named tensors (the Megatron exporter gathers
them from a live sharded model; a ``transformers`` model's ``named_parameters()`` works the
same). They are packed into buckets of about ``bucket_bytes`` and sent by one transport:

- ``distributed`` (disaggregated servers): trainer rank 0 and every server rank join one
  process group built exactly as SGLang builds it (``WeightGroup``); per bucket, rank 0
  calls every server's /update_weights_from_distributed with the names/dtypes/shapes
  *while* it broadcasts the tensors from rank 0 in the same order (SGLang's protocol: the
  HTTP call returns after the server has received and loaded them).
- ``disk``: buckets become safetensors shards in a directory, then one
  /update_weights_from_disk per server.
- ``tensor``: each bucket goes in /update_weights_from_tensor (colocated servers).
- in-process: ``sync_in_process`` hands buckets to a callable that loads a local model.

Generation is paused before and continued after (caches flushed) through the
``WeightReceiver``, a small protocol the rollout client implements: this module is a lower
layer than rollout and never imports it, nor megatron-core.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal, Protocol

import torch

from megatron_rl.errors import RolloutError, UserError

NamedTensors = Sequence[tuple[str, torch.Tensor]]
Transport = Literal["distributed", "disk", "tensor"]
DEFAULT_GROUP_NAME = "weight_update_group"  # SGLang's default group name
BROADCAST_FAILURE_GRACE_S = 5.0  # after a failed broadcast, wait this long for the server's own error
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncReport:
    """What one weight sync moved and how fast (wall time includes pause and flush)."""

    transport: str
    seconds: float
    num_bytes: int
    num_tensors: int
    num_buckets: int

    @property
    def gb_per_s(self) -> float:
        """Throughput in GB/s (10^9 bytes)."""
        return self.num_bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")


class WeightReceiver(Protocol):
    """The rollout side of a sync: every method acts on all servers and raises on failure."""

    def num_weight_ranks(self) -> int:
        """Ranks the servers take in the weight group (sum of their TP sizes)."""
        ...

    async def pause_generation(self) -> None: ...

    async def continue_generation(self) -> None: ...

    async def flush_cache(self) -> None: ...

    async def init_weights_update_group(
        self, *, master_address: str, master_port: int, world_size: int, group_name: str, backend: str
    ) -> None:
        """Each server joins the group at ranks 1.. (trainer rank 0 joins concurrently)."""
        ...

    async def destroy_weights_update_group(self, group_name: str) -> None: ...

    async def update_weights_from_distributed(
        self, *, names: list[str], dtypes: list[str], shapes: list[list[int]], group_name: str,
        flattened: bool, weight_version: str | None,
    ) -> None:
        """Servers receive these tensors from rank 0's broadcasts, in this order, and load them."""
        ...

    async def update_weights_from_disk(self, path: str, *, weight_version: str | None) -> None: ...

    async def update_weights_from_tensor(self, named_tensors: NamedTensors, *, weight_version: str | None) -> None: ...

    async def post_weights(self, path: str, body: dict) -> None:
        """POST a weight-update body (SGLang route and fields) to every server; raises on a refusal."""
        ...


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group consecutive tensors into lists of at most ``bucket_bytes`` (a bigger tensor goes alone)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def dtype_name(dtype: torch.dtype) -> str:
    """SGLang's wire name of a dtype: ``torch.bfloat16`` -> ``bfloat16``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of ``dtype_name``; ValueError for anything that is not a torch dtype."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def flatten_bucket(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """SGLang's ``flattened_bucket`` layout: the tensors' bytes back to back, one uint8 tensor."""
    return torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in tensors])


def unflatten_bucket(flat: torch.Tensor, dtypes: Sequence[torch.dtype], shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Tensors over ``flat`` (uint8) with the given dtypes and shapes, in order (views when aligned)."""
    out, offset = [], 0
    for dtype, shape in zip(dtypes, shapes):
        numel = 1
        for d in shape:
            numel *= int(d)
        size = torch.empty((), dtype=dtype).element_size()
        nbytes = numel * size
        piece = flat[offset:offset + nbytes]
        if offset % size:  # a view needs an aligned start: copy the odd one out
            piece = piece.clone()
        out.append(piece.view(dtype).view(list(shape)))
        offset += nbytes
    if offset != flat.numel():
        raise ValueError(f"flattened bucket holds {flat.numel()} bytes, metadata describes {offset}")
    return out


def bucket_nbytes(dtypes: Sequence[torch.dtype], shapes: Sequence[Sequence[int]]) -> int:
    """Bytes of a flattened bucket with these tensors."""
    total = 0
    for dtype, shape in zip(dtypes, shapes):
        numel = 1
        for d in shape:
            numel *= int(d)
        total += numel * torch.empty((), dtype=dtype).element_size()
    return total


class WeightGroup:
    """One rank's handle on the trainer -> servers weight process group.

    Built the way SGLang's ``init_custom_process_group`` builds it (TCP rendezvous at the
    master, ``PrefixStore(group_name)``, torch's process-group helper), so a trainer using
    this class and a real SGLang server meet in the same group. It needs no default process
    group and never touches the trainer's own groups.
    """

    def __init__(self, pg: torch.distributed.ProcessGroup, rank: int, world_size: int, name: str, backend: str):
        self.pg, self.rank, self.world_size, self.name, self.backend = pg, rank, world_size, name, backend
        self.device = torch.device("cuda" if backend == "nccl" else "cpu")

    @classmethod
    def open(cls, master_address: str, master_port: int, rank: int, world_size: int,
             group_name: str = DEFAULT_GROUP_NAME, backend: str = "gloo", timeout_s: float = 600.0) -> WeightGroup:
        """Join (rank 0: host) the group; blocks until all ``world_size`` ranks have joined."""
        from torch.distributed import distributed_c10d as c10d

        timeout = timedelta(seconds=timeout_s)
        # The TCPStore that SGLang's tcp:// rendezvous makes, built directly: under torchrun
        # (TORCHELASTIC_USE_AGENT_STORE) rendezvous would make rank 0 a client of a store that
        # nobody hosts, and every rank would wait for the timeout.
        store = torch.distributed.TCPStore(master_address, master_port, world_size, is_master=rank == 0,
                                           timeout=timeout, wait_for_workers=True)
        store = c10d.PrefixStore(group_name, store)
        # The helper is private; its options keyword was renamed across torch releases.
        params = inspect.signature(c10d._new_process_group_helper).parameters
        options_kw = "backend_options" if "backend_options" in params else "pg_options"
        pg, _ = c10d._new_process_group_helper(
            world_size, rank, [], c10d.Backend(backend), store,
            group_name=group_name, timeout=timeout, **{options_kw: None},
        )
        c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
        return cls(pg, rank, world_size, group_name, backend)

    def broadcast(self, tensors: Sequence[torch.Tensor], src: int = 0) -> None:
        """Broadcast each tensor from ``src`` in order (in place on receivers); waits for all."""
        works = [torch.distributed.broadcast(t, src=src, group=self.pg, async_op=True) for t in tensors]
        for work in works:
            work.wait()

    def close(self) -> None:
        torch.distributed.destroy_process_group(self.pg)


def address_toward(urls: Sequence[str]) -> str:
    """This host's address as the servers at ``urls`` reach it: 127.0.0.1 when every server is
    on this host, else the address of the interface the kernel routes the first remote server
    through (a UDP connect sends nothing; it only picks the route)."""
    from urllib.parse import urlsplit

    hosts = [urlsplit(u).hostname or "" for u in urls]
    remote = [h for h in hosts if h not in ("127.0.0.1", "localhost", "::1", "")]
    if not remote:
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((remote[0], 9))
        return str(s.getsockname()[0])


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class DistributedSender:
    """Trainer rank 0's end of the ``distributed`` transport: one group, many syncs."""

    def __init__(self, receiver: WeightReceiver, group: WeightGroup):
        self.receiver, self.group = receiver, group

    @classmethod
    async def connect(cls, receiver: WeightReceiver, *, master_address: str = "127.0.0.1", master_port: int = 0,
                      group_name: str = DEFAULT_GROUP_NAME, backend: str = "gloo",
                      timeout_s: float = 600.0) -> DistributedSender:
        """Open the group: rank 0 here and the servers' ranks over HTTP, at the same time.

        ``master_address`` must be reachable from the servers (this host's address). If a
        server refuses to join, the error is raised at once, but rank 0's rendezvous thread
        only gives up at ``timeout_s`` (torch offers no way to cancel it).
        """
        port = master_port or free_port(master_address)
        world_size = 1 + receiver.num_weight_ranks()
        opening = asyncio.ensure_future(asyncio.to_thread(
            WeightGroup.open, master_address, port, 0, world_size, group_name, backend, timeout_s))
        try:
            await receiver.init_weights_update_group(
                master_address=master_address, master_port=port, world_size=world_size,
                group_name=group_name, backend=backend)
        except BaseException:
            opening.add_done_callback(_retrieve_exception)  # it fails later, at its timeout
            raise
        return cls(receiver, await opening)

    async def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, bucket_bytes: int,
                   flattened: bool = False, weight_version: str | None = None) -> tuple[int, int, int]:
        """Send every tensor; returns (bytes, tensors, buckets). Generation should be paused."""
        total = count = buckets = 0
        for bucket in iter_buckets(named_tensors, bucket_bytes):
            tensors = [t.detach().to(self.group.device).contiguous() for _, t in bucket]
            payload = [flatten_bucket(tensors)] if flattened else tensors
            await broadcast_during(self.receiver.update_weights_from_distributed(
                names=[n for n, _ in bucket], dtypes=[dtype_name(t.dtype) for t in tensors],
                shapes=[list(t.shape) for t in tensors], group_name=self.group.name,
                flattened=flattened, weight_version=weight_version), self.group, payload)
            total += sum(t.numel() * t.element_size() for t in tensors)
            count += len(tensors)
            buckets += 1
        return total, count, buckets

    async def close(self) -> None:
        try:
            await self.receiver.destroy_weights_update_group(self.group.name)
        finally:
            self.group.close()


async def broadcast_during(call: Awaitable[object], group: WeightGroup, payload: Sequence[torch.Tensor]) -> None:
    """Run a server call (an update_weights_from_distributed) while broadcasting ``payload`` to it.

    The servers block in their receive until our broadcast; both must run together. If the
    call fails (a refusal: the server always receives in full first) the broadcast is given
    ``BROADCAST_FAILURE_GRACE_S`` to finish, so the group stays in step when it can; then the
    first error is raised (a RolloutError for a refusal or a failed broadcast).
    """
    receiving = asyncio.ensure_future(call)
    broadcasting = asyncio.ensure_future(asyncio.to_thread(group.broadcast, payload))
    done, _ = await asyncio.wait({receiving, broadcasting}, return_when=asyncio.FIRST_EXCEPTION)
    if broadcasting in done and broadcasting.exception() is not None and not receiving.done():
        # A peer left the group (a server died): its HTTP call usually fails at once too,
        # and that error names the server; wait for it a little.
        await asyncio.wait({receiving}, timeout=BROADCAST_FAILURE_GRACE_S)
    elif receiving in done and receiving.exception() is not None and not broadcasting.done():
        await asyncio.wait({broadcasting}, timeout=BROADCAST_FAILURE_GRACE_S)
    failed = [t for t in (receiving, broadcasting) if t.done() and t.exception() is not None]
    if failed:
        # A server refused or died: the other side may only end at the group's timeout
        # (and the group is then out of step: close it and reconnect). Raise now.
        for task in (receiving, broadcasting):
            task.add_done_callback(_retrieve_exception)
        receiving.cancel()  # a still-pending HTTP call would linger until its timeout
        raise _as_rollout_error(failed[0].exception(), group.name)
    await broadcasting
    await receiving


def _retrieve_exception(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # marks it retrieved: no "exception was never retrieved" warning


def _as_rollout_error(error: BaseException | None, group_name: str) -> BaseException:
    """A server's refusal is already a RolloutError; a failed broadcast (gloo/NCCL) becomes one."""
    assert error is not None  # only called for tasks that failed
    if isinstance(error, UserError) or not isinstance(error, RuntimeError | OSError):
        return error  # a refusal, or a bug (keeps its own type and traceback)
    wrapped = RolloutError(
        f"Broadcasting weights over the group {group_name!r} failed ({type(error).__name__}: {error}). "
        "A rollout server probably died or stalled mid-sync: its log says why. Restart it, then "
        "reconnect the sender (the group is out of step) and sync again before generating.")
    wrapped.__cause__ = error
    return wrapped


def write_safetensors_dir(named_tensors: Iterable[tuple[str, torch.Tensor]], directory: str | Path,
                          bucket_bytes: int) -> tuple[int, int, int]:
    """Write buckets as ``model-XXXXX.safetensors`` + an index; returns (bytes, tensors, files)."""
    from safetensors.torch import save_file

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("model-*.safetensors"):
        old.unlink()
    weight_map: dict[str, str] = {}
    total = count = files = 0
    for bucket in iter_buckets(named_tensors, bucket_bytes):
        files += 1
        fname = f"model-{files:05d}.safetensors"
        seen: set[int] = set()
        out = {}
        for name, t in bucket:
            t = t.detach().cpu().contiguous()
            if t.data_ptr() in seen:  # safetensors refuses shared storage (tied weights)
                t = t.clone()
            seen.add(t.data_ptr())
            out[name] = t
            weight_map[name] = fname
            total += t.numel() * t.element_size()
        count += len(out)
        save_file(out, str(root / fname))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total, count, files


async def sync_weights(named_tensors: Iterable[tuple[str, torch.Tensor]], receiver: WeightReceiver, *,
                       transport: Transport, bucket_bytes: int, sender: DistributedSender | None = None,
                       disk_dir: str | Path | None = None, flattened: bool = False,
                       weight_version: str | None = None) -> SyncReport:
    """Pause generation, send all tensors by ``transport``, flush caches, continue generation."""
    if transport == "distributed" and sender is None:
        raise ValueError("transport='distributed' needs a DistributedSender (DistributedSender.connect)")
    if transport == "disk" and disk_dir is None:
        raise ValueError("transport='disk' needs disk_dir, a directory every server can read")
    start = time.perf_counter()
    await receiver.pause_generation()
    try:
        if transport == "distributed":
            assert sender is not None
            stats = await sender.send(named_tensors, bucket_bytes=bucket_bytes, flattened=flattened,
                                      weight_version=weight_version)
        elif transport == "disk":
            stats = await asyncio.to_thread(write_safetensors_dir, named_tensors, disk_dir, bucket_bytes)
            await receiver.update_weights_from_disk(str(disk_dir), weight_version=weight_version)
        elif transport == "tensor":
            stats = (0, 0, 0)
            for bucket in iter_buckets(named_tensors, bucket_bytes):
                await receiver.update_weights_from_tensor(bucket, weight_version=weight_version)
                nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
                stats = (stats[0] + nbytes, stats[1] + len(bucket), stats[2] + 1)
        else:
            raise ValueError(f"unknown transport {transport!r}; use distributed, disk or tensor")
        await receiver.flush_cache()
    except BaseException:
        try:
            await receiver.continue_generation()
        except Exception as e:  # the first failure is the one to report
            log.warning("continue_generation after a failed weight sync failed too: %s", e)
        raise
    await receiver.continue_generation()
    return SyncReport(transport, time.perf_counter() - start, *stats)


def sync_in_process(named_tensors: Iterable[tuple[str, torch.Tensor]],
                    load_fn: Callable[[list[tuple[str, torch.Tensor]]], None], *, bucket_bytes: int) -> SyncReport:
    """In-process transport: hand each bucket to ``load_fn`` (e.g. a local engine's loader)."""
    start = time.perf_counter()
    total = count = buckets = 0
    for bucket in iter_buckets(named_tensors, bucket_bytes):
        load_fn(bucket)
        total += sum(t.numel() * t.element_size() for _, t in bucket)
        count += len(bucket)
        buckets += 1
    return SyncReport("in_process", time.perf_counter() - start, total, count, buckets)
