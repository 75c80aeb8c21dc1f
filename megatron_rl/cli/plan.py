"""``megatron-rl plan RECIPE [--gpus N --gpu KIND] [--json] [key=value ...]``: will the recipe
fit, per GPU, and how long will a step take (see ``megatron_rl.plan``)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="per-GPU memory and step-time estimate for a recipe; names the smallest fix",
        description="Plan a recipe on a cluster without a GPU: per-GPU weights, fp32 gradients, optimizer "
                    "state (with and without the distributed optimizer), activations of the longest "
                    "micro-batch, logits with and without the fused kernel, the rollout server's weights and "
                    "KV room, and the step time (decode from HBM bandwidth, training at a stated MFU, weight "
                    "sync). Model dimensions come from the recipe's config.json, else from a table of known "
                    "models. When it does not fit, the smallest change that does is named.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("recipe", help="YAML recipe, e.g. configs/deepcoder_14b_32k.yaml")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    p.add_argument("--gpus", type=int, default=None, help="GPUs in all (default: the recipe's world)")
    p.add_argument("--gpu", default="h100-80gb", help="h100-80gb, h200-141gb or a100-80gb")
    p.add_argument("--model", default=None, help="size the model from the planner's table (e.g. qwen2.5-32b)")
    p.add_argument("--unfused", action="store_true", help="plan the output layer without the fused log-prob kernel")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def run(args) -> int:
    from megatron_rl.config.run import load_config
    from megatron_rl.plan import plan_with_fix, resolve_dims
    from megatron_rl.plan.report import render

    cfg = load_config(args.recipe, list(args.overrides))
    dims, source = resolve_dims(cfg.model.path, args.model)
    p = plan_with_fix(cfg, dims, gpu=args.gpu, gpus=args.gpus, fused=not args.unfused)
    if args.json:
        print(json.dumps(p.to_dict() | {"recipe": args.recipe, "model_source": source}))
    else:
        print(render(p, args.recipe, source))
    return 0
