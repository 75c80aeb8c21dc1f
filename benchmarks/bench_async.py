"""Wall time per step of the demo's GRPO job: ``rollout.mode`` sync vs one_step_off vs async.

    .venv/bin/python benchmarks/bench_async.py [--steps 16] [--repeats 2] [--staleness 2]

The job is `make demo`'s RL stage (configs/tiny_cpu.yaml: one trainer process, one embedded
rollout server, the math grader) on the demo's tiny model and addition problems, built into a
temporary directory (a random model: the speed, not the learning, is measured). Each mode
runs as a user runs it, ``megatron-rl train RECIPE rollout.mode=...``; the figure is the
mean of the job's own ``time/step`` (the trainer's wall time per step, waits for generation
included) over steps 2..N (start-up and the first step, which fills the pipeline, left out),
with the sync mode's as the reference measured in the same run, interleaved (sync,
one_step_off, async, sync, ...) so that the machine's load hits all modes.

Both with the demo's `rollout.deterministic: true` (exact resume: seeded requests prefilled one
by one, then decoded in a batch-invariant batch) and without it (ordinary continuous batching). Overlap needs spare cores: here the trainer and the rollout server share 2 cores, so one
waits for the other more than on a GPU node where they hold separate devices.

Prints a table and writes benchmarks/results/bench_async.csv.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import ROOT, write_table  # noqa: E402

CLI = str(Path(sys.executable).parent / "megatron-rl")


def build(root: Path) -> None:
    from megatron_rl.data import synthetic
    from megatron_rl.demo.tiny import build_model, build_tokenizer

    tok = build_tokenizer(root / "model")
    build_model(root / "model", tok, seed=0)
    synthetic.write_arithmetic_parquet(root / "train.parquet", 2000, seed=1, carry_frac=0.5)


def run_mode(root: Path, mode: str, steps: int, staleness: int, deterministic: bool, tag: str) -> dict:
    out = root / tag
    args = [CLI, "train", str(ROOT / "configs" / "tiny_cpu.yaml"), f"model.path={root / 'model'}",
            f"data.train_files=[{root / 'train.parquet'}]", "eval.files=[]", "eval.at_start=false",
            f"train.num_steps={steps}", f"logging.output_dir={out}", f"checkpoint.dir={out / 'ckpt'}",
            "checkpoint.save_every=1000", "checkpoint.export_hf=false", "logging.progress=lines",
            f"rollout.mode={mode}", f"rollout.max_staleness={staleness}",
            f"rollout.deterministic={str(deterministic).lower()}"]
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    total = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_step = [r["time/step"] for r in rows[1:]]  # the first step starts the pipeline
    return {"mode": mode if mode != "async" else f"async k={staleness}", "deterministic": deterministic,
            "steps": steps,
            "s_per_step": round(statistics.mean(per_step), 3),
            "generate_wait_s": round(statistics.mean(r["time/generate"] for r in rows[1:]), 3),
            "train_s": round(statistics.mean(r["time/train"] for r in rows[1:]), 3),
            "staleness_max": max(r["rollout/staleness_max"] for r in rows),
            "job_wall_s": round(total, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--staleness", type=int, default=2)
    p.add_argument("--csv", type=Path, default=ROOT / "benchmarks" / "results" / "bench_async.csv")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root)
        for r in range(args.repeats):
            for det in (True, False):
                by_mode = {}
                for mode in ("sync", "one_step_off", "async"):
                    row = run_mode(root, mode, args.steps, args.staleness, det, f"{mode}-{det}-{r}")
                    by_mode[mode] = row
                    rows.append(row)
                for row in by_mode.values():
                    row["speedup_vs_sync"] = round(by_mode["sync"]["s_per_step"] / row["s_per_step"], 2)
                    row["round"] = r
    write_table(rows, ["round", "deterministic", "mode", "steps", "s_per_step", "speedup_vs_sync", "generate_wait_s", "train_s",
                       "staleness_max", "job_wall_s"], args.csv)


if __name__ == "__main__":
    main()
