"""A pipeline stage's weights as fixed flat buckets in HF layout, filled from TP shards in place.

``plan_stage`` lists, once, which megatron parameters of this stage go in which bucket and
where each of their HF tensors lands in the bucket's bytes (SGLang's ``flattened_bucket``
layout: tensors back to back). Every TP rank computes the same plan from its own shard
shapes. ``fill_bucket`` (the stage's TP leader) receives the other TP ranks' shards into a
reused scratch buffer and writes the HF tensors straight into a reused flat bucket: no
per-sync allocation, so no page faults on fresh memory (which cost more than the copies on
CPU). ``send_shards`` is the other TP ranks' side.

Point-to-point sends rather than an all-gather: only the leader needs the full tensors, and
on gloo (loopback) send/recv ran at ~2 GB/s where ``all_gather`` ran at 0.1-0.3 GB/s.
When the TP team shares a node, no shard travels at all: the buckets are shared-memory files
every TP rank maps, and each rank writes its own shards into them (``fill_own_shards``, the
ranks in parallel; ``stage_sync`` runs the hand-off).

Legend: tp = tensor-parallel size; g = query groups (KV heads); hd = head dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_rl.models.hf_config import ModelDims
from megatron_rl.weights import mapping as M
from megatron_rl.weights.live import _is_te, unwrap


@dataclass(frozen=True)
class HFEntry:
    """One HF tensor in a bucket: its bytes are ``flat[offset : offset + nbytes]``."""

    name: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ParamSlot:
    """One megatron parameter of the stage and the HF tensors it becomes."""

    local_name: str
    """Name in this rank's (unwrapped) model."""
    rule: M.Rule
    local_shape: tuple[int, ...]
    entries: tuple[HFEntry, ...]
    recv_offset: int
    """Byte offset of each peer's shard in the leader's per-peer scratch (-1: replicated, not sent)."""


@dataclass(frozen=True)
class BucketSpec:
    """A bucket: consecutive parameters of one dtype, at most ``bucket_bytes`` unless one is bigger."""

    dtype: torch.dtype
    params: tuple[ParamSlot, ...]
    nbytes: int
    recv_bytes: int
    """Bytes one peer sends the leader for this bucket (its shards of non-replicated parameters)."""

    @property
    def entries(self) -> list[HFEntry]:
        return [e for p in self.params for e in p.entries]

    @property
    def elem_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def wire(self) -> tuple[list[str], list[str], list[list[int]]]:
        """(names, dtypes, shapes) as SGLang's update_weights_* requests carry them."""
        dt = str(self.dtype).removeprefix("torch.")
        es = self.entries
        return [e.name for e in es], [dt] * len(es), [list(e.shape) for e in es]


def _full_shape(kind: str, local: tuple[int, ...], tp: int, vocab: int) -> tuple[int, ...]:
    """Shape of the full (TP=1, vocabulary unpadded) megatron tensor of a shard."""
    if kind == M.REPLICATED:
        return local
    if kind == M.ROW:
        return (local[0], local[1] * tp, *local[2:])
    if kind == M.VOCAB:
        return (vocab, *local[1:])
    return (local[0] * tp, *local[1:])  # COLUMN, GATE_UP


def stage_params(model: torch.nn.Module, dims: ModelDims, pp_rank: int, pp: int) -> list[tuple[str, M.Rule, torch.nn.Parameter]]:
    """(local name, rule, parameter) of a stage, in order, without the tied output layer."""
    model = unwrap(model)
    te = _is_te(model)
    offset = M.layer_offset(dims.num_layers, pp_rank, pp)
    out = []
    for name, param in model.named_parameters():
        gname = M.to_global_name(name, offset)
        if gname == "output_layer.weight" and dims.tie_word_embeddings:
            continue  # HF stores the tied embedding once (the first stage sends it)
        rule, layer = M.find_rule(gname, dims, te)
        out.append((name, M.Rule(rule.mcore.format(i=layer), tuple(M.hf_tensors_for(rule, layer)), rule.kind,
                                 rule.merge), param))
    return out


def plan_stage(model: torch.nn.Module, dims: ModelDims, *, tp: int, pp_rank: int, pp: int,
               bucket_bytes: int) -> list[BucketSpec]:
    """The stage's buckets (same on every TP rank of the stage)."""
    buckets: list[BucketSpec] = []
    params: list[ParamSlot] = []
    size = recv = 0
    dtype: torch.dtype | None = None

    def close() -> None:
        nonlocal params, size, recv
        if params:
            buckets.append(BucketSpec(dtype, tuple(params), size, recv))  # type: ignore[arg-type]
        params, size, recv = [], 0, 0

    for name, rule, param in stage_params(model, dims, pp_rank, pp):
        local = tuple(param.shape)
        full = torch.empty(_full_shape(rule.kind, local, tp, dims.vocab_size), dtype=param.dtype, device="meta")
        shapes = [tuple(t.shape) for t in M.split_hf(rule, full, dims)]
        nbytes = full.numel() * full.element_size()
        if params and (size + nbytes > bucket_bytes or param.dtype != dtype):
            close()
        dtype = param.dtype
        entries = []
        for hf_name, shape in zip(rule.hf, shapes):
            n = _numel(shape) * param.element_size()
            entries.append(HFEntry(hf_name, shape, size, n))
            size += n
        sent = tp > 1 and rule.kind != M.REPLICATED
        params.append(ParamSlot(name, rule, local, tuple(entries), recv if sent else -1))
        recv += param.numel() * param.element_size() if sent else 0
    close()
    return buckets


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def hf_views(flat: torch.Tensor, dtype: torch.dtype, entries: Sequence[HFEntry]) -> list[torch.Tensor]:
    """The HF tensors of a bucket as views of its flat uint8 buffer."""
    return [flat[e.offset:e.offset + e.nbytes].view(dtype).view(e.shape) for e in entries]


