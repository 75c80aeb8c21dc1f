"""Peak memory of a training phase, logged beside its time (``mem/*`` metrics).

On CUDA: ``torch.cuda.max_memory_allocated`` over the phase (peak stats reset at its start),
which is what the planner's per-GPU figure sizes. On CPU there is no allocator counter, so
the phase's transient peak is read from the kernel: this process's peak RSS (``VmHWM``, reset
through ``/proc/self/clear_refs``) minus its RSS when the phase began. Tensors that outlive
the phase (weights, gradients, optimizer state) are in the RSS at entry, so the CPU figure is
the phase's own working set: activations, logits, temporaries. Where neither is available the
metrics are left out rather than guessed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

GIB = 1024**3


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    """Set VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """Give glibc's free heap pages back to the kernel, so RSS counts live memory only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def phase_peak(name: str, out: dict[str, float], device: torch.device | None = None) -> Iterator[None]:
    """Measure the phase's peak into ``out``: ``mem/{name}_peak_gib`` (CUDA: allocated bytes at
    the peak) or ``mem/{name}_rss_rise_gib`` and ``mem/rss_gib`` (CPU: transient rise, RSS at entry)."""
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        yield
        out[f"mem/{name}_peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        return
    _trim_heap()  # freed-but-kept heap pages would hide the phase's reuse of them
    base = _status_bytes("VmRSS:")
    ok = base is not None and _reset_rss_peak()
    yield
    peak = _status_bytes("VmHWM:") if ok else None
    if peak is not None and base is not None:
        out[f"mem/{name}_rss_rise_gib"] = max(peak - base, 0) / GIB
        out["mem/rss_gib"] = base / GIB


def cpu_peak_supported() -> bool:
    """Whether ``phase_peak`` can measure on CPU in this process."""
    return os.access("/proc/self/clear_refs", os.W_OK) and _status_bytes("VmHWM:") is not None


def state_bytes(model_chunks, optimizer) -> int:
    """Bytes of the tensors a training step keeps across steps on this rank: parameters, their
    gradient buffers (megatron's ``main_grad``) and the optimizer's state, each storage counted
    once (megatron's buffers hold many parameters as views)."""
    seen: dict[int, int] = {}

    def add(t) -> None:
        if isinstance(t, torch.Tensor) and t.numel():
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()

    for chunk in model_chunks:
        for p in chunk.parameters():
            add(p)
            add(getattr(p, "main_grad", None))
            add(p.grad)
    stack = [optimizer]
    while stack:  # megatron wraps torch optimizers (ChainedOptimizer -> MixedPrecision/Distributed -> Adam)
        opt = stack.pop()
        stack.extend(getattr(opt, "chained_optimizers", []) or [])
        inner = getattr(opt, "optimizer", None)
        if inner is not None and inner is not opt:
            stack.append(inner)
        for state in getattr(opt, "state", {}).values() if isinstance(getattr(opt, "state", None), dict) else []:
            for v in state.values() if isinstance(state, dict) else []:
                add(v)
        for group in getattr(opt, "param_groups", []) or []:
            for p in group.get("params", []):
                add(p)
    return sum(seen.values())
