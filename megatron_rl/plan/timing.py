"""Step-time estimate: rollout decode from memory bandwidth, training from FLOPs at a stated
MFU, weight sync from link bandwidth. Estimates to size a cluster, not measurements."""

from __future__ import annotations

from megatron_rl.plan.memory import kv_bytes_per_token, server_weights_bytes
from megatron_rl.plan.models import ModelDims

DECODE_BW_EFFICIENCY = 0.6
"""Share of HBM bandwidth a decode step reaches (weights + KV reads; SGLang on H100 ~50-70%)."""
TRAIN_MFU = 0.35
"""Model FLOPs utilisation assumed for the Megatron actor at long context."""


def decode_step_s(m: ModelDims, server_tp: int, batch: int, context: float, bandwidth_gbs: float) -> float:
    """One decode step of ``batch`` sequences of mean length ``context``: every step reads the
    server's weights shard and the batch's KV cache once, at DECODE_BW_EFFICIENCY of HBM speed."""
    read = server_weights_bytes(m, server_tp) + batch * context * kv_bytes_per_token(m, server_tp)
    return read / (bandwidth_gbs * 1e9 * DECODE_BW_EFFICIENCY)


def train_flops(m: ModelDims, tokens: float, mean_context: float, *, recompute: str, extra_forwards: int) -> float:
    """FLOPs of one optimizer step's worth of tokens: 6 * params * tokens (forward + backward
    GEMMs) plus causal attention 6 * layers * h_q * context per token; full recompute adds one
    forward (x 8/6); each extra forward-only pass (old-policy / reference log-probs) adds 2/6."""
    per_token = 6.0 * m.params + 6.0 * m.layers * m.heads * m.hd * mean_context
    factor = (8.0 if recompute == "full" else 6.0) / 6.0 + extra_forwards * 2.0 / 6.0
    return per_token * tokens * factor


def sync_s(m: ModelDims, link_gbs: float) -> float:
    """Weight sync: the bf16 weights (2 * params bytes) cross one link at ``link_gbs`` GB/s."""
    return 2.0 * m.params / (link_gbs * 1e9)
