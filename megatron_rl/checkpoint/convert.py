"""Offline converters: Hugging Face folder <-> megatron distributed checkpoint, one process each.

Why one process and no torchrun for ``hf-to-mcore``: a torch_dist checkpoint stores *global*
tensors (each rank writes its slice with offsets), and megatron reshards on load. A TP=1 PP=1
save and a TP=T PP=P save of the same weights hold the same global tensors, so the converter
builds the whole model once (TP=1, PP=1, on the ``meta`` device and then materialised without
random initialisation), copies the HF weights in, and saves. The result loads at any TP/PP
(``load_checkpoint`` on the training ranks); ``tp``/``pp`` only validate that the target
layout can split this model. The padded vocabulary rows are the one layout-dependent shape;
megatron marks the embedding and output layer ``allow_shape_mismatch`` and zero-fills rows
beyond the stored ones, which is what padding holds anyway. Memory: one copy of the model
plus megatron's save transients (measured 1.4x the weights' size on a 1.2 GB model; the
input safetensors are read through mmap, i.e. page cache, on top).

``mcore-to-hf`` never builds a model: it reads the checkpoint's tensor metadata, then each
layer's slice of the stacked ``decoder.layers.*`` tensors in turn, maps it to HF names and
hands it to a shard writer that writes a file as soon as it is full. Peak memory is one
layer plus one output shard (``max_shard_bytes``, default 5 GB), whatever the model size:
for a 14B bf16 model (28 GB) about 5.5 GB.

Output layout of ``hf-to-mcore`` (the same as a training step directory, minus optimizer/RNG)::

    out/megatron_rl_meta.json   format version, kind "weights", family, vocab, dims, file sizes
    out/hf/                     config.json, generation_config.json, tokenizer files
    out/model/                  megatron dist checkpoint (torch_dist)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from megatron_rl.checkpoint import dist, io
from megatron_rl.checkpoint.hf_files import (
    DEFAULT_MAX_SHARD_BYTES,
    SafetensorsShardWriter,
    copy_side_files,
)
from megatron_rl.errors import CheckpointError, UserError
from megatron_rl.models.hf_config import ModelDims, read_dims
from megatron_rl.weights import mapping as M

HF_SUBDIR, MODEL_SUBDIR = "hf", "model"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class _SingleProcess:
    """A world of one for megatron (gloo group + TP=1/PP=1 groups), torn down on exit if ours."""

    def __enter__(self):
        import torch.distributed as tdist

        from megatron_rl.config.parallel import ParallelConfig
        from megatron_rl.parallel.topology import Topology

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("The converters run in a single process: start them without torchrun "
                            "(the checkpoint they write loads at any TP/PP).")
        self.owned = not tdist.is_initialized()
        self.topo = Topology.initialize(ParallelConfig())
        return self.topo

    def __exit__(self, *exc):
        if self.owned:
            from megatron_rl.parallel.topology import Topology

            Topology.destroy()


def _hf_dtype(get) -> torch.dtype:
    t = get("model.embed_tokens.weight")
    if t.dtype not in _DTYPE_NAMES:
        raise CheckpointError(f"HF weights are {t.dtype}; megatron-rl converts float32, bfloat16 and float16.")
    return t.dtype


def _fresh_out_dir(out_dir: Path) -> Path:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"Output `{out_dir}` already exists and is not empty; choose a new path "
                        "or delete it first (the converters never overwrite).")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return io.tmp_dir_for(out_dir, io.new_nonce())


@contextlib.contextmanager
def _cleanup_on_error(tmp: Path):
    try:
        yield
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _finish(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        out_dir.rmdir()  # empty (checked up front)
    io.publish(tmp, out_dir)


def _build_full_model(dims: ModelDims, dtype: torch.dtype):
    """TP=1 PP=1 GPTModel with uninitialised (not random-initialised) CPU storage."""
    from megatron_rl.config.model import ModelConfig
    from megatron_rl.config.parallel import ParallelConfig
    from megatron_rl.models.builder import build_gpt_stage

    model_cfg = ModelConfig(dtype=_DTYPE_NAMES[dtype], transformer_impl="local")
    with torch.device("meta"):  # skip megatron's init: every value is overwritten below
        model = build_gpt_stage(dims, ParallelConfig(), model_cfg, pre_process=True, post_process=True)
    return model.to_empty(device="cpu"), model_cfg


def convert_hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1) -> Path:
    """Write ``out_dir`` (weights-only megatron-rl checkpoint) from an HF folder; see module doc."""
    from megatron_rl.actor.model import hf_tensor_reader
    from megatron_rl.config.parallel import ParallelConfig, check_layout
    from megatron_rl.models.builder import padded_vocab_size
    from megatron_rl.weights.live import load_hf_into_stage

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    dims = read_dims(hf_dir)
    check_layout(ParallelConfig(tp=tp, pp=pp, num_microbatches=pp), tp * pp, num_heads=dims.num_heads,
                 num_kv_heads=dims.num_kv_heads, num_layers=dims.num_layers)
    get = hf_tensor_reader(hf_dir)
    dtype = _hf_dtype(get)
    tmp = _fresh_out_dir(out_dir)
    with _cleanup_on_error(tmp), _SingleProcess():
        model, model_cfg = _build_full_model(dims, dtype)
        pv = padded_vocab_size(dims.vocab_size, model_cfg.make_vocab_size_divisible_by, 1)
        load_hf_into_stage(model, get, dims, tp_rank=0, tp=1, pp_rank=0, pp=1, padded_vocab=pv)
        dist.save(model.sharded_state_dict(), tmp / MODEL_SUBDIR)
        del model
        copy_side_files(hf_dir, tmp / HF_SUBDIR)
        io.write_meta(tmp, {
            "kind": "weights", "family": dims.family, "architecture": dims.architecture,
            "vocab_size": dims.vocab_size, "padded_vocab_size": pv, "dtype": _DTYPE_NAMES[dtype],
            "dims": dataclasses.asdict(dims), "validated_layouts": [{"tp": tp, "pp": pp}],
            "source": str(hf_dir.resolve()),
        })
        _finish(tmp, out_dir)
    return out_dir


# ----------------------------------------------------------------- mcore -> HF


def checkpoint_dims(ckpt: Path) -> ModelDims:
    if not (ckpt / HF_SUBDIR / "config.json").is_file():
        raise CheckpointError(
            f"`{ckpt}` has no `{HF_SUBDIR}/config.json`, so the model it holds is unknown. Checkpoints "
            "written by `convert hf-to-mcore` and by training (given the HF folder) carry it; copy the "
            f"model's config.json (and tokenizer) into `{ckpt / HF_SUBDIR}`."
        )
    return read_dims(ckpt / HF_SUBDIR)


def iter_checkpoint_hf(model_dir: Path, dims: ModelDims) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors of a megatron dist checkpoint, one layer in memory at a time, in HF order."""
    meta = dist.tensors_metadata(model_dir, "model weights")
    layered, global_keys = dist.layer_keys(meta)
    te = any(k.endswith("linear_qkv.layer_norm_weight") for k in layered)  # megatron's key names
    if not layered or "embedding.word_embeddings.weight" not in global_keys:
        raise CheckpointError(f"`{model_dir}` does not hold a GPT model's weights (no embedding "
                              "or no `decoder.layers.*` tensors).")
    stored_layers = meta[layered[0]].global_shape[0]
    if stored_layers != dims.num_layers:
        raise CheckpointError(f"`{model_dir}` stores {stored_layers} layers but its config.json says "
                              f"{dims.num_layers}: the config does not belong to these weights.")

    def emit(gname: str, full: torch.Tensor):
        rule, _ = M.find_rule(gname, dims, te)
        if rule.kind == M.VOCAB:
            full = full[: dims.vocab_size]  # drop megatron's padding rows
        yield from M.hf_from_mcore_full(gname, full, dims, te)

    head = dist.read_tensors(model_dir, meta, ["embedding.word_embeddings.weight"])
    yield from emit("embedding.word_embeddings.weight", head.pop("embedding.word_embeddings.weight"))
    for i in range(dims.num_layers):
        for key, full in dist.read_tensors(model_dir, meta, layered, layer=i).items():
            yield from emit(f"decoder.layers.{i}.{key[len('decoder.layers.'):]}", full)
    tail = ["decoder.final_layernorm.weight"]
    if not dims.tie_word_embeddings:  # tied: HF stores the embedding once
        tail.append("output_layer.weight")
    absent = [k for k in tail if k not in global_keys]
    if absent:
        raise CheckpointError(f"`{model_dir}` lacks {absent}: the checkpoint is incomplete or its "
                              "config.json (tie_word_embeddings) does not belong to these weights.")
    for key, full in dist.read_tensors(model_dir, meta, tail).items():
        yield from emit(key, full)


def convert_mcore_to_hf(ckpt_dir: str | Path, out_dir: str | Path,
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write an HF folder (config, safetensors shards + index, tokenizer) from a checkpoint:
    a converted one, a training step directory, or a training root (follows ``latest``)."""
    ckpt = io.resolve(ckpt_dir)
    meta = io.read_meta(ckpt)
    io.verify_files(ckpt, meta, subdirs=(HF_SUBDIR, MODEL_SUBDIR))
    dims = checkpoint_dims(ckpt)
    out_dir = Path(out_dir)
    tmp = _fresh_out_dir(out_dir)
    with _cleanup_on_error(tmp), _SingleProcess():
        writer = SafetensorsShardWriter(tmp, max_shard_bytes)
        names = set()
        for name, tensor in iter_checkpoint_hf(ckpt / MODEL_SUBDIR, dims):
            writer.add(name, tensor)
            names.add(name)
        missing = [n for n in M.hf_names(dims) if n not in names]
        if missing:
            raise CheckpointError(f"`{ckpt}` lacks weights for {missing[:3]} ({len(missing)} in all).")
        writer.close()
        copy_side_files(ckpt / HF_SUBDIR, tmp)
        _finish(tmp, out_dir)
    return out_dir
