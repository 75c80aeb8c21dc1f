"""Hugging Face <-> megatron-core weight names and tensor-parallel layouts, table driven.

One table (``_LAYER_RULES`` + ``_GLOBAL_RULES``) serves Qwen2, Llama and Qwen3, and both
megatron layer specs: Transformer Engine fuses the pre-attention and pre-MLP norms into the
following linear (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``) where
the local spec keeps ``input_layernorm`` / ``pre_mlp_layernorm``.

Three layouts of a megatron tensor are distinguished:
- *HF*: the tensors of the Hugging Face checkpoint (q, k, v separate; gate, up separate).
- *full*: what a TP=1 megatron model holds (qkv interleaved per query group; fc1 = [gate; up];
  vocabulary padded).
- *shard*: what TP rank r holds. ``shard``/``unshard`` convert full <-> shards exactly.
All conversions are pure functions on tensors, so they are tested without processes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from megatron_rl.models.hf_config import ModelDims

# Tensor-parallel layout kinds.
REPLICATED, COLUMN, ROW, VOCAB, GATE_UP = "replicated", "column", "row", "vocab", "gate_up"


@dataclass(frozen=True)
class Rule:
    mcore: str
    """megatron name; ``{i}`` is the layer index."""
    hf: tuple[str, ...]
    """HF names merged into it (``{i}``: layer index)."""
    kind: str
    """TP layout: replicated | column | row | vocab | gate_up."""
    merge: str = "single"
    """How HF tensors merge: single | qkv | gate_up."""
    when: Callable[[ModelDims, bool], bool] = lambda dims, te: True
    """Whether the rule exists for a model (dims) and spec (te = Transformer Engine)."""


_A = "decoder.layers.{i}.self_attention"
_M = "decoder.layers.{i}.mlp"
_HA = "model.layers.{i}.self_attn"
_HM = "model.layers.{i}.mlp"

_LAYER_RULES = (
    Rule("decoder.layers.{i}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",),
         REPLICATED, when=lambda d, te: not te),
    Rule(f"{_A}.linear_qkv.layer_norm_weight", ("model.layers.{i}.input_layernorm.weight",),
         REPLICATED, when=lambda d, te: te),
    Rule(f"{_A}.linear_qkv.weight", (f"{_HA}.q_proj.weight", f"{_HA}.k_proj.weight", f"{_HA}.v_proj.weight"),
         COLUMN, merge="qkv"),
    Rule(f"{_A}.linear_qkv.bias", (f"{_HA}.q_proj.bias", f"{_HA}.k_proj.bias", f"{_HA}.v_proj.bias"),
         COLUMN, merge="qkv", when=lambda d, te: d.qkv_bias),
    Rule(f"{_A}.q_layernorm.weight", (f"{_HA}.q_norm.weight",), REPLICATED, when=lambda d, te: d.qk_norm),
    Rule(f"{_A}.k_layernorm.weight", (f"{_HA}.k_norm.weight",), REPLICATED, when=lambda d, te: d.qk_norm),
    Rule(f"{_A}.linear_proj.weight", (f"{_HA}.o_proj.weight",), ROW),
    Rule("decoder.layers.{i}.pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",),
         REPLICATED, when=lambda d, te: not te),
    Rule(f"{_M}.linear_fc1.layer_norm_weight", ("model.layers.{i}.post_attention_layernorm.weight",),
         REPLICATED, when=lambda d, te: te),
    Rule(f"{_M}.linear_fc1.weight", (f"{_HM}.gate_proj.weight", f"{_HM}.up_proj.weight"), GATE_UP, merge="gate_up"),
    Rule(f"{_M}.linear_fc2.weight", (f"{_HM}.down_proj.weight",), ROW),
)

_GLOBAL_RULES = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), REPLICATED),
    Rule("output_layer.weight", ("lm_head.weight",), VOCAB, when=lambda d, te: not d.tie_word_embeddings),
)

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def rules_for(dims: ModelDims, te: bool) -> tuple[list[Rule], list[Rule]]:
    """(per-layer rules, global rules) that exist for this model and spec."""
    return ([r for r in _LAYER_RULES if r.when(dims, te)], [r for r in _GLOBAL_RULES if r.when(dims, te)])


def hf_names(dims: ModelDims) -> list[str]:
    """Every HF tensor name of the model, in checkpoint order (used to check completeness)."""
    layer_rules, global_rules = rules_for(dims, te=False)
    names = [global_rules[0].hf[0]]
    for i in range(dims.num_layers):
        names += [n.format(i=i) for r in layer_rules for n in r.hf]
    names += [n for r in global_rules[1:] for n in r.hf]
    return names


def find_rule(mcore_name: str, dims: ModelDims, te: bool) -> tuple[Rule, int | None]:
    """The rule for a (global-index) megatron name, and its layer index (None for globals)."""
    layer_rules, global_rules = rules_for(dims, te)
    m = _LAYER_RE.match(mcore_name)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        for r in layer_rules:
            if r.mcore.split("{i}.", 1)[1] == rest:
                return r, i
    for r in global_rules:
        if r.mcore == mcore_name:
            return r, None
    raise KeyError(f"no HF mapping for megatron parameter `{mcore_name}` ({dims.family})")


# ----------------------------------------------------------------- HF <-> full megatron


def merge_hf(rule: Rule, tensors: list[torch.Tensor], dims: ModelDims) -> torch.Tensor:
    """HF tensors -> the full (TP=1) megatron tensor."""
    if rule.merge == "single":
        return tensors[0]
    if rule.merge == "gate_up":
        return torch.cat(tensors, dim=0)
    q, k, v = tensors  # qkv: interleave per query group: [q heads of group g; k_g; v_g]
    g, hd = dims.num_kv_heads, dims.head_dim
    per = dims.num_heads // g
    tail = q.shape[1:]
    q = q.reshape(g, per * hd, *tail)
    k = k.reshape(g, hd, *tail)
    v = v.reshape(g, hd, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def split_hf(rule: Rule, full: torch.Tensor, dims: ModelDims) -> list[torch.Tensor]:
    """The full megatron tensor -> HF tensors (inverse of ``merge_hf``)."""
    if rule.merge == "single":
        return [full]
    if rule.merge == "gate_up":
        return list(full.chunk(2, dim=0))
    g, hd = dims.num_kv_heads, dims.head_dim
    per = dims.num_heads // g
    tail = full.shape[1:]
    grouped = full.reshape(g, (per + 2) * hd, *tail)
    q, k, v = grouped.split([per * hd, hd, hd], dim=1)
    return [q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)]


# ----------------------------------------------------------------- full <-> TP shards


def shard(kind: str, full: torch.Tensor, tp_rank: int, tp: int, padded_vocab: int) -> torch.Tensor:
    """TP rank ``tp_rank``'s part of the full tensor (contiguous copy)."""
    if kind == REPLICATED:
        return full
    if kind == VOCAB:
        if full.shape[0] < padded_vocab:  # zero rows: padded ids never get probability mass
            pad = full.new_zeros(padded_vocab - full.shape[0], *full.shape[1:])
            full = torch.cat([full, pad], dim=0)
        return full.chunk(tp, dim=0)[tp_rank].contiguous()
    if kind == COLUMN:
        return full.chunk(tp, dim=0)[tp_rank].contiguous()
    if kind == ROW:
        return full.chunk(tp, dim=1)[tp_rank].contiguous()
    if kind == GATE_UP:  # SwiGLU: gate and up are split separately, then stacked per rank
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, 0)[tp_rank], up.chunk(tp, 0)[tp_rank]], dim=0)
    raise ValueError(kind)


