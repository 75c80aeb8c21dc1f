"""Narrow workarounds that let megatron-core (0.16.x) run on CPU with gloo.

megatron-core assumes CUDA in a handful of places: it asks for ``torch.cuda.current_device()``
to place small buffers, builds its default causal mask with ``device="cuda"``, keeps RNG
streams with ``torch.cuda.get_rng_state()``, and checks tensor types against CUDA classes in
its optimizer. On a machine without CUDA each of those raises ``Torch not compiled with CUDA
enabled``. ``apply()`` patches exactly those places, and nothing else; it is a no-op when CUDA
is available, so GPU runs use megatron-core untouched.

Every patch lists the megatron-core call site it serves (0.16.1 line numbers). Keep this the
only module in the project that patches a library.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

log = logging.getLogger(__name__)
_APPLIED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def apply() -> bool:
    """Install the CPU workarounds once; returns True when they were (needed and) applied."""
    global _APPLIED
    if cuda_available():
        return False
    if _APPLIED:
        return True
    _patch_current_device()
    _patch_causal_mask()
    _patch_rng_tracker()
    _patch_optimizer()
    _patch_pipeline()
    _APPLIED = True
    log.debug("megatron-core CPU compatibility patches applied")
    return True


def _patch_current_device() -> None:
    # rotary_pos_embedding.py:162/297, attention.py:430, dot_product_attention.py:123,
    # transformer_layer.py:936, param_and_grad_buffer and DDP buffers: all pass
    # torch.cuda.current_device() as a `device=` argument. Without CUDA the call raises;
    # answering "cpu" puts those buffers where every other tensor of the run lives.
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _patch_causal_mask() -> None:
    # transformer/utils.py:35 hard-codes device="cuda"; fused_softmax imports it by name.
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    utils.get_default_causal_mask = _cpu_causal_mask
    fused_softmax.get_default_causal_mask = _cpu_causal_mask


class CpuRNGStatesTracker:
    """Named RNG streams on the CPU generator, with megatron's tracker interface.

    Keeps megatron's semantics (a data-parallel stream, a per-TP-rank model-parallel stream
    for dropout inside TP regions, an expert stream), so dropout differs per TP rank on CPU
    exactly as it does on GPU.
    """

    def __init__(self, *args, **kwargs) -> None:
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        gen = torch.Generator().manual_seed(seed)
        self.states_[name] = gen.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _patch_rng_tracker() -> None:
    # tensor_parallel/random.py:235 CudaRNGStatesTracker.add calls torch.cuda.get_rng_state();
    # initialize_rng_tracker() builds the tracker by this module-level name.
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker  # type: ignore[misc]
    # torch.cuda.manual_seed is lazily queued without CUDA: harmless, but seed CPU too.
    orig = mrandom.model_parallel_cuda_manual_seed

    @functools.wraps(orig)
    def seeded(seed: int, *args, **kwargs):
        torch.manual_seed(seed)
        return orig(seed, *args, **kwargs)

    mrandom.model_parallel_cuda_manual_seed = seeded
    import megatron.core.tensor_parallel as tp_pkg

    tp_pkg.model_parallel_cuda_manual_seed = seeded


def _patch_optimizer() -> None:
    """Distributed optimizer / DDP places (filled in as they are exercised)."""


def _patch_pipeline() -> None:
    """Pipeline schedule places (filled in as they are exercised)."""
