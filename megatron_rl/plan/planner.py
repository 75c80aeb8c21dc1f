"""Put the formulas together for one recipe on one cluster, and search for the smallest change
that makes a recipe fit (by re-planning candidate layouts, not by rules of thumb)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from megatron_rl.config.run import RunConfig
from megatron_rl.errors import ConfigError
from megatron_rl.plan import memory as mem
from megatron_rl.plan import timing
from megatron_rl.plan.hardware import GIB, GPUS, GpuSpec
from megatron_rl.plan.models import ModelDims

OVERHEAD_GIB = 3.0
"""Per GPU, outside the formulas: CUDA context, NCCL buffers, allocator fragmentation."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Layout:
    """The knobs the fix search turns (everything else comes from the recipe)."""
    gpus: int
    tp: int
    pp: int
    cp: int
    sp: bool
    recompute: str
    tokens_per_microbatch: int
    distributed_optimizer: bool

    def dp(self, train_gpus: int) -> int:
        return train_gpus // (self.tp * self.pp * self.cp)


@dataclass
class Plan:
    gpu: str
    gpus: int
    layout: dict
    fits: bool
    per_gpu_gib: float
    gpu_memory_gib: float
    breakdown: dict
    """GiB per GPU, by part (training and rollout phases)."""
    rollout: dict
    time: dict
    notes: list[str] = field(default_factory=list)
    fix: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _layout_from(cfg: RunConfig, gpus: int | None) -> Layout:
    par, tr = cfg.parallel, cfg.train
    sample = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    tokens = max(tr.max_tokens_per_microbatch, sample) if tr.max_tokens_per_microbatch else tr.micro_batch_size * sample
    rollout_gpus = 0 if cfg.rollout.colocate else cfg.rollout.num_servers * cfg.rollout.tp_size
    return Layout(gpus=gpus or par.world_size + rollout_gpus, tp=par.tp, pp=par.pp, cp=par.cp, sp=par.sp,
                  recompute=cfg.model.recompute, tokens_per_microbatch=tokens,
                  distributed_optimizer=par.distributed_optimizer)


