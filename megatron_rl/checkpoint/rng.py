"""Every random stream a rank draws from, captured and restored for exact resume.

Python's ``random``, NumPy's global generator, torch's CPU generator, every CUDA device's
generator (when present) and megatron's named RNG tracker streams (the per-TP-rank
model-parallel stream that dropout inside TP regions uses, the data-parallel and expert
streams). Each rank saves its own file; the streams only mean something on the same rank of
the same layout, so ``restore`` is for same-layout resumes (``state.load_checkpoint`` says
what it does otherwise).

The file holds plain lists, ints and tensors only, so it loads with ``weights_only=True``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _tracker():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return get_cuda_rng_tracker()


def capture() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "tracker": {},
    }
    tracker = _tracker()
    if tracker.is_initialized():
        state["tracker"] = {k: v.clone() for k, v in tracker.get_states().items()}
    return state


def restore(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state["tracker"]:
        _tracker().set_states({k: v.clone() for k, v in state["tracker"].items()})


def save(path: Path) -> None:
    torch.save(capture(), path)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)
