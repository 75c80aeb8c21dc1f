"""``megatron-rl sft RECIPE [key=value ...]``: supervised fine-tuning on chat parquet."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sft", help="supervised fine-tuning on chat parquet (loss on assistant tokens only)",
        description="Fine-tune on transcripts (`data.train_files`, column `data.messages_key`) with the "
                    "Megatron actor: token-budget micro-batches, checkpoints, exact resume, metrics.jsonl, "
                    "and a Hugging Face export at the end, usable as `model.path` of an RL recipe.")
    p.add_argument("recipe", help="YAML recipe")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    p.set_defaults(run=run)


def run(args) -> int:
    from megatron_rl.trainer.launch import run_job

    return run_job("sft", args.recipe, list(args.overrides))
