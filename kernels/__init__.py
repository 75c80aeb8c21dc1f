"""Fused kernels (Triton) and their torch paths, imported as ``megatron_rl.kernels``."""
