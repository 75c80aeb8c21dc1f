"""Worker: a bf16 Megatron actor (TP x PP from argv, gloo) syncs into serve processes with
``ActorSync``: one sender per pipeline stage, delta after optimizer steps, a corrupted delta.

Usage (torchrun, TP*PP processes): stage_sync_worker.py HF_DIR OUT_DIR URL1,URL2 SHM_DIR TP PP
Each stage leader opens its own rollout client (the servers join one weight group per stage).
Phases (every rank, in order; rank 0 records, the test checks):

- distributed, delta on: v1 full sync; one Adam step; v2 delta sync; one more step; v3 delta
  with the last stage's first non-empty delta payload corrupted (a value byte flipped): the
  server refuses it, the stage sends it in full;
- shm (colocated), delta on: v4 full sync; one Adam step; v5 delta;
- shm, delta off (the transport's files are the fill buffers): one step; v6 full sync;
- distributed, delta off, ``shared_fill`` off (TP peers send their shards point to point):
  one step; v7 full sync.

With TP > 1 every phase but the last has the TP peers write their shards into shared-memory
buckets themselves; each rank records per version whether its TP team shared them.

After every sync: each server's log-probs of SEQS (rank 0) and the actor's HF export saved
(``export_<v>.safetensors``), against which the test recomputes the log-probs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import uuid
from pathlib import Path

import torch

SEQS = [[7, 3, 99, 512, 4, 8, 15, 16, 23, 42], [900, 1, 2, 3, 4, 5, 6, 7, 8, 9]]
TARGET = [11, 12, 13, 777, 778, 779, 780, 781, 782, 783]
BUCKET = 24 << 10  # several buckets per stage even for the tiny model
LR = 1e-5  # bf16 weights of ~0.02 (ulp ~1e-4): a step this size changes a part of them, not all


def build_actor(hf_dir: str, tp: int, pp: int):
    from megatron_rl.actor.actor import Actor
    from megatron_rl.actor.model import build_model, build_optimizer, load_hf_weights
    from megatron_rl.config.model import ModelConfig
    from megatron_rl.config.optimizer import OptimizerConfig
    from megatron_rl.config.parallel import ParallelConfig
    from megatron_rl.models.hf_config import read_dims
    from megatron_rl.parallel.topology import Topology

    par, mc = ParallelConfig(tp=tp, pp=pp, num_microbatches=pp), ModelConfig(dtype="bfloat16")
    topo = Topology.initialize(par, timeout_s=120)
    dims = read_dims(hf_dir)
    model = build_model(dims, par, mc, topo)
    load_hf_weights(model, hf_dir, dims, par, mc, topo)
    opt = build_optimizer(model, OptimizerConfig(lr=LR, weight_decay=0.0, clip_grad=0.0), par, torch.bfloat16)
    return Actor(model, dims, topo, opt), topo


def train_step(actor) -> None:
    from megatron_rl.actor.forward import MicroBatch

    mb = MicroBatch(tokens_BS=torch.tensor([TARGET]), loss_mask_BS=torch.ones(1, len(TARGET)))
    mb.loss_mask_BS[:, -1] = 0

    def loss_fn(logp, ent, m):
        return -(logp * m.loss_mask_BS).sum() / m.loss_mask_BS.sum(), {}

    actor.train_step([mb] * actor.topo.pp, loss_fn, temperature=1.0)  # a micro-batch per stage


def save_export(actor, topo, path: Path) -> None:
    from safetensors.torch import save_file

    from megatron_rl.weights.live import export_hf

    named = {n: t.contiguous() for n, t in export_hf(actor.model[0], actor.dims, topo, all_stages=True)}
    if topo.rank == 0:
        save_file(named, str(path))


class CorruptFirstDelta:
    """Patches ``delta.encode`` so the first non-empty sparse payload has a value byte flipped."""

    def __init__(self) -> None:
        from megatron_rl.weights import delta

        self.module, self.real, self.done = delta, delta.encode, False

    def __enter__(self):
        def encode(new, old, elem_size):
            kind, k, payload, idx = self.real(new, old, elem_size)
            if not self.done and kind != "dense" and k > 0:
                payload = payload.clone()
                payload[-1] ^= 0x10
                self.done = True
            return kind, k, payload, idx

        self.module.encode = encode
        return self

    def __exit__(self, *exc):
        self.module.encode = self.real


async def main(hf_dir: str, out_dir: Path, urls: list[str], shm_dir: str, tp: int, pp: int) -> None:
    from megatron_rl.parallel.topology import Topology
    from megatron_rl.rollout.client import RolloutClient
    from megatron_rl.weights.stage_sync import ActorSync, SyncOptions

    actor, topo = build_actor(hf_dir, tp, pp)
    _, leader = ActorSync.roles(topo)
    client = RolloutClient(urls, control_timeout_s=60, request_timeout_s=60) if leader else None
    singles = [RolloutClient([u]) for u in urls] if topo.rank == 0 else []
    out: dict = {"leaders": [], "reports": {}}

    async def sync(link: ActorSync, version: str, **kwargs) -> None:
        report = await link.sync(weight_version=version, **kwargs)
        out.setdefault("shared", {})[version] = (link.leader.peers_share if link.leader is not None
                                                 else link.peer_fill is not None)
        save_export(actor, topo, out_dir / f"export_{version}.safetensors")
        if topo.rank == 0:
            out["reports"][version] = {"full": report.full, **dataclasses.asdict(report.stats)}
            out[f"scores_{version}"] = [await c.score(SEQS) for c in singles]

    link = await ActorSync.open(actor.model[0], actor.dims, topo, client, SyncOptions(
        transport="distributed", bucket_bytes=BUCKET, delta=True, full_every=0,
        group_name=f"g-{uuid.uuid4().hex[:6]}", timeout_s=60))
    if link.leader is not None:
        out["leaders"].append([topo.pp_rank, link.leader.sender.group.name])
    await sync(link, "v1")
    train_step(actor)
    await sync(link, "v2")
    train_step(actor)
    corrupt = CorruptFirstDelta() if topo.pp_rank == pp - 1 else None
    if corrupt is not None:
        with corrupt:
            await sync(link, "v3")
    else:
        await sync(link, "v3")
    await link.close()

    link = await ActorSync.open(actor.model[0], actor.dims, topo, client, SyncOptions(
        transport="shm", bucket_bytes=BUCKET, delta=True, full_every=0, shm_dir=shm_dir))
    await sync(link, "v4")
    train_step(actor)
    await sync(link, "v5")
    await link.close()

    link = await ActorSync.open(actor.model[0], actor.dims, topo, client, SyncOptions(
        transport="shm", bucket_bytes=BUCKET, shm_dir=shm_dir))
    train_step(actor)
    await sync(link, "v6")
    await link.close()

    link = await ActorSync.open(actor.model[0], actor.dims, topo, client, SyncOptions(
        transport="distributed", bucket_bytes=BUCKET, shared_fill=False, group_name=f"g-{uuid.uuid4().hex[:6]}",
        timeout_s=60))
    train_step(actor)
    await sync(link, "v7")
    await link.close()
    (out_dir / f"rank{topo.rank}.json").write_text(json.dumps(out))
    for c in [client, *singles]:
        if c is not None:
            await c.close()
    Topology.destroy()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(","), sys.argv[4], int(sys.argv[5]),
                     int(sys.argv[6])))
