"""``megatron-rl generate``: sample, grade and keep responses as chat parquet for ``megatron-rl sft``.

    megatron-rl generate --model ... --data prompts.parquet --n 4 --out traces.parquet \\
        [--keep correct|all] [--server-urls URL... (SGLang or any OpenAI-compatible server)]

Samples go to ``OUT.samples.jsonl`` as they are graded (settings in ``OUT.run.json``), so an
interrupted run resumes where it stopped; the parquet is written at the end.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_rl.cli.eval import add_sampling_arguments, sampling_run
from megatron_rl.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="sample and grade responses into chat parquet for `megatron-rl sft` (distillation)",
        description="Sample --n responses per prompt (launched SGLang / embedded servers, or --server-urls: "
                    "SGLang or any OpenAI-compatible server), grade each by its row's data_source, and write "
                    "the kept ones as the chat parquet `megatron-rl sft` reads (column `messages`).")
    add_sampling_arguments(p, n=4)
    p.add_argument("--out", required=True, metavar="TRACES.parquet", help="output parquet file")
    p.add_argument("--keep", choices=["correct", "all"], default="correct",
                   help="keep samples graded correct (default) or all of them")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from megatron_rl.eval.run import missing_error, sample_models
    from megatron_rl.eval.traces import trace_rows, write_traces

    out = Path(args.out)
    if out.suffix != ".parquet" or out.is_dir():
        raise UserError(f"--out {out}: give a file name ending in .parquet.")
    run_ = sampling_run(args)
    if len(run_.models) > 1:
        raise UserError(f"generate samples one model; --model gave {len(run_.models)}: {run_.models[:3]}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("")
    store, missing = sample_models(run_, Path(f"{stem}.samples.jsonl"), Path(f"{stem}.run.json"), out.parent)
    rows = trace_rows(store.records, run_.problems, run_.models[0], run_.n, args.keep)
    total = len(run_.problems) * run_.n
    if not rows:
        raise UserError(f"none of the {total} samples was graded correct, so there is nothing to write to {out}; "
                        f"see {stem}.samples.jsonl for the grades, or pass --keep all.")
    write_traces(out, rows)
    print(f"wrote {len(rows)} of {total} samples ({args.keep}) to {out}")
    if missing:
        raise missing_error(missing, Path(f"{stem}.samples.jsonl"))
    return 0
