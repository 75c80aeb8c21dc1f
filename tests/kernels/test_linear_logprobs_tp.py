"""Tensor-parallel invariance: TP=2 (gloo, 2 processes) equals TP=1, both backends.

Forward (log-probs, entropy) and both gradients. Checks the gradient contract of
``linear_logprobs`` under TP: dweight is the local shard's gradient (concatenated over
ranks it equals TP=1's), dhidden comes back complete and identical on every rank. The same
for ``linear_logprobs_loss`` (loss-in-forward), whose statistics are merged chunk by chunk.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TEMPERATURE = 0.7
N, H, V_LOCAL = 29, 40, 515  # tiny: the Triton backend runs under the interpreter on CPU


def tp_inputs(vocab_size: int | None):
    """Full inputs, identical in every process; labels on both sides of shard edges.

    The weight has 2 * V_LOCAL rows (two TP shards); ``vocab_size`` < that: the trailing
    rows are padding (left out of the softmax).
    """
    gen = torch.Generator().manual_seed(1234)
    padded = 2 * V_LOCAL
    valid = vocab_size or padded
    hidden_NH = torch.randn(N, H, generator=gen)
    weight_VH = torch.randn(padded, H, generator=gen) * (3.0 / H**0.5)
    labels_N = torch.randint(0, valid, (N,), generator=gen)
    edges = [0, V_LOCAL - 1, V_LOCAL, valid - 1]
    labels_N[:4] = torch.tensor([min(e, valid - 1) for e in edges])
    g_lp_N, g_ent_N = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    return hidden_NH, weight_VH, labels_N, g_lp_N, g_ent_N


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend, vocab_size",
    [
        ("torch", None),
        ("triton", None),
        ("torch", 2 * V_LOCAL - 37),  # rank 1's shard ends in padding rows
        ("triton", V_LOCAL),  # rank 1's shard is all padding
    ],
)
def test_tp2_equals_tp1(backend, vocab_size, tmp_path):
    if backend == "triton":
        pytest.importorskip("triton")
    outs = _run_workers(tmp_path, backend, str(vocab_size))
    lp, ent, dhidden, dweight = outs[2]

    ranks = outs[:2]
    for r_lp, r_ent, r_dh, _ in ranks:
        assert _rel(r_lp, lp) <= 1e-5 and _rel(r_ent, ent) <= 1e-5
        assert _rel(r_dh, dhidden) <= 1e-5  # complete, not a partial sum over the shard
        assert (r_lp <= 0).all() and (r_ent >= 0).all()
    # Replicated results must agree across ranks bit for bit, or replicas drift apart.
    assert torch.equal(ranks[0][0], ranks[1][0]) and torch.equal(ranks[0][2], ranks[1][2])
    assert _rel(torch.cat([r[3] for r in ranks]), dweight) <= 1e-5
    if vocab_size is not None:  # padding rows: outside the softmax, so no gradient
        assert (dweight[vocab_size:] == 0).all()
        assert (torch.cat([r[3] for r in ranks])[vocab_size:] == 0).all()


@pytest.mark.slow
def test_loss_in_forward_tp2_equals_tp1(tmp_path):
    """linear_logprobs_loss: rank 1's shard ends in padding rows, then is all padding."""
    vocab_sizes = (2 * V_LOCAL - 37, V_LOCAL)
    outs = _run_workers(tmp_path, "loss", ",".join(map(str, vocab_sizes)))
    for case, vocab_size in enumerate(vocab_sizes):
        loss, lp, ent, dhidden, dweight = outs[2][case]
        ranks = [o[case] for o in outs[:2]]
        for r_loss, r_lp, r_ent, r_dh, _ in ranks:
            assert _rel(r_loss, loss) <= 1e-5 and _rel(r_lp, lp) <= 1e-5
            assert _rel(r_ent, ent) <= 1e-5 and _rel(r_dh, dhidden) <= 1e-5
        assert torch.equal(ranks[0][0], ranks[1][0]) and torch.equal(ranks[0][3], ranks[1][3])
        dweight_tp2 = torch.cat([r[4] for r in ranks])
        assert _rel(dweight_tp2, dweight) <= 1e-5
        assert (dweight[vocab_size:] == 0).all() and (dweight_tp2[vocab_size:] == 0).all()


def _run_workers(tmp_path: Path, backend: str, vocab_arg: str) -> list:
    """Run _tp_worker.py as TP=2 (two processes) and TP=1 (a third); their saved results.

    TP=1 runs with the same environment as TP=2, so both sides use the same kernel path
    (on a GPU machine the workers run the compiled kernels on the GPU, gloo between them).
    """
    worker = Path(__file__).with_name("_tp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")  # 3 processes, 2 cores
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # on a GPU the workers run the compiled kernels on it
    runs = [(2, 0), (2, 1), (1, 0)]  # (world, rank)
    ports = {2: _free_port(), 1: _free_port()}
    outs = [tmp_path / f"{backend}_tp{world}_rank{rank}.pt" for world, rank in runs]
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(rank), str(world), str(ports[world]), backend,
             vocab_arg, str(out)],
            env=env,
        )
        for (world, rank), out in zip(runs, outs)
    ]
    for p in procs:
        assert p.wait(timeout=240) == 0, "a TP worker failed (its traceback is above)"
    return [torch.load(o) for o in outs]
