"""linear_logprobs (torch and Triton backends) against the unfused float64 reference.

Forward and backward, with a random upstream gradient on BOTH outputs (log-prob and
entropy), odd shapes, labels at the first and last vocabulary id, several temperatures.
Triton runs under the interpreter on CPU (tests/kernels/conftest.py), so its shapes are
tiny; the torch backend gets medium shapes with small chunks to cross every chunk edge.
TP=2 invariance is in test_linear_logprobs_tp.py.

Shape suffixes: N tokens, H hidden, V vocabulary.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron_rl.errors import DataError
from megatron_rl.kernels import linear_logprobs
from megatron_rl.kernels.linear_logprobs import LinearLogprobsFunction
from megatron_rl.kernels.linear_logprobs_torch import TorchEngine
from megatron_rl.kernels.reference import linear_logprobs_reference

TEMPERATURES = (0.5, 1.0, 1.7)
TORCH_SHAPE = (300, 64, 5003)  # N, H, V
TRITON_SHAPE = (37, 48, 1031)


def triton_engine(**overrides):
    """The Triton engine; never imports triton before the interpreter flag is in place."""
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py must set it first"
    pytest.importorskip("triton")
    from megatron_rl.kernels.linear_logprobs_triton import TritonEngine

    return TritonEngine(**overrides)


def engine_for(backend: str):
    """Small chunks and splits, not multiples of the tile sizes: every edge is crossed,
    and tiles straddle split ends (masked columns beside a label in the next split)."""
    if backend == "torch":
        return TorchEngine(token_chunk=128, vocab_chunk=1000)
    return triton_engine(split_size=200, vocab_chunk=384)


def shape_for(backend: str) -> tuple[int, int, int]:
    return TORCH_SHAPE if backend == "torch" else TRITON_SHAPE


def device_for(backend: str) -> str:
    """Triton runs compiled on a GPU machine, interpreted on CPU tensors elsewhere."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def apply_fused(backend, hidden_NH, weight_VH, labels_N, temperature):
    """Forward through the shared Function on the backend's device; results on CPU."""
    dev = device_for(backend)
    lp, ent = LinearLogprobsFunction.apply(
        hidden_NH.to(dev),
        weight_VH.to(dev),
        labels_N.to(dev),
        1.0 / temperature,
        None,
        0,
        True,
        engine_for(backend),
    )
    return lp.cpu(), ent.cpu()


def make_inputs(n: int, h: int, v: int, seed: int = 0, logit_std: float = 3.0):
    """hidden_NH, weight_VH (logits ~ N(0, logit_std^2)), labels_N, g_logprob_N, g_entropy_N."""
    gen = torch.Generator().manual_seed(seed)
    hidden_NH = torch.randn(n, h, generator=gen)
    weight_VH = torch.randn(v, h, generator=gen) * (logit_std / h**0.5)
    labels_N = torch.randint(0, v, (n,), generator=gen)
    labels_N[0], labels_N[1] = 0, v - 1
    return (
        hidden_NH,
        weight_VH,
        labels_N,
        torch.randn(n, generator=gen),
        torch.randn(n, generator=gen),
    )


def run_fused(backend, hidden_NH, weight_VH, labels_N, temperature, g_lp_N, g_ent_N):
    """(logprobs, entropy, dhidden, dweight) through the shared autograd Function, on CPU."""
    dev = device_for(backend)
    h = hidden_NH.detach().to(dev).requires_grad_()
    w = weight_VH.detach().to(dev).requires_grad_()
    lp, ent = LinearLogprobsFunction.apply(
        h, w, labels_N.to(dev), 1.0 / temperature, None, 0, True, engine_for(backend)
    )
    (lp * g_lp_N.to(dev) + ent * g_ent_N.to(dev)).sum().backward()
    return lp.detach().cpu(), ent.detach().cpu(), h.grad.cpu(), w.grad.cpu()


