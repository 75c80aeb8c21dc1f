"""Worker: load converted (TP=1-saved) checkpoints at TP=2 x PP=2 and export them to HF.

Usage (torchrun, 4 processes): export_tp2pp2.py ROOT FAMILY...
For each family, ROOT/mcore_<family> (written by ``convert_hf_to_mcore``) is loaded into a
randomly initialised TP=2 PP=2 model (vocabulary padded to 1280 here, 1152 in the file), then
``export_hf`` gathers it on every rank and rank 0 writes ROOT/back_<family> as an HF folder
with small shards (so the index is exercised).
"""

import sys
from pathlib import Path


def main() -> None:
    from common import build

    from megatron_rl.checkpoint.hf_files import SafetensorsShardWriter, copy_side_files
    from megatron_rl.checkpoint.state import load_checkpoint
    from megatron_rl.weights.live import export_hf

    root, families = Path(sys.argv[1]), sys.argv[2:]
    topo = None
    for fam in families:
        ckpt = root / f"mcore_{fam}"
        topo, dims, model, _ = build(ckpt / "hf", tp=2, pp=2, topo=topo, load_hf=False, vocab_divisor=128)
        assert load_checkpoint(ckpt, model) == {}
        writer = SafetensorsShardWriter(root / f"back_{fam}", max_shard_bytes=200_000) if topo.rank == 0 else None
        for name, tensor in export_hf(model[0], dims, topo, all_stages=True):
            if writer is not None:
                writer.add(name, tensor.clone())
        if writer is not None:
            writer.close()
            copy_side_files(ckpt / "hf", root / f"back_{fam}")


if __name__ == "__main__":
    main()
