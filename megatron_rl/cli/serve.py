"""``megatron-rl serve``: the embedded CPU rollout engine speaking SGLang's HTTP API.

The options are declared here, on the subparser, by the same function that builds
``python -m megatron_rl.rollout.serve``'s parser, so the two cannot drift.
"""

from __future__ import annotations

from megatron_rl.rollout.serve import DESCRIPTION, add_arguments


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="embedded CPU rollout engine speaking SGLang's HTTP API",
                       description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from megatron_rl.rollout.serve import run as serve

    return serve(args)
