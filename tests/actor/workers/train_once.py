"""Worker: one step of the actor at a given layout; rank 0 saves loss, log-probs, grads.

Usage (under torchrun): train_once.py HF_DIR OUT.pt TP PP CP SP DISTOPT [FUSED]
FUSED=1 trains the same loss through the fused loss-in-forward kernel (TokenSeparableLoss).
The optimizer is Adam with lr = eps = 1e4: on its first step the update is
-lr * g / (|g| + eps) = -g * (1 - |g|/1e4), i.e. minus the gradient to ~1e-6 relative (the
distributed optimizer only supports Adam, so SGD cannot serve every layout).
"""

import sys

import torch


def main() -> None:
    from megatron_rl.actor.actor import Actor, TokenSeparableLoss
    from megatron_rl.actor.forward import MicroBatch
    from megatron_rl.actor.model import build_model, build_optimizer, load_hf_weights
    from megatron_rl.algos.aggregation import aggregate, build_normalizer
    from megatron_rl.algos.token_loss import aggregation_weights
    from megatron_rl.config.model import ModelConfig
    from megatron_rl.config.optimizer import OptimizerConfig
    from megatron_rl.config.parallel import ParallelConfig
    from megatron_rl.models.hf_config import read_dims
    from megatron_rl.parallel.topology import Topology
    from megatron_rl.weights.live import export_hf

    hf_dir, out = sys.argv[1], sys.argv[2]
    tp, pp, cp, sp, distopt = map(int, sys.argv[3:8])
    fused = len(sys.argv) > 8 and sys.argv[8] == "1"
    par = ParallelConfig(tp=tp, pp=pp, cp=cp, sp=bool(sp), num_microbatches=4, distributed_optimizer=bool(distopt))
    mc = ModelConfig(dtype="float32")
    topo = Topology.initialize(par)
    dims = read_dims(hf_dir)
    model = build_model(dims, par, mc, topo)
    load_hf_weights(model, hf_dir, dims, par, mc, topo)
    before = {k: v.clone() for k, v in export_hf(model[0], dims, topo, all_stages=True)}
    opt = build_optimizer(model, OptimizerConfig(lr=1e4, adam_eps=1e4, weight_decay=0.0, clip_grad=0.0), par, torch.float32)
    actor = Actor(model, dims, topo, opt)
    g = torch.Generator().manual_seed(0)
    mbs = [MicroBatch(tokens_BS=torch.randint(0, dims.vocab_size, (2, 16), generator=g),
                      loss_mask_BS=(torch.rand(2, 16, generator=g) > 0.3).float()) for _ in range(8)]
    mbs[0].tokens_BS[0, :2] = torch.tensor([0, dims.vocab_size - 1])  # first/last vocabulary ids
    norm = build_normalizer([m.loss_mask_BS for m in mbs], max_len=16)

    def loss_fn(logp, ent, mb):
        # Per-sequence token means (a sequence-level term: under CP it needs whole sequences)
        # minus an entropy bonus (exercises the entropy gradient through every layout).
        nll = aggregate(-logp, mb.loss_mask_BS, "seq-mean-token-mean", norm)
        bonus = aggregate(ent, mb.loss_mask_BS, "token-mean", norm)
        return nll - 0.1 * bonus, {}

    logps = [o["logp"] for o in actor.logprobs(mbs, temperature=1.0)]
    def token_loss(mb):  # loss_fn as per-token terms over the flattened [B * S] tokens
        w_seq = aggregation_weights(mb.loss_mask_BS, "seq-mean-token-mean", norm).reshape(-1)
        w_tok = aggregation_weights(mb.loss_mask_BS, "token-mean", norm).reshape(-1)
        return lambda lp, ent, rows: -lp * w_seq[rows] - 0.1 * ent * w_tok[rows]

    step_loss = TokenSeparableLoss(token_loss, loss_fn) if fused else loss_fn
    res = actor.train_step(mbs[topo.dp_rank::topo.dp], step_loss, temperature=1.0, with_entropy=True)
    after = dict(export_hf(model[0], dims, topo, all_stages=True))
    if topo.rank == 0:
        grads = {k: before[k] - after[k] for k in before}
        torch.save({"loss": res.metrics["loss"], "logp": logps, "grads": grads}, out)
    Topology.destroy()


if __name__ == "__main__":
    main()
