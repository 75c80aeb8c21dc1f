"""RMSNorm for the local (non-Transformer-Engine) layer specs.

megatron-core's ``WrappedTorchNorm`` refuses sequence parallelism. Under SP the norm sees
a sequence shard, so its weight gradient is partial per TP rank: tagging the weight with
``sequence_parallel`` makes megatron's ``finalize_model_grads`` sum it across the TP group.
This is a spec choice (a module we pass in the layer spec), not a patch of megatron-core.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with megatron's constructor signature and SP tagging."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_: object) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        # qk norms (hidden_size = head_dim) run after the column-parallel QKV, on the full
        # sequence: megatron reduces those by name (q_layernorm/k_layernorm), not by this tag.
        self.weight.sequence_parallel = bool(config.sequence_parallel)
