"""Worker: a TP=2 Megatron actor syncs its weights into two serve processes over gloo.

Usage (torchrun, 2 processes): actor_sync_worker.py HF_DIR OUT_DIR URL1,URL2 PID2
Every rank runs every phase in order (export and log-probs are collective); rank 0 alone
talks to the servers. Each rank writes OUT_DIR/rank<r>.json with what it saw:

0. a refused join (backend nccl on CPU servers): every rank raises, quickly;
1. sync v1 (per-tensor buckets): the actor's and both servers' log-probs of SEQS, greedy
   generations of PROMPTS;
2. one Adam step raising the likelihood of TARGET, sync v2 (flattened buckets): the same,
   and the actor's weights exported to OUT_DIR/actor_v2.safetensors;
3. a bucket refused mid-sync (a renamed tensor) and 4. server 2 SIGKILLed mid-sync: every
   rank raises a RolloutError, quickly.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import torch

SEQS = [[7, 3, 99, 512, 4, 8, 15, 16, 23, 42], [900, 1, 2, 3, 4, 5, 6, 7, 8, 9], [5] * 10]
PROMPTS = [[11, 12, 13], [400, 300], [7]]
TARGET = [11, 12, 13, 777, 778, 779, 780, 781, 782, 783]
GREEDY_TOKENS = 8
BUCKET = 64 << 10  # several buckets even for the tiny model


def build_actor(hf_dir: str):
    from megatron_rl.actor.actor import Actor
    from megatron_rl.actor.model import build_model, build_optimizer, load_hf_weights
    from megatron_rl.config.model import ModelConfig
    from megatron_rl.config.optimizer import OptimizerConfig
    from megatron_rl.config.parallel import ParallelConfig
    from megatron_rl.models.hf_config import read_dims
    from megatron_rl.parallel.topology import Topology

    par, mc = ParallelConfig(tp=2), ModelConfig(dtype="float32")
    topo = Topology.initialize(par, timeout_s=120)
    dims = read_dims(hf_dir)
    model = build_model(dims, par, mc, topo)
    load_hf_weights(model, hf_dir, dims, par, mc, topo)
    # lr 0.02: Adam moves every weight by ~lr on its first step, plenty to change greedy outputs.
    opt = build_optimizer(model, OptimizerConfig(lr=0.02, weight_decay=0.0, clip_grad=0.0), par, torch.float32)
    return Actor(model, dims, topo, opt), topo


def actor_logprobs(actor, seqs) -> list[list[float]]:
    from megatron_rl.actor.forward import MicroBatch

    (out,) = actor.logprobs([MicroBatch(tokens_BS=torch.tensor(seqs), loss_mask_BS=torch.ones(len(seqs), len(seqs[0])))], temperature=1.0)
    return out["logp"][:, :-1].tolist()  # column t: log p(token t+1 | tokens <= t); the last is padding


def train_towards_target(actor) -> float:
    from megatron_rl.actor.forward import MicroBatch

    mb = MicroBatch(tokens_BS=torch.tensor([TARGET]), loss_mask_BS=torch.ones(1, len(TARGET)))
    mb.loss_mask_BS[:, -1] = 0

    def loss_fn(logp, ent, m):
        return -(logp * m.loss_mask_BS).sum() / m.loss_mask_BS.sum(), {}

    return actor.train_step([mb], loss_fn, temperature=1.0).metrics["loss"]


def save_export(actor, topo, path: Path) -> None:
    """The actor's weights as HF tensors (collective), saved by rank 0 for the test to load."""
    from safetensors.torch import save_file

    from megatron_rl.weights.live import export_hf

    named = {n: t.contiguous() for n, t in export_hf(actor.model[0], actor.dims, topo, all_stages=True)}
    if topo.rank == 0:
        save_file(named, str(path))


