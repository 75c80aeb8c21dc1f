"""``megatron-rl logprobs``: score token sequences with the Megatron actor (JSONL in/out)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("logprobs", help="score token sequences with the Megatron actor (JSONL in/out)",
                       description="Per-token log-probs of {\"input_ids\": [...]} lines, computed by the "
                                   "Megatron actor. Run under `torchrun --nproc-per-node N` for TP/PP/CP.")
    p.add_argument("--model", required=True, help="HF model directory or megatron-rl checkpoint")
    p.add_argument("--input", required=True, help="JSONL of {\"input_ids\": [...]}")
    p.add_argument("--output", required=True, help="JSONL of {\"logprobs\": [...]} (one fewer than the ids)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--sp", action="store_true", help="sequence parallel (needs --tp > 1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.set_defaults(run=run)


def run(args) -> int:
    from megatron_rl.actor.scoring import ScoreArgs, score

    return score(ScoreArgs(model=args.model, input=args.input, output=args.output, tp=args.tp, pp=args.pp,
                           cp=args.cp, sp=args.sp, batch_size=args.batch_size, dtype=args.dtype,
                           temperature=args.temperature))
