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
    from megatron_rl.config.run import load_config
    from megatron_rl.trainer.launch import (
        adopt_slurm_env,
        in_launched_world,
        preflight,
        set_parent_death_signal,
        supervise,
    )

    cfg = load_config(args.recipe, args.overrides)  # every config error before anything starts
    preflight(cfg, rl=True)
    adopt_slurm_env()
    if not in_launched_world() and cfg.parallel.world_size > 1:
        return supervise(["train", args.recipe, *args.overrides], cfg.parallel.world_size)
    if in_launched_world():
        set_parent_death_signal()  # torchrun's worker: go when torchrun goes
    from megatron_rl.trainer.loop import train

    return train(cfg)
