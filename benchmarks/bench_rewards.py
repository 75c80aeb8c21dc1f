"""Reward grader throughput (responses per second) on this machine.

    .venv/bin/python benchmarks/bench_rewards.py [--workers N] [--code-responses N]

Math: the graded test table (tests/rewards/math_cases.py: correct answers, traps and
format errors), in this process and through RewardPool, each after a warm-up on other answers. Code: correct stdin/stdout
solutions with 10 tests each (every test runs, the worst case for an all-pass reward),
per sandbox backend, directly and through RewardPool, beside a baseline with no sandbox at
all (one bare ``python3 -I`` subprocess per test, same comparison), measured in the same run
so the sandbox's cost is read against this machine's load. Assert mode (HumanEval-style
``check(candidate)`` with 10 asserts) runs the asserts in the trusted grader and each call
in a fresh fork in the sandbox; its baseline is the usual untrusted way, candidate and
asserts in one bare interpreter. ``vs_baseline`` is throughput over the baseline of the
same workload in the same run. Prints a table and writes benchmarks/results/bench_rewards.csv
with a machine column.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "rewards"))

from _machine import write_table  # noqa: E402  (the script's own folder is on sys.path)
from math_cases import CASES  # noqa: E402  (the test table doubles as the workload)

from megatron_rl.rewards import RewardItem, RewardPool  # noqa: E402
from megatron_rl.rewards.code import extract_code, grade_code  # noqa: E402
from megatron_rl.rewards.code_tests import stdout_matches  # noqa: E402
from megatron_rl.rewards.math import grade_math  # noqa: E402
from megatron_rl.rewards.sandbox_setup import detect  # noqa: E402

CSV_PATH = ROOT / "benchmarks" / "results" / "bench_rewards.csv"
CODE = "```python\nimport sys\nnums = list(map(int, sys.stdin.read().split()))\nprint(sum(nums))\n```"
ASSERT_CODE = "```python\ndef total(xs):\n    return sum(xs)\n```"


def plain_subprocess_score(response: str, tests: dict[str, list[str]]) -> float:
    """The floor the sandbox is measured against: one bare interpreter per test, no
    isolation, no limits, stop at the first failure."""
    source = extract_code(response) or ""
    python = os.path.realpath(sys.executable)  # the sandbox's interpreter, not a pyenv shim
    for inp, out in zip(tests["inputs"], tests["outputs"]):
        proc = subprocess.run([python, "-I", "-c", source], input=inp, capture_output=True,
                              text=True, timeout=6)
        if not stdout_matches(proc.stdout, out):
            return 0.0
    return 1.0


def plain_subprocess_assert_score(response: str, tests: dict[str, str]) -> float:
    """Assert mode's floor: candidate and asserts in one bare interpreter (exit code 0 passes);
    no isolation and, unlike the grader, a verdict the candidate could forge."""
    source = (extract_code(response) or "") + "\n" + tests["test_code"]
    source += f"\ncheck({tests['entry_point']})\n"
    proc = subprocess.run([os.path.realpath(sys.executable), "-I", "-c", source],
                          capture_output=True, timeout=6)
    return float(proc.returncode == 0)


def assert_tests(seed: int) -> dict[str, str]:
    cases = [[(seed * 31 + i * 7 + k) % 1000 for k in range(50)] for i in range(10)]
    body = "".join(f"    assert candidate({c}) == {sum(c)}\n" for c in cases)
    return {"test_code": "def check(candidate):\n" + body, "entry_point": "total"}


def code_tests(seed: int) -> dict[str, list[str]]:
    inputs = [" ".join(str((seed * 31 + i * 7 + k) % 1000) for k in range(50)) for i in range(10)]
    return {"inputs": inputs, "outputs": [str(sum(map(int, x.split()))) for x in inputs]}


def timed(fn: Callable[[], list[float]]) -> tuple[float, list[float]]:
    start = time.perf_counter()
    scores = fn()
    return time.perf_counter() - start, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--code-responses", type=int, default=40)
    ap.add_argument("--only", choices=["math", "code"], help="run one half of the benchmark")
    args = ap.parse_args()
    rows = []

    def add(bench: str, mode: str, workers: int, n: int, secs: float, scores: list[float]) -> None:
        rows.append({"benchmark": bench, "mode": mode, "workers": workers, "responses": n,
                     "seconds": round(secs, 3), "responses_per_s": round(n / secs, 2),
                     "mean_score": round(sum(scores) / len(scores), 3)})

    if args.only != "code":
        bench_math(args, add)
    if args.only != "math":
        bench_code(args, add)
    baseline = {r["benchmark"]: r["responses_per_s"] for r in rows if "baseline" in r["mode"]}
    for r in rows:
        base = baseline.get(r["benchmark"])
        r["vs_baseline"] = round(r["responses_per_s"] / base, 2) if base else ""
    cols = ["benchmark", "mode", "workers", "responses", "seconds", "responses_per_s",
            "vs_baseline", "mean_score"]
    write_table(rows, cols, CSV_PATH, device_col="machine")


def bench_math(args: argparse.Namespace, add: Callable[..., None]) -> None:
    math_items = [RewardItem("math", r, gt) for r, gt, _, _ in CASES]
    # Steady state, as in training: sympy/math-verify pay a one-off cost on first use, so an
    # untimed warm-up precedes each timing. It uses other strings than the table: those
    # libraries cache per string, and training rarely sees the same answer twice.
    warm = [RewardItem("math", f"</think>\\boxed{{\\frac{{{i}}}{{{i + 1}}}}}", f"{i}/{i + 2}")
            for i in range(2, 42)]
    warm += [RewardItem("math", f"</think>\\boxed{{({i}, {i}]}}", f"[{i},{i}]") for i in range(20)]
    for item in warm:
        grade_math(item.response, item.reference)
    secs, scores = timed(lambda: [grade_math(i.response, i.reference).score for i in math_items])
    add("math", "in-process (no worker)", 1, len(math_items), secs, scores)
    with RewardPool(num_workers=args.workers, max_queue=4 * args.workers) as pool:
        pool.score_batch(warm * args.workers)
        secs, scores = timed(lambda: pool.score_batch(math_items))
    add("math", "RewardPool", args.workers, len(math_items), secs, scores)


def bench_code(args: argparse.Namespace, add: Callable[..., None]) -> None:
    n = args.code_responses
    workloads = [("code (10 stdin tests)", CODE, code_tests, plain_subprocess_score),
                 ("code (assert, 10 calls)", ASSERT_CODE, assert_tests, plain_subprocess_assert_score)]
    for bench, response, make_tests, baseline in workloads:
        items = [RewardItem("code", response, make_tests(i)) for i in range(n)]
        secs, scores = timed(lambda its=items, f=baseline: [f(i.response, i.reference) for i in its])
        add(bench, "plain subprocess, no sandbox (baseline)", 1, n, secs, scores)
        for backend in ("bwrap", "plain"):
            try:
                setup = detect(backend)
            except RuntimeError:
                continue
            secs, scores = timed(lambda b=backend, its=items: [
                grade_code(i.response, i.reference, backend=b).score for i in its])
            add(bench, f"{setup.backend} direct", 1, n, secs, scores)
            with RewardPool(num_workers=args.workers, max_queue=4 * args.workers,
                            code_backend=backend) as pool:
                pool.score_batch(items[:2])
                secs, scores = timed(lambda p=pool, its=items: p.score_batch(its))
            add(bench, f"{setup.backend} RewardPool", args.workers, n, secs, scores)


if __name__ == "__main__":
    main()
