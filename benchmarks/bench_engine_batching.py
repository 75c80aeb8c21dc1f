"""The embedded engine's continuous batching vs `transformers`' own batched `generate`, and
vs this machine's roofline.

    .venv/bin/python benchmarks/bench_engine_batching.py [--rounds 3] [--concurrency 1 8 32]

One random Qwen2 (hidden 512, 8 layers, FFN 1536, 8 heads / 2 KV heads, vocabulary 32000,
tied embeddings: 40.5M parameters, 162 MB in fp32; large enough that the forward, not Python,
dominates a decode step) serves every row, fp32, one torch thread (``--threads``). For each
concurrency c, the same c prompts (16-48 random tokens) get 64 sampled tokens each
(temperature 1, top-p 1, no top-k, EOS ignored):

- engine: the c requests submitted at once to an in-process ``EmbeddedEngine`` (no HTTP);
  wall time from the first submit to the last reply, prefill included;
- generate: ``model.generate`` on the c prompts left-padded in one batch, the same sampling,
  ``min_new_tokens = max_new_tokens`` so every row makes 64 tokens, prefill included;
- roofline: a decode step reads every weight once; ``memory copy`` copies a buffer of the
  weights' size (162 MB) and gives bytes/s, so the memory-bound ceiling is
  c x copy-bandwidth / weight-bytes tokens/s (with a 260 MB L3 the weights may partly stay in
  cache, and at larger c the step becomes compute-bound: ratios above 1 are possible).

Deterministic mode (``--deterministic-at``, default 8 concurrent): the same seeded requests
on a ``--deterministic`` engine, whose seeded rows decode in one batch-invariant batch
(``rollout/rowwise.py``), and on one with ``--weight-layout hf``, which falls back to one
forward per job per step (what deterministic mode did before).

A ``mixed`` workload shows what continuous batching is for: 32 requests whose lengths differ
(16..128 new tokens), 8 in flight at a time (the engine refills a slot as soon as a request
ends; ``generate`` runs 4 batches of 8, each as long as its longest request).

Rounds are interleaved (every row once per round) because the machine is shared; the table
gives the median and the min-max spread over rounds, and writes
benchmarks/results/bench_engine_batching.csv.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import threading
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
from _machine import write_table  # noqa: E402  (the script's own folder is on sys.path)

CSV_PATH = ROOT / "benchmarks" / "results" / "bench_engine_batching.csv"
SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
NEW_TOKENS = 64


def build(path: pathlib.Path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(max_position_embeddings=4096, **SHAPE)).eval()
    model.save_pretrained(str(path))
    return model


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 49, (count,), generator=g).tolist()
    return [torch.randint(1, SHAPE["vocab_size"], (n,), generator=g).tolist() for n in lengths]


def copy_gbps(nbytes: int) -> float:
    """Bytes per second of the best of 5 copies of an ``nbytes`` buffer into a preallocated one."""
    src = torch.ones(nbytes // 4)
    dst = torch.zeros_like(src)  # touched now: page faults stay out of the timing
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


def run_engine(engine, batch: list[list[int]], lengths: list[int], in_flight: int) -> tuple[int, float]:
    """Completion tokens and wall seconds; at most ``in_flight`` requests at a time (a slot is
    refilled from the job's done callback, as a client with that concurrency would). Every
    request carries a ``sampling_seed`` (read by deterministic engines only)."""
    from megatron_rl.rollout.sampling import parse_sampling_params

    slots = threading.Semaphore(in_flight)
    futures = []
    start = time.perf_counter()
    for i, (prompt, n) in enumerate(zip(batch, lengths)):
        slots.acquire()
        params = parse_sampling_params({"temperature": 1.0, "max_new_tokens": n, "ignore_eos": True,
                                        "sampling_seed": i}, engine.vocab_size)
        (future,) = engine.submit(prompt, params, rid=f"r{i}", return_logprob=True)
        future.add_done_callback(lambda _: slots.release())
        futures.append(future)
    tokens = sum(len(f.result().output_ids) for f in futures)
    return tokens, time.perf_counter() - start


def run_generate(model, batch: list[list[int]], lengths: list[int], in_flight: int) -> tuple[int, float]:
    """The same requests through ``generate``, ``in_flight`` at a time in static batches."""
    tokens, start = 0, time.perf_counter()
    for b in range(0, len(batch), in_flight):
        part, wanted = batch[b:b + in_flight], lengths[b:b + in_flight]
        width = max(map(len, part))
        ids = torch.zeros(len(part), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(part):
            ids[row, width - len(p):], mask[row, width - len(p):] = torch.tensor(p), 1
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=max(wanted), min_new_tokens=max(wanted),
                           do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=0)
        tokens += sum(wanted)  # what the requests asked for; the rows padded to the longest are waste
    return tokens, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--threads", type=int, default=1, help="torch threads, for both sides")
    ap.add_argument("--no-mixed", action="store_true", help="skip the mixed-length workload")
    ap.add_argument("--deterministic-at", type=int, nargs="*", default=[8],
                    help="concurrencies that also run on two --deterministic engines (batched seeded rows, and "
                         "--weight-layout hf: one row per job)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from megatron_rl.rollout.engine import EmbeddedEngine

    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        model = build(pathlib.Path(tmp))
        engines = {"engine": EmbeddedEngine(tmp, seed=0, max_batch_size=64)}
        if args.deterministic_at:
            engines["engine --deterministic"] = EmbeddedEngine(tmp, seed=0, max_batch_size=64, deterministic=True)
            engines["engine --deterministic, hf layout: one row per job"] = EmbeddedEngine(
                tmp, seed=0, max_batch_size=64, deterministic=True, transposed_weights=False)
        try:
            rows = measure(args, model, engines)
        finally:
            for engine in engines.values():
                engine.shutdown()
    write_table(rows, ["workload", "system", "tokens_per_s", "spread", "vs_generate", "vs_roofline"], CSV_PATH,
                threads=args.threads, model="Qwen2 h512 L8 ffn1536 V32000 fp32 (40.5M)")


def measure(args, model, engines: dict) -> list[dict]:
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    workloads = [(f"{c} concurrent x {NEW_TOKENS} tokens", prompts(c, seed=c), [NEW_TOKENS] * c, c)
                 for c in args.concurrency]
    if not args.no_mixed:
        g = torch.Generator().manual_seed(1)
        workloads.append(("mixed: 32 requests, 16-128 tokens, 8 in flight", prompts(32, seed=99),
                          torch.randint(16, 129, (32,), generator=g).tolist(), 8))
    for engine in engines.values():  # warm-up of every side, untimed
        run_engine(engine, *workloads[0][1:])
    run_generate(model, *workloads[0][1:])
    results: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        bandwidth = copy_gbps(weight_bytes)
        results.setdefault(("memory copy", "GB/s"), []).append(bandwidth)
        for name, batch, lengths, in_flight in workloads:
            systems = [("generate", run_generate, model), ("engine", run_engine, engines["engine"])]
            systems += [(name_, run_engine, e) for name_, e in engines.items() if name_ != "engine"
                        and in_flight in args.deterministic_at and not name.startswith("mixed")]
            for system, fn, target in systems:
                tokens, secs = fn(target, batch, lengths, in_flight)
                results.setdefault((name, system), []).append(tokens / secs)
            roofline = in_flight * bandwidth * 1e9 / weight_bytes
            results.setdefault((name, "roofline"), []).append(roofline)
        print(f"round {r + 1}/{args.rounds} done (copy {bandwidth:.1f} GB/s)", flush=True)
    rows = []
    for (name, system), values in results.items():
        row = dict(workload=name, system=system, tokens_per_s=round(statistics.median(values), 1),
                   spread=f"{min(values):.1f}-{max(values):.1f}", vs_generate="", vs_roofline="")
        for col, ref in (("vs_generate", "generate"), ("vs_roofline", "roofline")):
            if system != ref and system not in ("roofline", "GB/s"):
                # per round (the two ran back to back), then the median and the spread over rounds
                ratios = [v / r for v, r in zip(values, results[(name, ref)])]
                row[col] = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
