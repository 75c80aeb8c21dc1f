"""The live actor as a Hugging Face model directory (collective: every rank calls it).

Used at the end of a run (``<output_dir>/hf``) and at the start when the model comes from
a Megatron checkpoint, so the rollout servers have HF weights to boot from. Rank 0 writes
safetensors shards as the tensors stream out of ``weights.live.export_hf`` (one tensor in
flight, TP shards gathered, PP stages broadcast), plus the source's config and tokenizer,
into a temporary directory renamed into place at the end.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from megatron_rl.checkpoint.hf_files import SafetensorsShardWriter, copy_side_files
from megatron_rl.models.hf_config import ModelDims
from megatron_rl.parallel.topology import Topology
from megatron_rl.trainer.dist_utils import on_rank0
from megatron_rl.weights.live import export_hf


def export_hf_dir(model: torch.nn.Module, dims: ModelDims, topo: Topology, out_dir: Path, side_files_from: Path) -> Path:
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    writer = None
    if topo.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        writer = SafetensorsShardWriter(tmp)
    for name, tensor in export_hf(model, dims, topo, all_stages=True):
        if writer is not None:
            writer.add(name, tensor.detach().to("cpu").clone())

    def finish() -> str:
        assert writer is not None
        writer.close()
        copy_side_files(side_files_from, tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
        return str(out_dir)

    return Path(on_rank0(finish))
