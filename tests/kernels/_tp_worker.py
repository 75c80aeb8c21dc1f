"""One rank of the TP linear_logprobs test (run by test_linear_logprobs_tp.py).

Usage: python _tp_worker.py RANK WORLD PORT BACKEND VOCAB_SIZE|None OUT.pt
Builds the full inputs from a fixed seed (identical in every process), keeps this rank's
vocabulary shard of the weight (all of it when WORLD is 1), runs forward + backward through the public API with
``tp_group`` and saves (logprobs, entropy, dhidden, dweight_shard) to OUT.pt.
"""

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the test sets it anyway; before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from megatron_rl.kernels import linear_logprobs  # noqa: E402
from test_linear_logprobs_tp import TEMPERATURE, tp_inputs  # noqa: E402


def main() -> None:
    rank, world, port, backend, vocab_size, out = sys.argv[1:]
    rank, world = int(rank), int(world)
    vocab_size = None if vocab_size == "None" else int(vocab_size)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    hidden_NH, weight_VH, labels_N, g_lp_N, g_ent_N = tp_inputs(vocab_size)
    v_local = weight_VH.shape[0] // world
    h = hidden_NH.clone().requires_grad_()
    w = weight_VH[rank * v_local : (rank + 1) * v_local].clone().requires_grad_()
    lp, ent = linear_logprobs(
        h,
        w,
        labels_N,
        temperature=TEMPERATURE,
        tp_group=dist.group.WORLD,
        backend=backend,
        vocab_size=vocab_size,
    )
    (lp * g_lp_N + ent * g_ent_N).sum().backward()
    torch.save((lp.detach(), ent.detach(), h.grad, w.grad), out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
