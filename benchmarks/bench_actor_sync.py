"""Weight sync from a TP=2 Megatron actor into a `serve` process, beside a plain memory copy,
and the embedded engine's generation throughput on the synced model.

    .venv/bin/python benchmarks/bench_actor_sync.py [--repeats 2] [--servers 1] [--shape 0.5b]

Actor: megatron-core GPTModel with Qwen2-0.5B's shapes (494M parameters, bf16, random
megatron init, AdamW with fp32 master weights), TP=2 on two torchrun processes (gloo, one
torch thread each). Receiver: ``--servers`` `megatron_rl.rollout.serve` processes started from
a random bf16 Qwen2 of the same shape (held in ``--server-dtype``: fp32 copies by default), with ``--weight-shm-dir`` a
directory under /dev/shm. Sync rows are timed on actor rank 0 (best of ``--repeats``):

- memory copy: the exported tensors copied into preallocated buffers (same bytes, bucket by
  bucket): the reference every sync row is divided by (``vs_memory_copy``);
- export only: ``export_hf(all_stages=True)`` drained on both ranks (the TP all-gathers);
- sync_actor_weights (the trainer's path before ``ActorSync``): pause, TP gathers, buckets of
  512 MiB (the config default) broadcast over a gloo group on loopback (per tensor, then
  SGLang's flattened_bucket), load into the served model, flush, continue;
- ActorSync full: one sender per stage, reused flat buckets filled from the TP shards (p2p)
  by a thread while the previous bucket is broadcast (``weights/stage_sync.py``);
- ActorSync colocated: the same buckets written into shared-memory files the server maps;
- ActorSync delta: after one real Adam step at ``--lr`` (the recipes' 1e-6) on a random batch,
  only the changed bf16 elements are sent (gloo, then shared memory), with per-tensor checksums
  verified by the server; ``sent_of_full`` is wire bytes / model bytes, ``changed`` the
  fraction of elements that changed;
- embedded generation on the synced model (sampled, ``--gen-batch`` concurrent requests).

Memory: the peak of all the benchmark's processes' PSS summed (sampled), and each one's VmHWM.
Prints a table and writes benchmarks/results/bench_actor_sync.csv (device and load average).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
from _machine import write_table  # noqa: E402
from bench_rollout import SHAPES, build_model, generation_rows, memcopy_seconds  # noqa: E402

from megatron_rl.weights.sync import free_port, iter_buckets  # noqa: E402

CSV_PATH = ROOT / "benchmarks" / "results" / "bench_actor_sync.csv"
BUCKET_MB = 512  # rollout.bucket_size_mb's default


def vm_hwm_gb(pid: int | str = "self") -> float:
    """Peak resident set size of a process (VmHWM), GB."""
    with open(f"/proc/{pid}/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib * 1024 / 1e9


class TreeMemory:
    """Peak of the summed PSS of this process and all its descendants, sampled in a thread.

    Per-process peaks (VmHWM) happen at different times and count shared library pages once
    per process, so their sum overstates what the machine held at once; this samples the
    total proportional set size (every ``interval_s``: shorter spikes can slip between samples).
    """

    def __init__(self, interval_s: float = 0.2):
        self.interval_s, self.peak_bytes = interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            total = 0
            for pid in self._tree():
                try:
                    with open(f"/proc/{pid}/smaps_rollup") as f:
                        total += next(int(line.split()[1]) for line in f if line.startswith("Pss:")) * 1024
                except (OSError, StopIteration, ValueError):
                    pass  # it exited between the listing and the read
            self.peak_bytes = max(self.peak_bytes, total)

    @staticmethod
    def _tree() -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        tree, todo = [], [os.getpid()]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += children.get(pid, [])
        return tree


# ---------------------------------------------------------------- torchrun worker (both ranks)

def memcopy_by_bucket(source, repeats: int, bucket_bytes: int) -> dict:
    """The bytes the sync sends, copied within this process bucket by bucket (one bucket and its
    copy in memory at a time, as in the sync, rather than two copies of the whole model)."""
    out = dict(bytes=0, params=0, memcopy_s=0.0)
    for bucket in iter_buckets(((n, t.contiguous()) for n, t in source), bucket_bytes):
        out["bytes"] += sum(t.numel() * t.element_size() for _, t in bucket)
        out["params"] += sum(t.numel() for _, t in bucket)
        out["memcopy_s"] += memcopy_seconds(bucket, repeats)
    return out


async def worker(args) -> None:
    from megatron_rl.actor.actor import Actor
    from megatron_rl.actor.model import build_model as build_actor_model
    from megatron_rl.actor.model import build_optimizer
    from megatron_rl.config.model import ModelConfig
    from megatron_rl.config.optimizer import OptimizerConfig
    from megatron_rl.config.parallel import ParallelConfig
    from megatron_rl.models.hf_config import read_dims
    from megatron_rl.parallel.topology import Topology
    from megatron_rl.rollout.client import RolloutClient
    from megatron_rl.weights.actor_sync import connect_actor_sender, sync_actor_weights
    from megatron_rl.weights.live import export_hf

    par = ParallelConfig(tp=2)
    topo = Topology.initialize(par)
    dims = read_dims(args.model_dir)
    start = time.perf_counter()
    chunks = build_actor_model(dims, par, ModelConfig(dtype="bfloat16"), topo)  # random init, DDP for the step
    (model,) = chunks
    opt = build_optimizer(chunks, OptimizerConfig(lr=args.lr, weight_decay=0.0, clip_grad=1.0), par, torch.bfloat16)
    actor = Actor(chunks, dims, topo, opt)
    rank0 = topo.rank == 0
    out: dict = {"build_s": time.perf_counter() - start}

    def best_of(fn) -> float:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    out["export_s"] = best_of(lambda: [None for _ in export_hf(model, dims, topo, all_stages=True)])
    source = export_hf(model, dims, topo, all_stages=True)
    if rank0:
        out.update(memcopy_by_bucket(source, args.repeats, args.bucket_mb << 20))
    else:
        for _ in source:  # this rank's part of the gathers
            pass
    client = RolloutClient(args.urls.split(","), control_timeout_s=3600, request_timeout_s=3600) if rank0 else None
    if not args.skip_legacy:
        sender = await connect_actor_sender(topo, client, timeout_s=1800)
        for label, flattened in (("per tensor", False), ("flattened_bucket", True)):
            reports = [await sync_actor_weights(model, dims, topo, client, sender=sender, bucket_bytes=args.bucket_mb << 20,
                                                flattened=flattened, weight_version=f"{label}-{r}")
                       for r in range(args.repeats)]
            if rank0:
                best = min(reports, key=lambda rep: rep.seconds)
                out[label] = [best.seconds, best.num_bytes, best.num_buckets]
        if sender is not None:
            await sender.close()
    out.update(await stage_sync_rows(actor, topo, client, args))
    if client is not None:
        await client.close()
    out["hwm_gb"] = vm_hwm_gb()
    pathlib.Path(args.out, f"rank{topo.rank}.json").write_text(json.dumps(out))
    Topology.destroy()


async def stage_sync_rows(actor, topo, client, args) -> dict:
    """ActorSync full (gloo, shared memory), then delta after one Adam step: {label: report fields}."""
    import uuid

    from megatron_rl.weights.stage_sync import ActorSync, SyncOptions

    model, dims, out = actor.model[0], actor.dims, {}

    def options(transport: str, delta: bool) -> SyncOptions:
        return SyncOptions(transport=transport, bucket_bytes=args.bucket_mb << 20, delta=delta, full_every=0,
                           shm_dir=args.shm_dir, group_name=f"bench-{uuid.uuid4().hex[:6]}", timeout_s=1800,
                           persistent_shm=args.server_dtype == "bfloat16")  # the actor is bf16: zero copy

    def keep(label: str, report) -> None:
        if report is not None:
            out[label] = dict(seconds=report.seconds, full=report.full, **dataclasses.asdict(report.stats))

    for transport in ("distributed", "shm"):
        link = await ActorSync.open(model, dims, topo, client, options(transport, False))
        reports = [await link.sync(weight_version=f"{transport}-{r}") for r in range(args.repeats)]
        keep(f"full {transport}", min(reports, key=lambda rep: rep.seconds) if topo.rank == 0 else None)
        await link.close()
        del link  # its buffers
    links = {t: await ActorSync.open(model, dims, topo, client, options(t, True)) for t in ("distributed", "shm")}
    for transport, link in links.items():
        await link.sync(weight_version=f"base-{transport}")  # the full sync each delta is taken against
    out["step_s"] = one_adam_step(actor)
    for transport, link in links.items():
        keep(f"delta {transport}", await link.sync(weight_version=f"delta-{transport}"))
        await link.close()
    return out


def one_adam_step(actor) -> float:
    """One optimizer step on a random batch (4 x 128 tokens, mean log-likelihood): seconds."""
    from megatron_rl.actor.forward import MicroBatch

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, actor.dims.vocab_size, (4, 128), generator=g)
    mb = MicroBatch(tokens_BS=tokens, loss_mask_BS=torch.ones(4, 128))
    mb.loss_mask_BS[:, -1] = 0

    def loss_fn(logp, ent, m):
        return -(logp * m.loss_mask_BS).sum() / m.loss_mask_BS.sum(), {}

    start = time.perf_counter()
    actor.train_step([mb], loss_fn, temperature=1.0)
    return time.perf_counter() - start


# ---------------------------------------------------------------- driver

def run_actor(urls: list[str], model_dir: pathlib.Path, out: pathlib.Path, args) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", __file__, "--worker", "--urls", ",".join(urls),
           "--model-dir", str(model_dir), "--out", str(out), "--repeats", str(args.repeats), "--lr", str(args.lr),
           "--shm-dir", args.shm_dir, "--bucket-mb", str(args.bucket_mb), "--server-dtype", args.server_dtype,
           *(["--skip-legacy"] if args.skip_legacy else [])]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'benchmarks'}", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"actor workers failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    ap.add_argument("--repeats", type=int, default=2, help="runs per row; the best is kept")
    ap.add_argument("--servers", type=int, default=1, help="serve processes receiving the weights")
    ap.add_argument("--server-threads", type=int, default=1, help="torch threads per server (0 = torch default)")
    ap.add_argument("--bucket-mb", type=int, default=BUCKET_MB, help="sync bucket size in MiB (rollout.bucket_size_mb)")
    ap.add_argument("--server-layout", choices=("auto", "transposed", "hf"), default="auto",
                    help="the servers' --weight-layout (auto: transposed for float32, hf for bfloat16)")
    ap.add_argument("--server-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the servers' --dtype; a run other than float32 + auto writes bench_actor_sync_<dtype>_<layout>.csv")
    ap.add_argument("--lr", type=float, default=1e-6, help="Adam learning rate of the step before the delta sync")
    ap.add_argument("--skip-legacy", action="store_true", help="leave out the sync_actor_weights rows")
    ap.add_argument("--gen-batch", type=int, default=8)
    ap.add_argument("--gen-prompt", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--urls", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--shm-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        asyncio.run(worker(args))
        return
    from megatron_rl.config.rollout import RolloutConfig
    from megatron_rl.rollout.servers import ServerManager

    with (tempfile.TemporaryDirectory(prefix="bench-actor-sync-") as tmp_name,
          tempfile.TemporaryDirectory(prefix="bench-actor-sync-", dir="/dev/shm") as shm_dir, TreeMemory() as mem):
        tmp, args.shm_dir = pathlib.Path(tmp_name), shm_dir
        layout = args.server_layout if args.server_layout != "auto" else \
            ("transposed" if args.server_dtype == "float32" else "hf")
        server = f"{args.server_dtype} server, {layout} layout"
        build_model(SHAPES[args.shape], torch.bfloat16, tmp / "served", seed=0)  # saved, then dropped
        cfg = RolloutConfig(num_servers=args.servers, base_port=0, health_timeout_s=600, request_timeout_s=3600)
        extra = ["--threads", str(args.server_threads)] if args.server_threads > 0 else []
        extra += ["--weight-layout", args.server_layout, "--dtype", args.server_dtype]
        extra += ["--weight-shm-dir", shm_dir]
        with ServerManager(cfg, str(tmp / "served"), log_dir=tmp / "logs", extra_args=extra) as manager:
            print(f"actor (TP=2) -> {args.servers} server(s) ...", flush=True)
            rank0, rank1 = run_actor(manager.urls, tmp / "served", tmp, args)
            print("generation ...", flush=True)
            case = f"Qwen2 {args.shape} shape, {rank0['params'] / 1e6:.0f}M params"
            gen = generation_rows(manager.urls, f"{case} (synced), {server}",
                                  (1, args.gen_batch),
                                  args.gen_prompt, args.gen_tokens)
            server_hwm = [vm_hwm_gb(s.process.pid) for s in manager.servers if s.process is not None]
    rows = actor_rows(rank0, args.servers, f"{case}, {server}", args.lr)
    for r in gen:
        r.update(vs_memory_copy="", sent_of_full="", changed="")
    rows += gen
    for r in rows:
        r.update(seconds=round(r["seconds"], 3), throughput=round(r["throughput"], 2))
    hwm = [rank0["hwm_gb"], rank1["hwm_gb"], *server_hwm, vm_hwm_gb()]
    default = args.server_dtype == "float32" and args.server_layout == "auto"
    csv_path = CSV_PATH if default else CSV_PATH.with_name(f"bench_actor_sync_{args.server_dtype}_{args.server_layout}.csv")
    write_table(rows, COLUMNS, csv_path, server_threads=args.server_threads or "default",
                peak_pss_total_gb=round(mem.peak_bytes / 1e9, 2))
    print(f"actor build (random init, per rank): {rank0['build_s']:.1f} s; Adam step before the delta rows "
          f"{rank0['step_s']:.1f} s")
    print(f"memory: peak PSS of all the benchmark's processes together {mem.peak_bytes / 1e9:.2f} GB (sampled "
          f"every {mem.interval_s:g} s); per-process RSS peaks (VmHWM, at different times) actor ranks "
          f"{rank0['hwm_gb']:.2f} + {rank1['hwm_gb']:.2f}, server(s) {' + '.join(f'{h:.2f}' for h in server_hwm)}, "
          f"driver {hwm[-1]:.2f}")


COLUMNS = ["benchmark", "case", "transport", "amount", "seconds", "throughput", "unit", "vs_memory_copy",
           "sent_of_full", "changed"]


def actor_rows(rank0: dict, servers: int, case: str, lr: float) -> list[dict]:
    """Rows in model bytes per second; ``vs_memory_copy`` divides by the memory-copy row's."""
    nbytes = rank0["bytes"]
    case = f"{case}, bf16, TP=2 -> {servers} server(s)"
    amount = f"{nbytes / 1e9:.3f} GB"
    memcopy_gbs = nbytes / 1e9 / rank0["memcopy_s"]

    def row(transport: str, seconds: float, sent: str = "", changed: str = "") -> dict:
        gbs = nbytes / 1e9 / seconds
        return dict(benchmark="actor weight sync", case=case, transport=transport, amount=amount, seconds=seconds,
                    throughput=gbs, unit="GB/s", vs_memory_copy=f"{gbs / memcopy_gbs:.1%}", sent_of_full=sent,
                    changed=changed)

    rows = [row("memory copy of the exported tensors (rank 0, per bucket)", rank0["memcopy_s"]),
            row("export only: TP all-gather, nothing sent", rank0["export_s"])]
    for label in ("per tensor", "flattened_bucket"):
        if label in rank0:
            seconds, sent, buckets = rank0[label]
            assert sent == nbytes, (sent, nbytes)
            rows.append(row(f"sync_actor_weights, gloo broadcast {label} ({buckets} buckets)", seconds, "100%"))
    titles = {"full distributed": "ActorSync full: stage sender, gloo flattened buckets, fill overlaps send",
              "full shm": "ActorSync colocated full: shared-memory buckets",
              "delta distributed": f"ActorSync delta after 1 Adam step (lr {lr:g}): gloo",
              "delta shm": f"ActorSync delta after 1 Adam step (lr {lr:g}): shared memory"}
    for key, title in titles.items():
        rep = rank0[key]
        assert rep["full_bytes"] == nbytes, (key, rep["full_bytes"], nbytes)
        changed = f"{rep['changed'] / rep['elements']:.3%}" if rep["elements"] else ""
        # fill: the leader's fill thread (TP shards into the buckets); send: the transmits, the
        # servers' load included. They overlap, so each is a share of the wall time, not a part.
        rows.append(row(f"{title} ({rep['buckets']} buckets; fill {rep['fill_s']:.2f} s, send+load "
                        f"{rep['send_s']:.2f} s)", rep["seconds"],
                        f"{rep['sent_bytes'] / rep['full_bytes']:.2%}", changed))
    return rows


if __name__ == "__main__":
    main()
