"""``megatron-rl`` command line: argument parsing and dispatch, nothing else.

Each subcommand lives in its own module with ``add_parser(subparsers)`` (which sets
``run``) and ``run(args) -> int``. User errors (``UserError``) print their one-paragraph
message and exit 2; bugs keep their tracebacks. Heavy imports happen inside each
subcommand's ``run``, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from megatron_rl.errors import UserError

# Subcommand modules, in the order `--help` lists them.
SUBCOMMANDS = (
    "megatron_rl.cli.train",
    "megatron_rl.cli.sft",
    "megatron_rl.cli.data",
    "megatron_rl.cli.plot",
    "megatron_rl.checkpoint.cli",
    "megatron_rl.cli.logprobs",
    "megatron_rl.cli.serve",
    "megatron_rl.cli.eval",
    "megatron_rl.cli.generate",
    "megatron_rl.cli.plan",
    "megatron_rl.cli.launch",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-rl", description="RL post-training on megatron-core.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a real missing dependency inside the module: a bug
                raise
            continue  # not built yet
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a nargs="*" positional at the first option, so overrides typed
    # after a flag (`plan RECIPE --json model.path=X`) arrive here: they are overrides still.
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except UserError as e:
        print(f"megatron-rl {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
