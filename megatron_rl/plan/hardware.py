"""GPU table: memory, memory bandwidth and dense bf16 throughput (public datasheet figures)."""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class GpuSpec:
    name: str
    memory_gib: float
    """Memory the driver reports as total (nvidia-smi), in GiB."""
    bandwidth_gbs: float
    """HBM bandwidth, GB/s (datasheet)."""
    bf16_tflops: float
    """Dense bf16 tensor-core peak, TFLOP/s (datasheet, without sparsity)."""
    link_gbs: float
    """Per-GPU inter-node bandwidth for the weight broadcast, GB/s (one 400 Gb/s NIC per GPU)."""


GPUS: dict[str, GpuSpec] = {
    "h100-80gb": GpuSpec("h100-80gb", 79.6, 3350.0, 989.0, 50.0),
    "h200-141gb": GpuSpec("h200-141gb", 140.4, 4800.0, 989.0, 50.0),
    "a100-80gb": GpuSpec("a100-80gb", 80.0, 2039.0, 312.0, 25.0),
}
