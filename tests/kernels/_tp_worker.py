"""One rank of the TP linear_logprobs test (run by test_linear_logprobs_tp.py).

Usage: python _tp_worker.py RANK WORLD PORT BACKEND VOCAB_SIZE|None OUT.pt
Builds the full inputs from a fixed seed (identical in every process), keeps this rank's
vocabulary shard of the weight (all of it when WORLD is 1), runs forward + backward through the public API with
``tp_group`` and saves (logprobs, entropy, dhidden, dweight_shard) to OUT.pt.
BACKEND "loss" runs ``linear_logprobs_loss`` instead, once per comma-separated VOCAB_SIZE
(one process start for several cases), and saves a list of
(loss, logprobs, entropy, dhidden, dweight_shard).
"""

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the test sets it anyway; before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # gloo all-reduces CUDA tensors too

import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_linear_logprobs_tp import TEMPERATURE, tp_inputs  # noqa: E402

from megatron_rl.kernels import linear_logprobs, linear_logprobs_loss  # noqa: E402


def main() -> None:
    rank, world, port, backend, vocab_arg, out = sys.argv[1:]
    rank, world = int(rank), int(world)
    vocab_sizes = [None if v == "None" else int(v) for v in vocab_arg.split(",")]
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    if backend == "loss":  # linear_logprobs_loss, once per vocabulary size
        results = [run_loss(rank, world, v) for v in vocab_sizes]
        torch.save(results, out)
        dist.destroy_process_group()
        return
    hidden_NH, weight_VH, labels_N, g_lp_N, g_ent_N = (t.to(DEVICE) for t in tp_inputs(vocab_sizes[0]))
    h, w = _leaves(hidden_NH, weight_VH, rank, world)
    lp, ent = linear_logprobs(
        h,
        w,
        labels_N,
        temperature=TEMPERATURE,
        tp_group=dist.group.WORLD,
        backend=backend,
        vocab_size=vocab_sizes[0],
    )
    (lp * g_lp_N + ent * g_ent_N).sum().backward()
    torch.save(tuple(t.detach().cpu() for t in (lp, ent, h.grad, w.grad)), out)
    dist.destroy_process_group()


def _leaves(hidden_NH, weight_VH, rank: int, world: int):
    """The replicated hidden and this rank's weight shard, as leaves that want grad."""
    v_local = weight_VH.shape[0] // world
    h = hidden_NH.clone().requires_grad_()
    return h, weight_VH[rank * v_local : (rank + 1) * v_local].clone().requires_grad_()


def run_loss(rank: int, world: int, vocab_size: int | None):
    """(loss, logprobs, entropy, dhidden, dweight_shard) of a non-linear token loss."""
    hidden_NH, weight_VH, labels_N, g_lp_N, g_ent_N = tp_inputs(vocab_size)
    h, w = _leaves(hidden_NH, weight_VH, rank, world)

    def token_loss(logp_n, ent_n, rows):
        return g_lp_N[rows] * logp_n + g_ent_N[rows] * ent_n + 0.1 * logp_n.square()

    loss, lp, ent = linear_logprobs_loss(
        h,
        w,
        labels_N,
        token_loss,
        temperature=TEMPERATURE,
        tp_group=dist.group.WORLD,
        vocab_size=vocab_size,
        chunk_tokens=8,  # several chunks: the statistics are merged chunk by chunk
    )
    (loss * 1.5).backward()
    return loss.detach(), lp, ent, h.grad, w.grad


if __name__ == "__main__":
    main()