def run_reference(hidden_NH, weight_VH, labels_N, temperature, g_lp_N, g_ent_N, dtype):
    """The same four results from materialised logits; leaves in ``dtype``."""
    h = hidden_NH.detach().to(dtype).requires_grad_()
    w = weight_VH.detach().to(dtype).requires_grad_()
    lp, ent = linear_logprobs_reference(h, w, labels_N, temperature=temperature)
    (lp * g_lp_N.to(lp.dtype) + ent * g_ent_N.to(ent.dtype)).sum().backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs error relative to the largest magnitude of the expected tensor."""
    a, e = actual.double(), expected.double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def assert_signs(logprobs_N: torch.Tensor, entropy_N: torch.Tensor) -> None:
    """verl issue 2656: positive log-probs collapsed training. Exact, no tolerance."""
    assert torch.isfinite(logprobs_N).all() and torch.isfinite(entropy_N).all()
    assert (logprobs_N <= 0).all(), logprobs_N.max()
    assert (entropy_N >= 0).all(), entropy_N.min()


NAMES = ("logprobs", "entropy", "dhidden", "dweight")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_fp32_matches_float64_reference(backend, temperature):
    inputs = make_inputs(*shape_for(backend), seed=int(temperature * 10))
    got = run_fused(backend, *inputs[:3], temperature, *inputs[3:])
    want = run_reference(*inputs[:3], temperature, *inputs[3:], dtype=torch.float64)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == torch.float32
        assert rel_err(g, w) <= 1e-5, (name, rel_err(g, w))
    assert_signs(got[0], got[1])


@pytest.mark.parametrize(
    "backend, dtype",
    [
        ("torch", torch.bfloat16),
        ("torch", torch.float16),
        ("triton", torch.float16),
        # bf16 under the interpreter is right only because tiles are upcast on load.
        ("triton", torch.bfloat16),
    ],
)
def test_low_precision_no_worse_than_eager(backend, dtype):
    """16-bit fused and 16-bit eager both against fp32 eager on the same rounded inputs."""
    hidden, weight, labels, g_lp, g_ent = make_inputs(*shape_for(backend), seed=3)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    fused = run_fused(backend, hidden, weight, labels, 0.8, g_lp, g_ent)
    eager = run_reference(hidden, weight, labels, 0.8, g_lp, g_ent, dtype=dtype)
    exact = run_reference(hidden, weight, labels, 0.8, g_lp, g_ent, dtype=torch.float32)
    assert fused[2].dtype == dtype and fused[3].dtype == dtype
    for name, f, e, x in zip(NAMES, fused, eager, exact):
        # Fused logits keep the fp32 accumulator, eager rounds them to 16 bits: the fused
        # error should be no larger (measured: 2-20x smaller).
        assert rel_err(f, x) <= rel_err(e, x), (name, rel_err(f, x), rel_err(e, x))
    assert_signs(fused[0], fused[1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_signs_exact_on_extreme_distributions(backend):
    """Peaked (logits ~ +-1000 after temperature), tied and uniform rows."""
    n, h, v = 32, 48, 1031
    hidden, weight, labels, _, _ = make_inputs(n, h, v, seed=5, logit_std=50.0)
    weight[7] = weight[8]  # two identical columns: tied maxima
    labels[2:10] = (hidden @ weight.T).argmax(dim=1)[2:10]  # label = arg-max: log-prob ~ 0
    for temperature in (0.05, 1.0):
        lp, ent = apply_fused(backend, hidden, weight, labels, temperature)
        assert_signs(lp, ent)
        ref_lp, ref_ent = linear_logprobs_reference(
            hidden, weight, labels, temperature=temperature, compute_dtype=torch.float64
        )
        assert torch.allclose(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)
        assert torch.allclose(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    # All-zero weight: uniform distribution, entropy = log V and log-prob = -log V.
    lp, ent = apply_fused(backend, hidden, torch.zeros_like(weight), labels, 1.0)
    log_v = torch.log(torch.tensor(float(v)))
    assert torch.allclose(lp, -log_v.expand(n)) and torch.allclose(ent, log_v.expand(n))
    assert_signs(lp, ent)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_public_api_single_outputs(backend):
    """Default heuristics via the public API; an unused output contributes no gradient."""
    hidden, weight, labels, g_lp, g_ent = make_inputs(*TRITON_SHAPE, seed=7)
    if backend == "triton":
        triton_engine()  # interpreter check + skip without triton
    h = hidden.to(device_for(backend)).requires_grad_()
    w = weight.to(device_for(backend)).requires_grad_()
    # The reference runs on the host inputs; the kernel on the backend's device.
    ref = run_reference(hidden, weight, labels, 1.3, torch.zeros_like(g_lp), g_ent, torch.float64)
    lp, ent = linear_logprobs(h, w, labels.to(h.device), temperature=1.3, backend=backend)
    (ent * g_ent.to(h.device)).sum().backward()  # entropy bonus only: log-prob output unused
    for name, g, r in zip(NAMES, (lp, ent, h.grad, w.grad), ref):
        assert rel_err(g.detach().cpu(), r) <= 1e-5, name

    ref = run_reference(hidden, weight, labels, 1.3, g_lp, torch.zeros_like(g_ent), torch.float64)
    h.grad = w.grad = None
    lp, ent = linear_logprobs(h, w, labels.to(h.device), temperature=1.3, return_entropy=False, backend=backend)
    assert ent is None
    (lp * g_lp.to(h.device)).sum().backward()
    for name, g, r in zip(
        ("logprobs", "dhidden", "dweight"), (lp, h.grad, w.grad), ref[::2] + ref[3:]
    ):
        assert rel_err(g.detach().cpu(), r) <= 1e-5, name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_hidden_no_grad_and_empty(backend):
    hidden, weight, labels, _, _ = make_inputs(*TRITON_SHAPE, seed=9)
    dev = device_for(backend)
    wide = torch.cat([hidden, torch.randn_like(hidden)], dim=1).to(dev)
    strided = wide[:, : hidden.shape[1]]  # row stride 2H: a view, not a copy
    assert not strided.is_contiguous()
    with torch.no_grad():
        lp, ent = apply_fused(backend, strided, weight, labels, 1.0)
    ref_lp, ref_ent = linear_logprobs_reference(hidden, weight, labels, compute_dtype=torch.float64)
    assert rel_err(lp, ref_lp) <= 1e-5 and rel_err(ent, ref_ent) <= 1e-5

    h = torch.zeros(0, hidden.shape[1], device=dev, requires_grad=True)
    lp, ent = linear_logprobs(h, weight.to(dev), labels[:0].to(dev), backend=backend)
    assert lp.shape == ent.shape == (0,)
    (lp.sum() + ent.sum()).backward()
    assert h.grad.shape == h.shape


def test_validation_errors():
    hidden, weight, labels, _, _ = make_inputs(5, 8, 11)
    with pytest.raises(ValueError, match="hidden"):
        linear_logprobs(hidden, weight[:, :7], labels)
    with pytest.raises(ValueError, match="labels"):
        linear_logprobs(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="dtype"):
        linear_logprobs(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match="backend"):
        linear_logprobs(hidden, weight, labels, backend="cuda")
    for bad in (11, -100):
        with pytest.raises(DataError, match=r"\[0, 11\)"):
            linear_logprobs(hidden, weight, torch.tensor([0, 1, 2, 3, bad]))


def test_cpu_use_never_imports_triton():
    """Plain CPU users must not need triton: backend="auto" on CPU stays in torch."""
    code = (
        "import sys, torch\n"
        "from megatron_rl.kernels import linear_logprobs\n"
        "lp, ent = linear_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4]))\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.parametrize("n_tokens, vocab", [(0, 151936), (8192, 0), (0, 0), (29, 515)])
def test_gpu_split_heuristic_never_divides_by_zero(monkeypatch, n_tokens, vocab):
    """The CUDA branch of the split heuristic, run here with a stub device (found on an H200:
    0 tokens, and a TP shard that is all vocabulary padding, divided by zero)."""
    from types import SimpleNamespace

    from megatron_rl.kernels import linear_logprobs_triton as lt

    monkeypatch.setattr(lt, "INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: SimpleNamespace(multi_processor_count=132))
    split = lt._split_size(n_tokens, vocab, torch.device("cuda"), 128, 128)
    assert split >= 128 and split % 128 == 0
    assert split >= vocab or -(-vocab // split) <= -(-vocab // 128)
