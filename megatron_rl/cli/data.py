"""``megatron-rl data``: convert public datasets to the training parquet schema."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    from megatron_rl.data.benchmarks import BENCHMARKS

    p = sub.add_parser("data", help="convert public datasets (training sets, benchmarks) to parquet",
                       description="Convert a public dataset's downloaded files (JSON, JSONL, gzip or "
                                   "parquet) to the training parquet schema (prompt, answer, "
                                   "data_source, extra_info). Nothing is downloaded.")
    kinds = p.add_subparsers(dest="kind", required=True)
    scaler = kinds.add_parser("deepscaler", help="DeepScaleR math: {problem, answer, solution?}")
    coder = kinds.add_parser("deepcoder", help="DeepCoder code: {problem, tests, metadata?, "
                                               "starter_code?}")
    for k in (scaler, coder):
        k.add_argument("input", help="JSON list or JSONL file")
        k.add_argument("output", help="parquet file to write")
        _row_group_option(k, "default: 1024 math, 128 code")
    coder.add_argument("--source", default="deepcoder",
                       help="data_source for rows without their own `source` field")
    for name, bench in BENCHMARKS.items():
        k = kinds.add_parser(name, help=f"{bench.title} benchmark ({bench.reads})",
                             description=f"Convert {bench.title} as published ({bench.reads}).")
        k.add_argument("--input", nargs="+", required=True, metavar="FILE",
                       help="the downloaded file(s), read in order" +
                            (" (or the directory holding test*.jsonl)" if name == "livecodebench" else ""))
        k.add_argument("--output", required=True, help="parquet file to write")
        _row_group_option(k, f"default: {bench.row_group_size}")
        if name == "livecodebench":
            _lcb_options(k)
    p.set_defaults(run=run)


def _row_group_option(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--row-group-size", type=int, default=None, help=f"rows per parquet row group ({default})")


def _lcb_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--release-version", default=None,
                   help="release_v1..release_v6, release_latest, v1..v6 or vN_vM: which test*.jsonl "
                        "files (default: every file given)")
    p.add_argument("--start-date", default=None, help="keep problems from this contest date (YYYY-MM-DD)")
    p.add_argument("--end-date", default=None, help="keep problems up to this contest date (YYYY-MM-DD, "
                                                    "inclusive at midnight, as LiveCodeBench reads it)")
    p.add_argument("--float-tol", type=float, default=None,
                   help="accept non-integer numbers within this tolerance (default: exact, as LiveCodeBench)")


def run(args: argparse.Namespace) -> int:
    from megatron_rl.errors import DataError

    if args.row_group_size is not None and args.row_group_size <= 0:
        raise DataError(f"--row-group-size must be > 0, got {args.row_group_size}.")
    if args.kind in ("deepscaler", "deepcoder"):
        from megatron_rl.data.convert import convert

        n = convert(args.kind, args.input, args.output, args.row_group_size,
                    source=getattr(args, "source", "deepcoder"))
        print(f"wrote {n} {args.kind} rows to {args.output}")
        return 0
    from megatron_rl.data.benchmarks import convert_benchmark
    from megatron_rl.data.lcb import parse_day
    from megatron_rl.data.options import Options

    options = Options()
    if args.kind == "livecodebench":
        if args.float_tol is not None and not 0 <= args.float_tol < 1:
            raise DataError(f"--float-tol must be in [0, 1), got {args.float_tol}.")
        options = Options(release_version=args.release_version,
                          start=parse_day(args.start_date, "--start-date") if args.start_date else None,
                          end=parse_day(args.end_date, "--end-date") if args.end_date else None,
                          float_tol=args.float_tol)
        if options.start and options.end and options.start > options.end:
            raise DataError(f"--start-date {args.start_date} is after --end-date {args.end_date}.")
    report = convert_benchmark(args.kind, args.input, args.output, options, args.row_group_size)
    print(report.summary(args.output))
    return 0
