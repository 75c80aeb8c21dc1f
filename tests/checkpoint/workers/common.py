"""Shared pieces of the checkpoint workers: build a tiny actor, a plain train step, export.

The train step is deliberately minimal (one micro-batch, no pipeline schedule, so PP=1):
forward with labels -> per-token loss [B, S] -> mean -> backward -> finalize grads -> step.
The batch is drawn from torch's global CPU generator, so an exact resume also needs the
RNG state restored.
"""

from __future__ import annotations

import torch


def build(hf_dir, tp: int = 1, pp: int = 1, distributed_optimizer: bool = True, topo=None,
          load_hf: bool = True, vocab_divisor: int = 2):
    """(topo, dims, model, optimizer) of a tiny fp32 actor; HF weights loaded unless not
    ``load_hf`` (then megatron's random init: a resume must overwrite every value)."""
    from megatron_rl.actor.model import build_model, build_optimizer, load_hf_weights
    from megatron_rl.config.model import ModelConfig
    from megatron_rl.config.optimizer import OptimizerConfig
    from megatron_rl.config.parallel import ParallelConfig
    from megatron_rl.models.hf_config import read_dims
    from megatron_rl.parallel.topology import Topology

    par = ParallelConfig(tp=tp, pp=pp, num_microbatches=max(pp, 1), distributed_optimizer=distributed_optimizer)
    # Padded vocabulary 1032 at TP=1 and TP=2 (1031 is odd): megatron trains the padding rows
    # (their logits enter its softmax), and a layout that pads differently drops or zero-fills
    # them, so a bit-exact round trip across TP needs the same padded size everywhere.
    mc = ModelConfig(dtype="float32", make_vocab_size_divisible_by=vocab_divisor)
    topo = topo or Topology.initialize(par, seed=1234)
    dims = read_dims(hf_dir)
    model = build_model(dims, par, mc, topo)
    if load_hf:
        load_hf_weights(model, hf_dir, dims, par, mc, topo)
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3, weight_decay=0.1, clip_grad=0.0), par, torch.float32)
    return topo, dims, model, opt


def train_step(model, optimizer, dims, batch: int = 2, seq: int = 16) -> float:
    from megatron.core.distributed import finalize_model_grads

    tokens = torch.randint(0, dims.vocab_size, (batch, seq + 1))  # global generator: RNG matters
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    position_ids = torch.arange(seq).unsqueeze(0).expand(batch, -1)
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss = model[0](inputs, position_ids, attention_mask=None, labels=labels).mean()
    loss.backward()
    finalize_model_grads(model)
    ok, _, _ = optimizer.step()
    assert ok
    return loss.item()


def export(model, dims, topo) -> dict[str, torch.Tensor]:
    from megatron_rl.weights.live import export_hf

    return {k: v.clone() for k, v in export_hf(model[0], dims, topo, all_stages=True)}
