"""``megatron-rl data``: convert public datasets to the training parquet schema."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="convert public datasets (DeepScaleR, DeepCoder) to parquet",
                       description="Convert a public dataset's JSON or JSONL to the training "
                                   "parquet schema (prompt, answer, data_source, extra_info).")
    kinds = p.add_subparsers(dest="kind", required=True)
    scaler = kinds.add_parser("deepscaler", help="DeepScaleR math: {problem, answer, solution?}")
    coder = kinds.add_parser("deepcoder", help="DeepCoder code: {problem, tests, metadata?, "
                                               "starter_code?}")
    for k in (scaler, coder):
        k.add_argument("input", help="JSON list or JSONL file")
        k.add_argument("output", help="parquet file to write")
        k.add_argument("--row-group-size", type=int, default=None,
                       help="rows per parquet row group (default: 1024 math, 128 code)")
    coder.add_argument("--source", default="deepcoder",
                       help="data_source for rows without their own `source` field")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from megatron_rl.data.convert import convert
    from megatron_rl.errors import DataError

    if args.row_group_size is not None and args.row_group_size <= 0:
        raise DataError(f"--row-group-size must be > 0, got {args.row_group_size}.")
    n = convert(args.kind, args.input, args.output, args.row_group_size,
                source=getattr(args, "source", "deepcoder"))
    print(f"wrote {n} {args.kind} rows to {args.output}")
    return 0
