"""``megatron-rl`` command line: argument parsing and dispatch, nothing else.

User errors (``UserError``) print their one-paragraph message and exit 2; bugs keep their
tracebacks. Heavy imports happen inside each subcommand, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_rl.errors import UserError


def _add_logprobs(sub) -> None:
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


def _run_logprobs(args) -> int:
    from megatron_rl.actor.scoring import ScoreArgs, score

    return score(ScoreArgs(model=args.model, input=args.input, output=args.output, tp=args.tp, pp=args.pp,
                           cp=args.cp, sp=args.sp, batch_size=args.batch_size, dtype=args.dtype,
                           temperature=args.temperature))


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="embedded CPU rollout engine speaking SGLang's HTTP API",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)


def _run_serve(args) -> int:
    from megatron_rl.rollout.serve import main as serve_main

    return serve_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-rl", description="RL post-training on megatron-core.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    try:
        from megatron_rl.checkpoint.cli import add_convert_parser
    except ImportError:  # converters not installed in this build
        add_convert_parser = None
    if add_convert_parser is not None:
        add_convert_parser(sub)
    _add_logprobs(sub)
    _add_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runners = {"logprobs": _run_logprobs, "serve": _run_serve}
    try:
        if args.command == "convert":
            from megatron_rl.checkpoint.cli import run_convert

            return run_convert(args)
        return runners[args.command](args)
    except UserError as e:
        print(f"megatron-rl {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
