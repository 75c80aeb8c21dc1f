"""Worker: a TP=2 checkpoint resumed at other layouts, and back, on 2 processes.

Usage (torchrun, 2 processes): reshard.py HF_DIR CKPT_ROOT OUT.pt   (after resume.py)
1. PP=2: load CKPT_ROOT/step_2 (dp_reshardable optimizer) weights only, export; loading its
   optimizer must be refused. Load CKPT_ROOT-full/step_2 (fully_reshardable) with the
   optimizer, export, save to CKPT_ROOT-pp2.
2. TP=1 (DP=2): load CKPT_ROOT-pp2 with the optimizer, export, save to CKPT_ROOT-dp2.
3. TP=2 again: load CKPT_ROOT-dp2 with the optimizer, restore the original step-2 RNG
   streams (RNG is only restored at the saved layout), train one step: must equal the
   uninterrupted run's step 3 (resume.py's `weights_a3`).
"""

import sys

import torch


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
    _, _, model, opt = build(hf_dir, pp=2, topo=topo, load_hf=False)
    load_checkpoint(f"{root}-full/step_00000002", model, opt)
    rec["weights_pp2"] = export(model, dims, topo)
    save_checkpoint(f"{root}-pp2", 2, model, opt, extra={}, keep_last=0, hf_dir=hf_dir,
                    optimizer_format="fully_reshardable")

    topo = relayout(tp=1, pp=1)
    _, _, model, opt = build(hf_dir, topo=topo, load_hf=False)
    load_checkpoint(f"{root}-pp2", model, opt)
    rec["weights_dp2"] = export(model, dims, topo)
    save_checkpoint(f"{root}-dp2", 2, model, opt, extra={}, keep_last=0, hf_dir=hf_dir,
                    optimizer_format="fully_reshardable")

    topo = relayout(tp=2, pp=1)
    _, _, model, opt = build(hf_dir, tp=2, topo=topo, load_hf=False)
    load_checkpoint(f"{root}-dp2", model, opt)
    rec["weights_back2"] = export(model, dims, topo)
    rng.restore(rng.load(__import__("pathlib").Path(root) / "step_00000002" / "rng" / f"rank_{topo.rank:05d}.pt"))
    rec["rng_probe"] = torch.get_rng_state()
    rec["loss_back3"] = train_step(model, opt, dims)
    rec["weights_back3"] = export(model, dims, topo)
    if topo.rank == 0:
        torch.save(rec, out)


if __name__ == "__main__":
    main()
