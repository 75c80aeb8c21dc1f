"""What streaming costs on the embedded engine: streamed vs whole replies, same server, same run.

    .venv/bin/python benchmarks/bench_http_stream.py [--tokens 64] [--concurrency 1 8] [--rounds 2]

One ``megatron-rl serve --threads 1`` process serves the demo's tiny model (character
tokenizer, random Qwen2, hidden 128, 4 layers). Each row sends ``concurrency`` seeded requests
of ``tokens`` tokens at once (``ignore_eos``) through one of: native /generate (whole reply,
the reference), /generate with ``stream: true``, /v1/completions with ``stream: true``;
rounds interleave the modes so machine load hits them alike. Reported: completion tokens/s
of wall time, the ratio to the whole-reply row of the same round and concurrency, the
server process's CPU time per completion token (user + system, all threads: what streaming
adds, less sensitive than wall time to the load of a shared machine) and the median time to
the first streamed event. Prints a table and writes
benchmarks/results/bench_http_stream.csv.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import statistics
import tempfile
import time

import aiohttp

from megatron_rl.demo.tiny import build_model, build_tokenizer
from megatron_rl.rollout.servers import (
    LaunchSpec,
    embedded_command,
    start_process,
    stop_process,
    wait_healthy,
)
from megatron_rl.weights.sync import free_port

ROOT = pathlib.Path(__file__).resolve().parents[1]
from _machine import write_table  # noqa: E402  (the script's own folder is on sys.path)

CSV_PATH = ROOT / "benchmarks" / "results" / "bench_http_stream.csv"
MODES = ("generate", "generate_stream", "completions_stream")


def payload(mode: str, prompt: list[int], tokens: int, seed: int) -> tuple[str, dict]:
    if mode == "completions_stream":
        return "/v1/completions", {"prompt": prompt, "max_tokens": tokens, "seed": seed, "ignore_eos": True,
                                   "stream": True}
    return "/generate", {"input_ids": prompt, "return_logprob": True, "stream": mode == "generate_stream",
                         "sampling_params": {"max_new_tokens": tokens, "sampling_seed": seed, "ignore_eos": True}}


async def one(session: aiohttp.ClientSession, url: str, body: dict) -> float | None:
    """Send one request, read it to the end; seconds to the first streamed event (None if whole)."""
    start = time.perf_counter()
    first = None
    async with session.post(url, json=body) as resp:
        resp.raise_for_status()
        async for _ in resp.content.iter_any():
            first = first if first is not None else time.perf_counter() - start
    return first if body.get("stream") else None


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (Linux /proc)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_row(base: str, pid: int, mode: str, concurrency: int, tokens: int, prompt: list[int],
                  seed: int) -> dict:
    cpu = cpu_seconds(pid)
    async with aiohttp.ClientSession() as session:
        path, _ = payload(mode, prompt, tokens, 0)
        start = time.perf_counter()
        firsts = await asyncio.gather(*(one(session, base + path, payload(mode, prompt, tokens, seed + i)[1])
                                        for i in range(concurrency)))
        wall = time.perf_counter() - start
    cpu = cpu_seconds(pid) - cpu
    firsts = [f for f in firsts if f is not None]
    return {"mode": mode, "concurrency": concurrency, "tokens_per_s": round(concurrency * tokens / wall, 1),
            "server_cpu_ms_per_token": round(1000 * cpu / (concurrency * tokens), 2),
            "first_event_ms": round(1000 * statistics.median(firsts), 1) if firsts else "-"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = pathlib.Path(tmp) / "tiny"
        tok = build_tokenizer(model_dir)
        build_model(model_dir, tok, max_positions=args.tokens + 64)
        prompt = tok.encode("<|im_start|>user\n12+34=?<|im_end|>\n<|im_start|>assistant\n")
        port = free_port()
        server = start_process(embedded_command(LaunchSpec("embedded", str(model_dir), port,
                                                           extra_args=["--threads", "1"])),
                               f"http://127.0.0.1:{port}", pathlib.Path(tmp) / "serve.log",
                               {"CUDA_VISIBLE_DEVICES": ""})
        try:
            wait_healthy([server], 120)
            base = f"http://127.0.0.1:{port}"
            pid = server.process.pid
            asyncio.run(run_row(base, pid, "generate", 2, 8, prompt, 0))  # warm-up
            rows = []
            for r in range(args.rounds):
                for concurrency in args.concurrency:
                    for mode in MODES:
                        row = asyncio.run(run_row(base, pid, mode, concurrency, args.tokens, prompt, 100 * r))
                        rows.append({"round": r, **row})
        finally:
            stop_process(server, grace_s=5.0)
    for row in rows:
        ref = next(x for x in rows if x["round"] == row["round"] and x["concurrency"] == row["concurrency"]
                   and x["mode"] == "generate")
        row["vs_whole_reply"] = round(row["tokens_per_s"] / ref["tokens_per_s"], 2)
    write_table(rows, ["round", "mode", "concurrency", "tokens_per_s", "vs_whole_reply", "server_cpu_ms_per_token",
                       "first_event_ms"],
                CSV_PATH, tokens=args.tokens)


if __name__ == "__main__":
    main()
