"""Move weights between Hugging Face tensors and a live, sharded megatron model.

``load_hf_into_stage`` fills this rank's pipeline stage / TP shard from HF tensors fetched
one at a time (a safetensors directory is read lazily), so peak memory is the model shard
plus one full tensor. ``export_hf`` is the reverse: it yields ``(hf_name, tensor)`` gathered
across TP, one parameter at a time, and with ``all_stages=True`` also across PP stages
(every rank then sees the whole model, stage by stage). Weight sync and the
``mcore-to-hf`` converter both consume it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from megatron_rl.models.hf_config import ModelDims
from megatron_rl.weights import mapping as M


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers (their names carry a `module.` prefix)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _is_te(model: torch.nn.Module) -> bool:
    return any(n.endswith("linear_qkv.layer_norm_weight") for n, _ in model.named_parameters())


@torch.no_grad()
def load_hf_into_stage(
    model: torch.nn.Module,
    get_hf: Callable[[str], torch.Tensor],
    dims: ModelDims,
    *,
    tp_rank: int,
    tp: int,
    pp_rank: int,
    pp: int,
    padded_vocab: int,
) -> None:
    """Copy HF weights into this rank's shard of the model, in place."""
    model = unwrap(model)
    te = _is_te(model)
    offset = M.layer_offset(dims.num_layers, pp_rank, pp)
    for name, param in model.named_parameters():
        rule, full = M.mcore_full_from_hf(M.to_global_name(name, offset), get_hf, dims, te)
        local = M.shard(rule.kind, full, tp_rank, tp, padded_vocab)
        if local.shape != param.shape:
            raise ValueError(f"{name}: HF gives {tuple(local.shape)}, model holds {tuple(param.shape)}")
        param.copy_(local)


def _gather_tp(local: torch.Tensor, kind: str, group, tp: int, vocab: int) -> torch.Tensor:
    if tp == 1 or kind == M.REPLICATED:
        return M.unshard(kind, [local], vocab)
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=group)
    return M.unshard(kind, parts, vocab)


@torch.no_grad()
def export_stage(model: torch.nn.Module, dims: ModelDims, topo) -> Iterator[tuple[str, torch.Tensor]]:
    """This stage's parameters as HF tensors, gathered across TP (every TP rank yields them)."""
    model = unwrap(model)
    te = _is_te(model)
    offset = M.layer_offset(dims.num_layers, topo.pp_rank, topo.pp)
    for name, param in model.named_parameters():
        gname = M.to_global_name(name, offset)
        if gname == "output_layer.weight" and dims.tie_word_embeddings:
            continue  # the last stage's copy of the tied embedding: HF stores it once
        rule, _ = M.find_rule(gname, dims, te)
        full = _gather_tp(param.detach(), rule.kind, topo.tp_group, topo.tp, dims.vocab_size)
        yield from M.hf_from_mcore_full(gname, full, dims, te)


@torch.no_grad()
def export_hf(
    model: torch.nn.Module, dims: ModelDims, topo, *, all_stages: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors of the live model; with ``all_stages`` every rank receives every stage.

    Stages take turns: for each tensor stage s broadcasts (name, shape, dtype), then the
    tensor, over the pipeline group, so peak extra memory is one tensor.
    """
    if not all_stages or topo.pp == 1:
        yield from export_stage(model, dims, topo)
        return
    group = topo.pp_group
    for stage in range(topo.pp):
        src = dist.get_global_rank(group, stage)
        source = export_stage(model, dims, topo) if stage == topo.pp_rank else None
        while True:
            item = next(source, None) if source is not None else None
            head = [None if item is None else (item[0], tuple(item[1].shape), item[1].dtype)]
            dist.broadcast_object_list(head, src=src, group=group)
            if head[0] is None:
                break
            name, shape, dtype = head[0]
            buf = item[1].contiguous() if item is not None else torch.empty(shape, dtype=dtype, device=topo.device)
            dist.broadcast(buf, src=src, group=group)
            yield name, buf
