"""``megatron-rl serve``: the embedded CPU rollout engine speaking SGLang's HTTP API."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="embedded CPU rollout engine speaking SGLang's HTTP API",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(run=run)


def run(args) -> int:
    from megatron_rl.rollout.serve import main as serve_main

    return serve_main(args.rest)
