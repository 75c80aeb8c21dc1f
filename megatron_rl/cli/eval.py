"""``megatron-rl eval``: avg@n, pass@k and maj@n of one or more models on parquet benchmarks.

    megatron-rl eval --model HF_DIR|CHECKPOINT [--model ...] --data FILE.parquet... --n 16 \\
        --max-new-tokens 32768 --temperature 0.6 --top-p 0.95 --out DIR \\
        [--engine embedded|sglang --servers N --tp T | --server-urls URL...]

``add_sampling_arguments`` and ``sampling_run`` are shared with ``megatron-rl generate``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_rl.errors import UserError


def add_sampling_arguments(p: argparse.ArgumentParser, *, n: int) -> None:
    """Model, data, sampling, server and grading options (``eval`` and ``generate``)."""
    p.add_argument("--model", action="append", required=True, metavar="HF_DIR|CHECKPOINT",
                   help="HF model directory, megatron-rl checkpoint (exported to HF once, under the output "
                        "directory's models/), or a glob of those; repeat for several models. With --api "
                        "openai: the served model's name")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE.parquet",
                   help="parquet files in the training schema (prompt, answer, data_source); one dataset each, "
                        "named by the file's stem; each row is graded by its data_source")
    p.add_argument("--n", type=int, default=n, help=f"samples per problem (default {n})")
    p.add_argument("--max-new-tokens", type=int, default=32768, help="token budget per sample (default 32768)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (default 0.6)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the per-sample seeds (sample i of problem p: a hash of seed, p, i)")
    s = p.add_argument_group("servers")
    s.add_argument("--engine", choices=["auto", "embedded", "sglang"], default="auto",
                   help="servers to launch: sglang (GPU), embedded (CPU), auto = sglang when installed")
    s.add_argument("--servers", type=int, default=1, help="data-parallel servers to launch (default 1)")
    s.add_argument("--tp", type=int, default=1, help="GPUs per SGLang server (default 1)")
    s.add_argument("--server-urls", nargs="+", default=[], metavar="URL",
                   help="attach to running servers instead of launching (SGLang, megatron-rl serve, or any "
                        "OpenAI-compatible server)")
    s.add_argument("--api", choices=["auto", "native", "openai"], default="auto",
                   help="native = SGLang's /generate (prompts rendered with the local tokenizer), openai = "
                        "/v1/chat/completions (the server's template); auto = native when the server answers it")
    s.add_argument("--served-model-name", default="", help="--api openai: the model name requests carry "
                   "(default: --model when it is not a local path, else the first of GET /v1/models)")
    s.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="launch servers in deterministic mode (a resumed run then gives the very same samples); "
                        "default: on for the embedded engine, off for SGLang")
    s.add_argument("--chat-template", default="", help="as data.chat_template: a .jinja file, "
                   "deepseek_r1_distill, or empty for the tokenizer's own")
    g = p.add_argument_group("grading")
    g.add_argument("--grader", choices=["math", "code"], default="math",
                   help="grader of data sources that name neither math nor code (default math)")
    g.add_argument("--grader-workers", type=int, default=2, help="grader processes (default 2)")
    g.add_argument("--code-timeout", type=float, default=6.0, help="seconds per code test (default 6)")
    g.add_argument("--require-think-close", action="store_true",
                   help="a math response without </think> scores 0 (thinking models, as DeepScaleR graded)")


def sampling_run(args: argparse.Namespace):
    """The validated ``SamplingRun`` of the parsed options (UserError on bad values)."""
    from megatron_rl.eval.backends import SamplingSettings
    from megatron_rl.eval.models import ServeSettings, expand_models
    from megatron_rl.eval.problems import load_problems
    from megatron_rl.eval.run import GradingSettings, SamplingRun

    problems = []
    if args.n < 1:
        problems.append(f"--n must be >= 1, got {args.n}")
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        problems.append(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.servers < 1 or args.tp < 1 or args.grader_workers < 1:
        problems.append("--servers, --tp and --grader-workers must be >= 1")
    if any(not u.startswith(("http://", "https://")) for u in args.server_urls):
        problems.append("--server-urls must be full URLs such as http://127.0.0.1:30000")
    if problems:
        raise UserError("; ".join(problems) + ".")
    models = expand_models(args.model)
    if args.server_urls and len(models) > 1:
        raise UserError(f"--server-urls serve one model, but {len(models)} were given ({models[:3]}...); "
                        "evaluate several models by launching their servers (no --server-urls), or one at a time.")
    if args.api != "openai":
        absent = [m for m in models if not Path(m).exists()]
        if absent:
            raise UserError(f"--model {absent[0]}: no such directory. Give a Hugging Face model directory or a "
                            "megatron-rl checkpoint (the served model's name only with --api openai).")
    serve = ServeSettings(engine=args.engine, servers=args.servers, tp=args.tp, server_urls=args.server_urls,
                          api=args.api, served_model_name=args.served_model_name, deterministic=args.deterministic,
                          chat_template=args.chat_template)
    return SamplingRun(models, load_problems(args.data), args.n, args.seed,
                       SamplingSettings(args.temperature, args.top_p, args.max_new_tokens), serve,
                       GradingSettings(args.grader, args.grader_workers, code_timeout_s=args.code_timeout,
                                       require_think_close=args.require_think_close))


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval", help="avg@n, pass@k and maj@n of models on parquet benchmarks",
        description="Sample --n responses per problem on data-parallel rollout servers, grade each by its "
                    "row's data_source, and write OUT/results.json, OUT/results.md (a table per dataset; "
                    "a comparison table over several --model) and OUT/samples.jsonl (every sample). "
                    "Interrupted, the same command resumes from samples.jsonl and gives the same table.")
    add_sampling_arguments(p, n=16)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created; reused to resume)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from megatron_rl.eval.report import compute_results, write_results
    from megatron_rl.eval.run import missing_error, sample_models

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory.")
    run_ = sampling_run(args)
    out.mkdir(parents=True, exist_ok=True)
    store, missing = sample_models(run_, out / "samples.jsonl", out / "run.json", out)
    results = compute_results(store.records, run_.models, run_.problems, run_.n)
    write_results(out, results, run_.settings(), run_.n)
    print((out / "results.md").read_text(), end="")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'samples.jsonl'}")
    if missing:
        raise missing_error(missing, out / "samples.jsonl")
    return 0
