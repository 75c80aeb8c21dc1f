"""Helpers shared by rollout and weight-sync tests: free ports, serve processes, the tiny model.

Every server binds 127.0.0.1 on a free port and is stopped (process group SIGTERM, then
SIGKILL) in a ``finally``, whatever the test does.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

TINY = dict(vocab=1000, layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, tie=True)
"""Keyword arguments of tests/helpers/tiny_models.make_tiny_hf for the rollout tests' Qwen2."""


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread inside the block (the engine's many small forwards crawl in 2-thread
    regions on a shared CPU; the bitwise checks were measured there), restored after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def greedy(engine, prompt: list[int], n: int = 8) -> tuple[list[int], list[float]]:
    """``n`` greedy tokens of an in-process EmbeddedEngine after ``prompt``, with their log-probs."""
    from megatron_rl.rollout.sampling import parse_sampling_params

    params = parse_sampling_params({"temperature": 0, "max_new_tokens": n}, engine.vocab_size)
    (fut,) = engine.submit(prompt, params, rid=f"g{len(prompt)}", return_logprob=True)
    job = fut.result(timeout=60)
    return job.output_ids, job.output_logprobs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_processes(model_dir: Path, count: int, tmp_path: Path, timeout_s: float = 90.0,
                    extra_args: tuple[str, ...] = ()) -> Iterator[list]:
    """``count`` ``python -m megatron_rl.rollout.serve`` processes, healthy, stopped on exit;
    ``extra_args`` go to every one of them."""
    from megatron_rl.rollout.servers import (
        LaunchSpec,
        embedded_command,
        start_process,
        stop_process,
        wait_healthy,
    )

    servers = []
    try:
        for i in range(count):
            port = free_port()
            spec = LaunchSpec(engine="embedded", model_path=str(model_dir), port=port,
                              extra_args=["--threads", "1", "--seed", str(i), *extra_args])
            servers.append(start_process(embedded_command(spec), f"http://127.0.0.1:{port}",
                                         tmp_path / f"serve-{i}.log", {"CUDA_VISIBLE_DEVICES": ""}))
        wait_healthy(servers, timeout_s)
        yield servers
    finally:
        for server in servers:
            stop_process(server, grace_s=5.0)


def trainer_greedy(model, prompt, steps):
    """Greedy continuation of `prompt` by a transformers model: what a synced server must give."""
    import torch

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]
