"""Human-readable printout of a ``Plan``: one line per part, each with its formula."""

from __future__ import annotations

from megatron_rl.plan.memory import OVERHEAD_NOTE
from megatron_rl.plan.planner import Plan
from megatron_rl.plan.timing import DECODE_BW_EFFICIENCY


def render(p: Plan, recipe: str, source: str) -> str:
    b, r, t, lay = p.breakdown, p.rollout, p.time, p.layout
    alt = [k for k in b if k.startswith("optimizer_if_")][0]
    lines = [
        f"plan {recipe}: {p.gpus} x {p.gpu} ({p.gpu_memory_gib} GiB), model {lay['params_b']}B params from {source}",
        f"layout: tp={lay['tp']} pp={lay['pp']} cp={lay['cp']} dp={lay['dp']} sp={lay['sp']} "
        f"recompute={lay['recompute']} tokens/micro-batch={lay['tokens_per_microbatch']}",
        "per GPU (GiB):",
        f"  weights       {b['weights']:8.2f}  params/(tp*pp) x dtype bytes",
        f"  grads fp32    {b['grads_fp32']:8.2f}  4 B x params/(tp*pp)",
        f"  optimizer     {b['optimizer']:8.2f}  12 B (fp32 master + Adam m, v) x params/(tp*pp)"
        f"{' / (dp*cp)' if lay['distributed_optimizer'] else ''}; {alt.removeprefix('optimizer_if_')}: {b[alt]:.2f}",
        f"  activations   {b['activations']:8.2f}  longest micro-batch, tokens/cp per rank, recompute/SP as set",
        f"  logits        {b['logits']:8.2f}  fused kernel {b['logits_fused']:.2f}, unfused {b['logits_unfused']:.2f} "
        "(10 B x tokens/cp x vocab/tp)",
        f"  overhead      {b['overhead']:8.2f}  {OVERHEAD_NOTE}",
        f"  = training phase {b['train_phase']:.2f}",
        f"  rollout       {b['rollout_reserved']:8.2f}  mem_fraction {r['mem_fraction']} x GPU "
        f"({'colocated' if r['colocated'] else 'own GPUs'}): server weights {r['server_weights_gib']:.2f}",
        f"                          + KV room {r['kv_room_gib']:.2f} = {r['kv_tokens']} tokens "
        f"({r['full_length_samples']} full-length samples)",
        f"  = rollout phase {b['rollout_phase']:.2f}" + (" (training state stays resident)" if r["colocated"] else ""),
        f"peak per GPU: {p.per_gpu_gib:.2f} of {p.gpu_memory_gib} GiB -> {'FITS' if p.fits else 'DOES NOT FIT'}",
        "step time (estimate):",
        f"  rollout  {t['rollout_s']:7d} s  decode {t['decode_tokens_per_s_per_server']} tok/s/server at batch "
        f"{t['decode_batch_per_server']}: weights + batch x KV read per step",
        f"                    at {DECODE_BW_EFFICIENCY:.0%} of HBM bandwidth; responses average max_new_tokens/2, "
        "the longest sets the length",
        f"  train    {t['train_s']:7d} s  {t['train_tflop']} TFLOP at MFU {t['mfu']}: 6 x params x tokens + attention,",
        "                    x 8/6 with full recompute, + 2/6 per log-prob pass",
        f"  sync     {t['sync_s']:7.1f} s  2 B x params over one inter-node link",
        f"  step     {t['step_s']:7d} s",
    ]
    lines += [f"note: {n}" for n in p.notes]
    if p.fix is not None:
        if p.fix["change"]:
            lines.append(f"smallest fix: {p.fix['change']} -> {p.fix['per_gpu_gib']:.2f} GiB per GPU")
        else:
            lines.append("smallest fix: none found")
    return "\n".join(lines)