def write_hf_from_shards(rule: M.Rule, shards: Sequence[torch.Tensor], dims: ModelDims,
                         dst: Sequence[torch.Tensor]) -> None:
    """Write the HF tensors of one parameter from all TP ranks' shards into ``dst`` (HF shapes).

    Same result as ``split_hf(unshard(shards))`` without building the full tensor.
    """
    for r, shard in enumerate(shards):
        write_hf_shard(rule, shard, r, len(shards), dims, dst)


def write_hf_shard(rule: M.Rule, shard: torch.Tensor, r: int, tp: int, dims: ModelDims,
                   dst: Sequence[torch.Tensor]) -> None:
    """Write TP rank ``r``'s part of one parameter's HF tensors into ``dst`` (HF shapes).

    Every TP rank can write its own part into a shared bucket (``fill_own_shards``): each
    kind's shard is a fixed set of rows or columns of the HF tensors. A replicated tensor is
    written by rank 0 only.
    """
    kind = rule.kind
    if kind == M.REPLICATED:
        if r == 0:
            dst[0].copy_(shard)
    elif rule.merge == "single" and kind in (M.COLUMN, M.VOCAB):
        rows = shard.shape[0]
        stop = min((r + 1) * rows, dst[0].shape[0])  # VOCAB: the padding rows are dropped
        if stop > r * rows:
            dst[0][r * rows:stop].copy_(shard[:stop - r * rows])
    elif rule.merge == "single" and kind == M.ROW:
        cols = shard.shape[1]
        dst[0][:, r * cols:(r + 1) * cols].copy_(shard)
    elif rule.merge == "gate_up":
        half = shard.shape[0] // 2
        dst[0][r * half:(r + 1) * half].copy_(shard[:half])
        dst[1][r * half:(r + 1) * half].copy_(shard[half:])
    elif rule.merge == "qkv" and kind == M.COLUMN:
        g, hd = dims.num_kv_heads, dims.head_dim
        per = dims.num_heads // g
        gr = g // tp  # query groups per TP rank
        q, k, v = (d.view(g, -1, *d.shape[1:]) for d in dst)  # (g, rows per group, *tail)
        sq, sk, sv = shard.view(gr, (per + 2) * hd, *shard.shape[1:]).split([per * hd, hd, hd], dim=1)
        for d, piece in ((q, sq), (k, sk), (v, sv)):
            d[r * gr:(r + 1) * gr].copy_(piece)
    else:
        raise NotImplementedError(f"no shard-wise HF layout for {rule.mcore} ({kind}, merge {rule.merge})")


@torch.no_grad()
def fill_own_shards(spec: BucketSpec, params: dict[str, torch.Tensor], dims: ModelDims, tp_rank: int, tp: int,
                    flat: torch.Tensor) -> None:
    """Any TP rank: write this rank's shards of ``spec`` into the bucket ``flat`` (shared by the
    TP team); the leader (rank 0) writes the replicated tensors too."""
    for slot in spec.params:
        write_hf_shard(slot.rule, params[slot.local_name].detach(), tp_rank, tp, dims,
                       hf_views(flat, spec.dtype, slot.entries))


def peer_ranks(tp_group) -> list[int]:
    """Global ranks of TP ranks 1.. (the leader is TP rank 0)."""
    return [dist.get_global_rank(tp_group, r) for r in range(1, dist.get_world_size(tp_group))]


@torch.no_grad()
def fill_bucket(spec: BucketSpec, params: dict[str, torch.Tensor], dims: ModelDims, tp_group,
                flat: torch.Tensor, scratch: torch.Tensor | None) -> None:
    """Leader: receive the peers' shards of ``spec`` and write the bucket's HF bytes into ``flat``.

    ``scratch`` holds (tp - 1) * ``spec.recv_bytes`` (None when tp == 1 or nothing is sent).
    """
    peers = peer_ranks(tp_group) if tp_group is not None and spec.recv_bytes else []
    works = []
    for slot in spec.params:
        if slot.recv_offset < 0 or not peers:
            continue
        param = params[slot.local_name]
        nbytes = param.numel() * param.element_size()
        for i, src in enumerate(peers):
            start = i * spec.recv_bytes + slot.recv_offset
            buf = scratch[start:start + nbytes].view(param.dtype)  # type: ignore[index]
            works.append(dist.irecv(buf, src=src, group=tp_group))
    for w in works:
        w.wait()
    for slot in spec.params:
        param = params[slot.local_name].detach()
        shards = [param]
        if slot.recv_offset >= 0 and peers:
            nbytes = param.numel() * param.element_size()
            shards += [scratch[i * spec.recv_bytes + slot.recv_offset:][:nbytes].view(param.dtype).view(param.shape)  # type: ignore[index]
                       for i in range(len(peers))]
        write_hf_from_shards(slot.rule, shards, dims, hf_views(flat, spec.dtype, slot.entries))


@torch.no_grad()
def send_shards(spec: BucketSpec, params: dict[str, torch.Tensor], tp_group) -> None:
    """A non-leader TP rank: send its shards of ``spec`` to the leader (TP rank 0), in plan order."""
    if not spec.recv_bytes:
        return
    leader = dist.get_global_rank(tp_group, 0)
    works = [dist.isend(params[slot.local_name].detach().contiguous(), dst=leader, group=tp_group)
             for slot in spec.params if slot.recv_offset >= 0]
    for w in works:
        w.wait()


def named_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(unwrap(model).named_parameters())