class Tampering:
    """A WeightReceiver around the client that misbehaves at the second bucket."""

    def __init__(self, client, *, rename: bool = False, kill_pid: int | None = None):
        self.client, self.rename, self.kill_pid, self.buckets = client, rename, kill_pid, 0

    def __getattr__(self, name):
        return getattr(self.client, name)

    async def update_weights_from_distributed(self, *, names, **kwargs):
        self.buckets += 1
        if self.buckets == 2 and self.rename:
            names = ["model.not_a_layer.weight", *names[1:]]
        if self.buckets == 2 and self.kill_pid is not None:
            os.kill(self.kill_pid, signal.SIGKILL)
            await asyncio.sleep(0.5)  # let the process go before the bucket is sent
        await self.client.update_weights_from_distributed(names=names, **kwargs)


async def expect_failure(awaitable) -> dict:
    start = time.perf_counter()
    try:
        await awaitable
    except Exception as e:
        return {"type": type(e).__name__, "message": str(e), "seconds": time.perf_counter() - start}
    return {"type": None, "message": "", "seconds": time.perf_counter() - start}


async def main(hf_dir: str, out_dir: Path, urls: list[str], pid2: int) -> None:
    from megatron_rl.rollout.client import RolloutClient
    from megatron_rl.rollout.types import RolloutRequest, SamplingParams
    from megatron_rl.weights.actor_sync import connect_actor_sender, sync_actor_weights
    from megatron_rl.weights.sync import DistributedSender

    actor, topo = build_actor(hf_dir)
    rank0 = topo.rank == 0
    client = RolloutClient(urls, control_timeout_s=60, request_timeout_s=60) if rank0 else None
    singles = [RolloutClient([u]) for u in urls] if rank0 else []  # each server's own answers
    greedy = [RolloutRequest(f"g{i}", p, SamplingParams(temperature=0, max_new_tokens=GREEDY_TOKENS))
              for i, p in enumerate(PROMPTS)]
    out: dict = {}

    async def observe(tag: str) -> None:
        out[f"actor_{tag}"] = actor_logprobs(actor, SEQS)  # collective
        out[f"target_{tag}"] = actor_logprobs(actor, [TARGET])[0]
        if rank0:
            out[f"scores_{tag}"] = [await c.score(SEQS) for c in singles]
            gens = [await c.generate(greedy) for c in singles]
            out[f"greedy_{tag}"] = [[s.response_ids for s in g] for g in gens]
            out[f"versions_{tag}"] = [[s.weight_version for s in g] for g in gens]

    def sync(receiver, sender, **kwargs):
        return sync_actor_weights(actor.model[0], actor.dims, topo, receiver, sender=sender,
                                  bucket_bytes=BUCKET, **kwargs)

    if rank0:
        out["scores_before"] = [await c.score(SEQS) for c in singles]
    out["refused_join"] = await expect_failure(connect_actor_sender(
        topo, client, backend="nccl", group_name=f"nccl-{uuid.uuid4().hex[:6]}", timeout_s=15))
    sender = await connect_actor_sender(topo, client, group_name=f"g-{uuid.uuid4().hex[:6]}", timeout_s=30)
    report = await sync(client, sender, weight_version="v1")
    out["report_v1"] = report and [report.num_bytes, report.num_tensors, report.num_buckets, report.gb_per_s]
    await observe("v1")
    out["loss"] = train_towards_target(actor)
    report = await sync(client, sender, weight_version="v2", flattened=True)
    out["report_v2"] = report and [report.num_bytes, report.num_tensors, report.num_buckets, report.gb_per_s]
    await observe("v2")
    save_export(actor, topo, out_dir / "actor_v2.safetensors")
    for case, tamper in [("refused_bucket", dict(rename=True)), ("killed", dict(kill_pid=pid2))]:
        bad = Tampering(client, **tamper) if rank0 else None
        bad_sender = DistributedSender(bad, sender.group) if rank0 else None  # same group, tampered receiver
        out[case] = await expect_failure(sync(bad, bad_sender))
    (out_dir / f"rank{topo.rank}.json").write_text(json.dumps(out))
    for c in [client, *singles]:
        if c is not None:
            await c.close()
    from megatron_rl.parallel.topology import Topology

    Topology.destroy()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(","), int(sys.argv[4])))