def unshard(kind: str, shards: list[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """Inverse of ``shard`` over all ranks' parts (vocabulary padding removed)."""
    if kind == REPLICATED:
        return shards[0]
    if kind == VOCAB:
        return torch.cat(shards, dim=0)[:vocab_size]
    if kind == COLUMN:
        return torch.cat(shards, dim=0)
    if kind == ROW:
        return torch.cat(shards, dim=1)
    if kind == GATE_UP:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    raise ValueError(kind)


# ----------------------------------------------------------------- name helpers


def layer_offset(num_layers: int, pp_rank: int, pp: int) -> int:
    """First global layer index of a pipeline stage (uniform split, as megatron builds)."""
    return pp_rank * (num_layers // pp)


def to_global_name(local_name: str, offset: int) -> str:
    m = _LAYER_RE.match(local_name)
    return f"decoder.layers.{int(m.group(1)) + offset}.{m.group(2)}" if m else local_name


def to_local_name(global_name: str, offset: int) -> str:
    m = _LAYER_RE.match(global_name)
    return f"decoder.layers.{int(m.group(1)) - offset}.{m.group(2)}" if m else global_name


def hf_tensors_for(rule: Rule, layer: int | None) -> list[str]:
    return [n.format(i=layer) for n in rule.hf]


def mcore_full_from_hf(
    mcore_global_name: str, get_hf: Callable[[str], torch.Tensor], dims: ModelDims, te: bool
) -> tuple[Rule, torch.Tensor]:
    """Build one full megatron tensor from HF tensors fetched lazily by ``get_hf(name)``.

    With tied embeddings the last stage's ``output_layer.weight`` is the embedding.
    """
    if mcore_global_name == "output_layer.weight" and dims.tie_word_embeddings:
        return Rule("output_layer.weight", ("model.embed_tokens.weight",), VOCAB), get_hf("model.embed_tokens.weight")
    rule, layer = find_rule(mcore_global_name, dims, te)
    return rule, merge_hf(rule, [get_hf(n) for n in hf_tensors_for(rule, layer)], dims)


def hf_from_mcore_full(
    mcore_global_name: str, full: torch.Tensor, dims: ModelDims, te: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """Split one full megatron tensor into its HF tensors."""
    rule, layer = find_rule(mcore_global_name, dims, te)
    yield from zip(hf_tensors_for(rule, layer), split_hf(rule, full, dims))
