"""Worker: train, save, keep training; then resume into fresh objects and train the same step.

Usage (torchrun, TP = world size): resume.py HF_DIR CKPT_ROOT OUT.pt
Run A: step 1, save (keep_last=2), step 2, save (also with the fully_reshardable optimizer
format into CKPT_ROOT-full, for reshard.py), record the weights, step 3 (record loss and
weights), save. Run B: fresh model + optimizer with megatron's random init and scrambled RNG,
load step 2, train one step. Run C (for reshard.py): run A's steps 1-3 with the
non-distributed optimizer, saving step 2 into CKPT_ROOT-nd. Rank 0 writes the records to
OUT.pt; the test compares.
"""

import random
import sys

import torch


def main() -> None:
    from common import build, export, train_step

    from megatron_rl.checkpoint.state import load_checkpoint, save_checkpoint

    hf_dir, root, out = sys.argv[1:4]
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 2
    topo, dims, model, opt = build(hf_dir, tp=world)
    rec = {"losses_a": []}
    for step in (1, 2, 3):
        rec["losses_a"].append(train_step(model, opt, dims))
        extra = {"data_pos": 2 * step, "note": "a"}
        if step == 2:
            rec["weights_2"] = export(model, dims, topo)
            save_checkpoint(f"{root}-full", step, model, opt, extra=extra, keep_last=0, hf_dir=hf_dir,
                            optimizer_format="fully_reshardable")
        save_checkpoint(root, step, model, opt, extra=extra, keep_last=2, hf_dir=hf_dir)
    rec["weights_a3"] = export(model, dims, topo)

    del model, opt
    torch.manual_seed(999)  # prove the RNG streams come from the checkpoint
    random.seed(999)
    _, _, model, opt = build(hf_dir, tp=world, topo=topo, load_hf=False)
    rec["extra_b"] = load_checkpoint(f"{root}/step_00000002", model, opt)
    rec["weights_b2"] = export(model, dims, topo)
    rec["loss_b3"] = train_step(model, opt, dims)
    rec["weights_b3"] = export(model, dims, topo)
    rec["extra_latest"] = load_checkpoint(root, model, None)  # `latest` -> step 3, weights only
    rec["weights_latest"] = export(model, dims, topo)

    torch.manual_seed(4321)
    _, _, model, opt = build(hf_dir, tp=world, topo=topo, distributed_optimizer=False)
    rec["nd_losses"] = [train_step(model, opt, dims) for _ in range(2)]
    save_checkpoint(f"{root}-nd", 2, model, opt, extra={}, keep_last=0, hf_dir=hf_dir)
    rec["nd_weights_2"] = export(model, dims, topo)
    rec["nd_losses"].append(train_step(model, opt, dims))
    rec["nd_weights_3"] = export(model, dims, topo)
    if topo.rank == 0:
        torch.save(rec, out)


if __name__ == "__main__":
    main()
