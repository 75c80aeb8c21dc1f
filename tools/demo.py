"""`make demo`: train a tiny model from nothing on CPU, through the commands users run.

1. Builds a character-level chat tokenizer and a random ~1M-parameter Qwen2
   (``megatron_rl.demo.tiny``), and writes synthetic addition problems with ``\\boxed{}``
   answers (``megatron_rl.data.synthetic``): an SFT set from a sloppy teacher that forgets
   carries, RL prompts, and held-out problems disjoint from both.
2. ``megatron-rl sft configs/tiny_sft.yaml``: the warm-up (format, sums without carry).
3. ``megatron-rl train configs/tiny_cpu.yaml``: GRPO with the real math grader, the Megatron
   actor, an embedded rollout server and a weight sync every step. It scores the held-out
   problems before the first update (the warm-up's score) and after the last.
4. ``megatron-rl plot``; then prints where everything is. The last line reads
   ``held-out accuracy: <after warm-up> -> <after RL>``; the exit status is 1 when RL did not
   raise it by at least 0.2.
Everything lands in ``runs/demo/`` (started afresh each time).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "megatron-rl")
RUN = Path("runs/demo")  # relative to the repository root, as the recipes' paths are
MIN_RISE = 0.2
SEED = 0


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def megatron_rl(*args: str) -> None:
    print("$ megatron-rl " + " ".join(args), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run([CLI, *args], check=True, cwd=ROOT, env=env)


def build(run: Path) -> None:
    from megatron_rl.data import synthetic
    from megatron_rl.demo.tiny import build_model, build_tokenizer

    tok = build_tokenizer(run / "model")
    build_model(run / "model", tok, seed=SEED)
    data = run / "data"
    data.mkdir(parents=True)
    # RL and held-out problems carry in half the cases: a model that merely learnt to always
    # (or never) carry scores about 0.5, so a rise must come from getting sums right.
    synthetic.write_sft_parquet(data / "sft.parquet", 20000, seed=SEED)
    synthetic.write_arithmetic_parquet(data / "train.parquet", 4000, seed=SEED + 1, carry_frac=0.5)
    synthetic.write_arithmetic_parquet(data / "heldout.parquet", 200, seed=SEED + 2, split="heldout",
                                       carry_frac=0.5)
    print(f"tokenizer ({len(tok)} tokens), model and data in {run}")


def held_out(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


def main() -> int:
    t0 = time.time()
    run = ROOT / RUN
    shutil.rmtree(run, ignore_errors=True)
    step("1/4 tokenizer, tiny Qwen2 and addition problems")
    build(run)
    step("2/4 SFT warm-up (sloppy teacher: forgets carries)")
    megatron_rl("sft", "configs/tiny_sft.yaml")
    step("3/4 GRPO with the math grader (held-out accuracy before and after)")
    megatron_rl("train", "configs/tiny_cpu.yaml", f"logging.output_dir={RUN}/rl", f"checkpoint.dir={RUN}/rl/ckpt")
    step("4/4 curves")
    megatron_rl("plot", f"{RUN}/rl")
    evals = held_out(run / "rl")
    before, after = evals[0]["eval/accuracy"], evals[-1]["eval/accuracy"]
    minutes = (time.time() - t0) / 60
    print(f"\nrun directory:  {RUN}/rl (metrics.jsonl, eval.jsonl, samples.jsonl, train.log)")
    print(f"checkpoints:    {RUN}/rl/ckpt (SFT: {RUN}/sft/ckpt)")
    print(f"HF export:      {RUN}/rl/hf")
    print(f"plots:          {RUN}/rl/curves.png")
    print(f"time:           {minutes:.1f} min")
    print(f"held-out accuracy: {before:.2f} -> {after:.2f}")
    if after - before < MIN_RISE:
        print(f"RL raised held-out accuracy by {after - before:.2f}, less than {MIN_RISE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
