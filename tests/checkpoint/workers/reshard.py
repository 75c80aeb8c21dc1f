"""Worker: TP=2 checkpoints resumed at other layouts, and back, on 2 processes.

Usage (torchrun, 2 processes): reshard.py HF_DIR CKPT_ROOT OUT.pt   (after resume.py)
First, CKPT_ROOT/step_2 (dp_reshardable distributed optimizer) at PP=2: its weights load, its
optimizer state is refused. Then for two checkpoints of step 2, CKPT_ROOT-full (distributed
optimizer, fully_reshardable) and CKPT_ROOT-nd (non-distributed optimizer), the chain
  TP=2 save -> load at PP=2, save -> load at TP=1 x DP=2, save -> load at TP=2
with the optimizer each time, exporting the weights at every stop. At the end, with the
original step-2 RNG streams restored by hand (RNG is only restored at the saved layout), one
more step must equal the uninterrupted run's step 3 (resume.py's records).
"""

import sys
from pathlib import Path

import torch

CHAINS = {"full": True, "nd": False}  # checkpoint suffix: distributed optimizer?


def relayout(tp: int, pp: int):
    from megatron.core import parallel_state as ps

    from megatron_rl.config.parallel import ParallelConfig
    from megatron_rl.parallel.topology import Topology

    ps.destroy_model_parallel()
    return Topology.initialize(ParallelConfig(tp=tp, pp=pp, num_microbatches=pp), seed=1234)


def main() -> None:
    from common import build, export, train_step

    from megatron_rl.checkpoint import rng
    from megatron_rl.checkpoint.state import load_checkpoint, save_checkpoint
    from megatron_rl.errors import CheckpointError

    hf_dir, root, out = sys.argv[1:4]
    rec = {}
    topo, dims, model, opt = build(hf_dir, pp=2, load_hf=False)
    rec["extra_pp2"] = load_checkpoint(f"{root}/step_00000002", model, opt, load_optimizer=False)
    rec["weights_pp2_weights_only"] = export(model, dims, topo)
    try:
        load_checkpoint(f"{root}/step_00000002", model, opt)
        rec["dp_reshardable_error"] = None
    except CheckpointError as e:
        rec["dp_reshardable_error"] = str(e)

    stops = [("pp2", 1, 2, "", "-pp2"), ("dp2", 1, 1, "-pp2", "-dp2"), ("back", 2, 1, "-dp2", None)]
    for stop, tp, pp, src, dst in stops:
        topo = topo if stop == "pp2" else relayout(tp=tp, pp=pp)
        for name, distopt in CHAINS.items():
            _, _, model, opt = build(hf_dir, tp=tp, pp=pp, topo=topo, load_hf=False, distributed_optimizer=distopt)
            load_checkpoint(f"{root}-{name}{src}", model, opt)
            rec[f"{name}_weights_{stop}2"] = export(model, dims, topo)
            if dst is not None:
                save_checkpoint(f"{root}-{name}{dst}", 2, model, opt, extra={}, keep_last=0,
                                optimizer_format="fully_reshardable")
            else:
                rng.restore(rng.load(Path(f"{root}-{name}") / "step_00000002" / "rng" / f"rank_{topo.rank:05d}.pt"))
                rec[f"{name}_loss_back3"] = train_step(model, opt, dims)
                rec[f"{name}_weights_back3"] = export(model, dims, topo)
    if topo.rank == 0:
        torch.save(rec, out)


if __name__ == "__main__":
    main()