def _evaluate(cfg: RunConfig, m: ModelDims, g: GpuSpec, lay: Layout, fused: bool) -> Plan:
    ro = cfg.rollout
    rollout_gpus = 0 if ro.colocate else ro.num_servers * ro.tp_size
    train_gpus = lay.gpus - rollout_gpus
    mp = lay.tp * lay.pp * lay.cp
    if train_gpus < mp or train_gpus % mp:
        raise ConfigError(f"{lay.gpus} GPUs ({train_gpus} for training after {rollout_gpus} rollout GPUs) "
                          f"do not divide into tp*pp*cp = {mp}: pick --gpus a multiple of {mp}.")
    dp = lay.dp(train_gpus)
    dbytes = DTYPE_BYTES[cfg.model.dtype]
    p_rank = mem.params_per_rank(m, lay.tp, lay.pp)
    w = mem.weights_bytes(p_rank, dbytes)
    gr = mem.grads_bytes(p_rank)
    opt = mem.optimizer_bytes(p_rank, dp, lay.cp, lay.distributed_optimizer, dbytes == 4)
    opt_other = mem.optimizer_bytes(p_rank, dp, lay.cp, not lay.distributed_optimizer, dbytes == 4)
    # The local spec (no Transformer Engine) keeps every op's inputs; without flash attention
    # the softmax of each row (at most one sample long) is kept too.
    unfused = cfg.model.transformer_impl == "local"
    attn_len = min(cfg.data.max_prompt_len + ro.max_new_tokens, lay.tokens_per_microbatch) \
        if unfused or cfg.model.attention_backend == "local" else None
    act = mem.activations_bytes(m, lay.tokens_per_microbatch, tp=lay.tp, pp=lay.pp, cp=lay.cp, sp=lay.sp,
                                recompute=lay.recompute, act_bytes=dbytes, unfused=unfused, attn_len=attn_len)
    lg_fused = mem.logits_bytes(m, lay.tokens_per_microbatch, tp=lay.tp, cp=lay.cp, fused=True)
    lg_plain = mem.logits_bytes(m, lay.tokens_per_microbatch, tp=lay.tp, cp=lay.cp, fused=False)
    lg = lg_fused if fused else lg_plain
    static = w + gr + opt
    overhead = OVERHEAD_GIB * GIB
    train_peak = static + act + lg + overhead

    # Rollout: SGLang reserves mem_fraction of the GPU for weights + KV cache.
    reserve = ro.mem_fraction * g.memory_gib * GIB
    sw = mem.server_weights_bytes(m, ro.tp_size)
    kv_room = reserve - sw
    kv_tok = mem.kv_bytes_per_token(m, ro.tp_size)
    kv_tokens = max(kv_room, 0.0) / kv_tok
    sample = cfg.data.max_prompt_len + ro.max_new_tokens
    rollout_peak = reserve + overhead + (static if ro.colocate else 0.0)
    peak = max(train_peak, rollout_peak) if ro.colocate else train_peak
    notes = []
    fits = peak <= g.memory_gib * GIB and (rollout_peak <= g.memory_gib * GIB)
    if kv_tokens < sample:
        fits = False
        notes.append(f"the rollout server's KV room ({kv_room / GIB:.1f} GiB) holds {kv_tokens:.0f} tokens, "
                     f"less than one {sample}-token sample: raise rollout.mem_fraction or rollout.tp_size")

    gib = lambda b: round(b / GIB, 6)  # noqa: E731 (6 places: the CPU demo model is MiB-sized)
    breakdown = {
        "weights": gib(w), "grads_fp32": gib(gr),
        "optimizer": gib(opt), "optimizer_if_" + ("not_distributed" if lay.distributed_optimizer else "distributed"):
            gib(opt_other),
        "activations": gib(act), "logits": gib(lg), "logits_fused": gib(lg_fused), "logits_unfused": gib(lg_plain),
        "overhead": OVERHEAD_GIB, "train_phase": gib(train_peak),
        "rollout_reserved": gib(reserve), "rollout_phase": gib(rollout_peak),
    }

    # Step time.
    seqs = cfg.train.prompts_per_step * ro.n_samples
    per_server = math.ceil(seqs / ro.num_servers)
    mean_resp = ro.max_new_tokens / 2  # assumption: responses average half the budget
    ctx = cfg.data.max_prompt_len + mean_resp
    batch = max(1, min(per_server, int(kv_tokens // ctx)))  # the KV cache holds this many mean-length samples
    step_s = timing.decode_step_s(m, ro.tp_size, batch, ctx, g.bandwidth_gbs)
    waves = math.ceil(per_server / batch)
    rollout_s = waves * ro.max_new_tokens * step_s
    tokens = seqs * (cfg.data.max_prompt_len + mean_resp)
    extra = 1 + (1 if cfg.algorithm.kl_coef > 0 else 0)
    flops = timing.train_flops(m, tokens, ctx, recompute=lay.recompute, extra_forwards=extra)
    train_s = flops / (train_gpus * g.bf16_tflops * 1e12 * timing.TRAIN_MFU)
    sync = timing.sync_s(m, g.link_gbs)
    time = {
        "decode_batch_per_server": batch, "decode_tokens_per_s_per_server": round(batch / step_s),
        "rollout_s": round(rollout_s), "train_tflop": round(flops / 1e12), "train_s": round(train_s),
        "mfu": timing.TRAIN_MFU, "sync_s": round(sync, 1), "step_s": round(rollout_s + train_s + sync),
    }
    rollout = {"colocated": ro.colocate, "servers": ro.num_servers, "server_tp": ro.tp_size,
               "mem_fraction": ro.mem_fraction, "server_weights_gib": gib(sw), "kv_room_gib": gib(kv_room),
               "kv_tokens": int(kv_tokens), "full_length_samples": int(kv_tokens // sample)}
    lay_d = asdict(lay) | {"dp": dp, "train_gpus": train_gpus, "params_b": round(m.params / 1e9, 2)}
    return Plan(gpu=g.name, gpus=lay.gpus, layout=lay_d, fits=fits, per_gpu_gib=gib(max(peak, rollout_peak)),
                gpu_memory_gib=g.memory_gib, breakdown=breakdown, rollout=rollout, time=time, notes=notes)


def _valid(m: ModelDims, cfg: RunConfig, lay: Layout) -> bool:
    rollout_gpus = 0 if cfg.rollout.colocate else cfg.rollout.num_servers * cfg.rollout.tp_size
    mp = lay.tp * lay.pp * lay.cp
    return (lay.tp <= 8 and m.heads % lay.tp == 0 and m.kv_heads % lay.tp == 0 and m.layers % lay.pp == 0
            and (lay.gpus - rollout_gpus) % mp == 0 and lay.gpus - rollout_gpus >= mp
            and lay.tokens_per_microbatch % (2 * lay.cp) == 0)


def _candidates(cfg: RunConfig, lay: Layout) -> list[tuple[str, Layout]]:
    """Single changes, cheapest first; then pairs of them."""
    sample = cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    single: list[tuple[str, Layout]] = []
    if lay.recompute != "full":
        single.append(("model.recompute=full", replace(lay, recompute="full")))
    if lay.tp > 1 and not lay.sp:
        single.append(("parallel.sp=true", replace(lay, sp=True)))
    if lay.tokens_per_microbatch > sample:
        single.append((f"train.max_tokens_per_microbatch={sample}", replace(lay, tokens_per_microbatch=sample)))
    if not lay.distributed_optimizer:
        single.append(("parallel.distributed_optimizer=true", replace(lay, distributed_optimizer=True)))
    for k in (2, 4, 8):
        single.append((f"parallel.tp={lay.tp * k} parallel.sp=true", replace(lay, tp=lay.tp * k, sp=True)))
        single.append((f"parallel.cp={lay.cp * k}", replace(lay, cp=lay.cp * k)))
    for k in (2, 4):
        single.append((f"--gpus {lay.gpus * k}", replace(lay, gpus=lay.gpus * k)))
    pairs = []
    for i, (d1, _) in enumerate(single):
        for d2, l2 in single[i + 1:]:
            merged = replace(l2, **{f: getattr(_, f) for f in ("recompute", "tokens_per_microbatch",
                                                              "distributed_optimizer") if getattr(_, f) != getattr(lay, f)})
            if _.tp != lay.tp:
                merged = replace(merged, tp=_.tp, sp=True)
            if _.cp != lay.cp:
                merged = replace(merged, cp=_.cp)
            if _.sp != lay.sp:
                merged = replace(merged, sp=True)
            pairs.append((f"{d1} {d2}", merged))
    return single + pairs


def plan(cfg: RunConfig, m: ModelDims, *, gpu: str = "h100-80gb", gpus: int | None = None, fused: bool = True) -> Plan:
    """Plan ``cfg`` on ``gpus`` GPUs of kind ``gpu`` (default: the recipe's own world; a
    colocated recipe's rollout servers share the trainer's GPUs)."""
    if gpu not in GPUS:
        raise ConfigError(f"unknown --gpu {gpu!r}; known: {', '.join(GPUS)}.")
    if gpus is not None and gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}.")
    return _evaluate(cfg, m, GPUS[gpu], _layout_from(cfg, gpus), fused)


def plan_with_fix(cfg: RunConfig, m: ModelDims, *, gpu: str = "h100-80gb", gpus: int | None = None,
                  fused: bool = True) -> Plan:
    """``plan``, and when it does not fit, the first candidate change (``_candidates`` order)
    that does, re-planned in full: ``fix = {"change": ..., "per_gpu_gib": ...}``."""
    p = plan(cfg, m, gpu=gpu, gpus=gpus, fused=fused)
    if p.fits:
        return p
    base = _layout_from(cfg, gpus)
    for desc, lay in _candidates(cfg, base):
        if not _valid(m, cfg, lay):
            continue
        q = _evaluate(cfg, m, GPUS[gpu], lay, fused)
        if q.fits:
            p.fix = {"change": desc, "per_gpu_gib": q.per_gpu_gib, "layout": q.layout}
            return p
    p.fix = {"change": None, "per_gpu_gib": None, "layout": None}
    p.notes.append("no single or paired change among tp/cp/sp/recompute/tokens/4x GPUs fits: use a larger GPU")
    return p
