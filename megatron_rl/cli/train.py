"""``megatron-rl train RECIPE [key=value ...]``: the RL job (see ``megatron_rl.trainer``)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="run an RL recipe: rollout servers, reward workers, the Megatron actor",
        description="Train with a recipe (configs/*.yaml) and key.sub=value overrides. Run plainly, it "
                    "starts the recipe's trainer world (parallel.tp*pp*cp*dp processes), rollout servers and "
                    "reward workers on this machine; under torchrun or srun it joins the world it is in. "
                    "Writes config.yaml, metrics.jsonl, samples.jsonl, train.log and checkpoints; SIGTERM or "
                    "SIGUSR1 checkpoint after the current step and exit 0; the same command resumes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("recipe", help="YAML recipe, e.g. configs/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    p.set_defaults(run=run)


def run(args) -> int:
    from megatron_rl.trainer.launch import run_job

    return run_job("train", args.recipe, list(args.overrides))
