"""One tiny GRPO job through ``megatron-rl train`` and through TRL's ``GRPOTrainer``: s/step, tokens/s.

    .venv/bin/pip install -r benchmarks/requirements-bench.txt    # TRL, benchmark only
    .venv/bin/python benchmarks/bench_vs_trl.py [--steps 5] [--prompts 8] [--group 8] \\
        [--max-new-tokens 32] [--micro-batch 8] [--threads 0 1] [--repeats 2]

Equal work on both sides: the random tiny Qwen2 and character tokenizer of
``megatron_rl.demo.tiny`` (built into a temporary directory), synthetic addition prompts
(``megatron_rl.data.synthetic``), the math grader ``megatron_rl.rewards.math.compute_score`` as
the reward, ``--prompts`` prompts x ``--group`` samples per step, at most ``--max-new-tokens``
new tokens, temperature 1.0, AdamW at a constant lr 1e-4 (weight decay 0.01, clip 1.0),
clip 0.2 / 0.28, token-mean loss (TRL: ``dapo``), no KL, no entropy bonus, fp32 on CPU, no
vLLM, one optimizer update per step, ``--micro-batch`` sequences per forward/backward. The
random model never answers right, so every reward and advantage is 0: the same forward,
backward and optimizer work on both sides, only the weights do not move.

Ours runs exactly as a user runs it: ``<venv>/bin/megatron-rl train RECIPE key=value ...``
with a recipe that extends configs/tiny_cpu.yaml (one trainer process, parallel.tp=1; the
rollout engine is a separate ``megatron-rl serve`` process; one reward worker process). The
per-step ``time/*`` phases and ``response/length_mean`` come from its metrics.jsonl. TRL runs
in this process (``model.generate``, reward, training: one process); a callback times each
optimizer step, wrappers time its generation and reward calls, and its logged
``completions/mean_length`` gives the tokens. The first ``--warmup`` steps of every run are
left out (start-up, first-call allocations).

Threads: ``--threads 0`` is torch's default (one per core), ``1`` is one thread (ours:
``OMP_NUM_THREADS=1`` in the environment of the command, as a user would set it; TRL:
``torch.set_num_threads(1)``). The ``busy_threads`` column is measured, not configured:
per process, the threads that used at least a tenth of the busiest thread's CPU time. Ours
has a trainer and a rollout-server process that take turns (generate, then train); TRL has
one process that does both. On a shared machine, several busy threads per process lose a
lot whenever another job holds a core (each parallel region waits for its slowest thread):
compare the rows of equal threads and read the load average column.

What the two sides do per step is not identical, and the phase columns say where time goes:
ours also computes the pre-update log-probs in a separate forward pass (``logprobs_s``: the
trainer-vs-engine mismatch gate and PPO's old log-probs; TRL without vLLM skips that pass
when generation and update are aligned and uses the detached current log-probs instead)
and pushes the new weights into the rollout server (``sync_s``). TRL's ``train_s`` is the
rest of its step after generation and grading.

Prints a table and writes benchmarks/results/bench_vs_trl.csv with a machine column.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

from _machine import ROOT, write_table  # the script's own folder is on sys.path

CSV_PATH = ROOT / "benchmarks" / "results" / "bench_vs_trl.csv"
REQUIREMENTS = "benchmarks/requirements-bench.txt"
LR, WEIGHT_DECAY, CLIP_GRAD, CLIP_LOW, CLIP_HIGH, TEMPERATURE = 1e-4, 0.01, 1.0, 0.2, 0.28, 1.0
PHASES = ("generate", "logprobs", "train", "sync", "other")
Threads = dict[tuple[int, str], dict[int, float]]
"""CPU seconds per thread id, keyed by (pid, process label)."""


@dataclass
class Run:
    """One run's timed steps (warm-up left out)."""

    step_s: list[float]
    gen_tokens: list[float]
    phases: dict[str, list[float]]
    total_s: float
    """Wall seconds of the whole run, start-up and warm-up included."""
    busy: str
    """Busy threads per process, measured."""


@dataclass
class Side:
    """One framework at one thread setting, pooled over the repeats."""

    framework: str
    threads: int
    runs: list[Run] = field(default_factory=list)
    load: list[float] = field(default_factory=list)
    """1-minute load average after each run (this benchmark's own processes included)."""

    def add(self, run: Run) -> None:
        self.runs.append(run)
        self.load.append(round(os.getloadavg()[0], 2))

    @property
    def step_s(self) -> list[float]:
        return [s for r in self.runs for s in r.step_s]

    @property
    def s_per_step(self) -> float:
        return statistics.fmean(self.step_s)

    @property
    def median_s_per_step(self) -> float:
        return statistics.median(self.step_s)

    @property
    def tokens_per_s(self) -> float:
        return sum(t for r in self.runs for t in r.gen_tokens) / sum(self.step_s)

    @property
    def tokens_per_step(self) -> float:
        return statistics.fmean(t for r in self.runs for t in r.gen_tokens)

    def phase(self, name: str) -> float | str:
        xs = [x for r in self.runs for x in r.phases.get(name, [])]
        return round(statistics.fmean(xs), 3) if xs else "-"


# ---------------------------------------------------------------------------------- shared
def build_workload(tmp: pathlib.Path, num_prompts: int, seed: int = 0) -> tuple[pathlib.Path, pathlib.Path]:
    """The tiny model + tokenizer directory and the prompt parquet, shared by both sides."""
    from megatron_rl.data.synthetic import write_arithmetic_parquet
    from megatron_rl.demo.tiny import build_model, build_tokenizer

    hf_dir = tmp / "hf"
    build_model(hf_dir, build_tokenizer(hf_dir), seed=seed)
    return hf_dir, write_arithmetic_parquet(tmp / "train.parquet", num_prompts, seed)


def sample_threads(procs: list, seen: Threads, main_label: str) -> None:
    """Record each thread's CPU seconds so far (the last sample before a process exits stays).
    ``procs[0]`` is labelled ``main_label``, a ``serve`` process "server", any other "other"."""
    import psutil

    for i, p in enumerate(procs):
        try:
            label = main_label if i == 0 else "server" if "serve" in p.cmdline() else "other"
            seen[(p.pid, label)] = {t.id: t.user_time + t.system_time for t in p.threads()}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def busy_threads(before: Threads, after: Threads, labels: dict[str, str]) -> str:
    """``label busy-count`` for each labelled process that used over a second of CPU."""
    out = []
    for (pid, label), threads in after.items():
        if label not in labels:
            continue
        start = before.get((pid, label), {})
        used = [cpu - start.get(tid, 0.0) for tid, cpu in threads.items()]
        if sum(used) < 1.0:
            continue
        out.append(f"{labels[label]} {sum(u >= 0.1 * max(used) for u in used)}")
    return " + ".join(out) or "?"


# ---------------------------------------------------------------------------------- ours
def ours_command(args: argparse.Namespace, recipe: pathlib.Path, hf_dir: pathlib.Path, data: pathlib.Path,
                 out_dir: pathlib.Path) -> list[str]:
    """The user's command line: the venv's ``megatron-rl train`` with the run's overrides."""
    overrides = [
        f"model.path={hf_dir}", "parallel.tp=1", f"train.num_steps={args.steps}",
        f"train.prompts_per_step={args.prompts}", f"train.mini_batch_prompts={args.prompts}",
        f"train.micro_batch_size={args.micro_batch}", f"rollout.n_samples={args.group}",
        f"rollout.max_new_tokens={args.max_new_tokens}", f"rollout.temperature={TEMPERATURE}",
        f"optimizer.lr={LR}", f"optimizer.weight_decay={WEIGHT_DECAY}", f"optimizer.clip_grad={CLIP_GRAD}",
        f"algorithm.clip_low={CLIP_LOW}", f"algorithm.clip_high={CLIP_HIGH}",
        "algorithm.kl_coef=0", "algorithm.entropy_coef=0", "algorithm.loss_agg_mode=token-mean",
        f"data.train_files=[{data}]", "data.max_prompt_len=32",
        # Everything else the base recipe may set that changes the work, pinned: no evaluation,
        # no checkpoints or export, micro-batches by count (as TRL's), batched generation
        # (deterministic=true runs every request alone; TRL's generate is batched too).
        "train.max_tokens_per_microbatch=0", "rollout.deterministic=false", "eval.files=[]",
        "eval.at_start=false", "eval.every_steps=0", "checkpoint.dir=", "checkpoint.export_hf=false",
        f"logging.output_dir={out_dir}",
    ]
    return [str(pathlib.Path(sys.executable).parent / "megatron-rl"), "train", str(recipe), *overrides]


def run_ours(args: argparse.Namespace, tmp: pathlib.Path, hf_dir: pathlib.Path, data: pathlib.Path,
             threads: int, tag: str) -> Run:
    """``megatron-rl train`` as a subprocess, read back from its metrics.jsonl."""
    import psutil

    recipe = tmp / "recipe.yaml"
    recipe.write_text(f"base: {ROOT / 'configs' / 'tiny_cpu.yaml'}\n")
    out_dir = tmp / f"ours-{tag}"
    cmd = ours_command(args, recipe, hf_dir, data, out_dir)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    log_path = tmp / f"ours-{tag}.log"
    seen: Threads = {}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp, env=env)
        top = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                sample_threads([top, *top.children(recursive=True)], seen, "trainer")
            except psutil.NoSuchProcess:
                pass
            time.sleep(0.5)
    total = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"megatron-rl train exited with status {proc.returncode}; end of its log "
                         f"({log_path}):\n{tail}\ncommand: {' '.join(cmd)}")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "time/step" in r][args.warmup:]
    n = args.prompts * args.group
    phases: dict[str, list[float]] = {p: [r.get(f"time/{p}", 0.0) for r in rows] for p in PHASES[:-1]}
    phases["other"] = [r["time/step"] - sum(r.get(f"time/{p}", 0.0) for p in PHASES[:-1]) for r in rows]
    return Run(step_s=[r["time/step"] for r in rows], gen_tokens=[r["response/length_mean"] * n for r in rows],
               phases=phases, total_s=total, busy=busy_threads({}, seen, {"trainer": "trainer", "server": "server"}))


# ---------------------------------------------------------------------------------- TRL
def trl_reward(completions: list, answer: list[str], **_: object) -> list[float]:
    """Our math grader over TRL's completions (chat messages: the assistant turn's text)."""
    from megatron_rl.rewards.math import compute_score

    return [compute_score(c[-1]["content"] if isinstance(c, list) else c, a) for c, a in zip(completions, answer)]


def timed_method(obj: object, name: str, sink: list[float]) -> None:
    """Wrap ``obj.name`` so that each call adds its wall seconds to ``sink[-1]``."""
    inner = getattr(obj, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            sink[-1] += time.perf_counter() - t0

    setattr(obj, name, wrapper)


def trl_config(args: argparse.Namespace, out_dir: pathlib.Path, seed: int):
    """GRPOConfig for the same job: one generation batch of prompts x group = one update."""
    from trl import GRPOConfig

    n = args.prompts * args.group
    with warnings.catch_warnings():  # transformers 5 renames gradient_checkpointing; TRL still sets it
        warnings.simplefilter("ignore", FutureWarning)
        config = GRPOConfig(
            output_dir=str(out_dir), use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
            max_steps=args.steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=WEIGHT_DECAY, max_grad_norm=CLIP_GRAD, optim="adamw_torch",
            per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=n // args.micro_batch,
            num_generations=args.group, max_completion_length=args.max_new_tokens, temperature=TEMPERATURE,
            top_p=1.0, top_k=0, num_iterations=1, beta=0.0, epsilon=CLIP_LOW, epsilon_high=CLIP_HIGH,
            loss_type="dapo", scale_rewards="group", use_vllm=False, logging_steps=1, save_strategy="no",
            report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=seed)
    if config.generation_batch_size != n or config.steps_per_generation != config.gradient_accumulation_steps:
        raise SystemExit(f"TRL would generate {config.generation_batch_size} completions every "
                         f"{config.steps_per_generation} micro-steps; this benchmark needs {n} per update")
    return config


def run_trl(args: argparse.Namespace, tmp: pathlib.Path, hf_dir: pathlib.Path, data: pathlib.Path,
            threads: int, tag: str) -> Run:
    """TRL's GRPOTrainer in this process, each optimizer step timed by a callback."""
    import datasets
    import psutil
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOTrainer

    datasets.disable_progress_bars()

    n = args.prompts * args.group
    gen_s, reward_s = [0.0], [0.0]

    class StepTimer(TrainerCallback):
        """Wall time between optimizer steps and the completion lengths TRL logs (logging_steps=1)."""

        def __init__(self) -> None:
            self.last = 0.0
            self.step_s: list[float] = []
            self.mean_len: list[float] = []

        def on_train_begin(self, *a, **k) -> None:
            self.last = time.perf_counter()

        def on_step_end(self, *a, **k) -> None:
            now = time.perf_counter()
            self.step_s.append(now - self.last)
            self.last = now
            gen_s.append(0.0)
            reward_s.append(0.0)

        def on_log(self, _args, _state, _control, logs=None, **k) -> None:
            if logs and "completions/mean_length" in logs:
                self.mean_len.append(float(logs["completions/mean_length"]))

    default = torch.get_num_threads()
    torch.set_num_threads(threads or default)
    me = psutil.Process()
    before: Threads = {}
    after: Threads = {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        timer = StepTimer()
        start = time.perf_counter()
        with warnings.catch_warnings():  # transformers 5 deprecations TRL 1.16 still triggers
            warnings.simplefilter("ignore", FutureWarning)
            trainer = GRPOTrainer(model=model, reward_funcs=trl_reward, args=trl_config(args, tmp / f"trl-{tag}", 0),
                                  train_dataset=datasets.Dataset.from_parquet(str(data)),
                                  processing_class=tokenizer, callbacks=[timer])
            trainer.remove_callback(PrinterCallback)  # one dict per step on stdout otherwise
            timed_method(trainer, "_generate_single_turn", gen_s)  # model.generate over the whole batch
            timed_method(trainer, "_calculate_rewards", reward_s)
            sample_threads([me], before, "trl")
            trainer.train()
            sample_threads([me], after, "trl")
        total = time.perf_counter() - start
    finally:
        torch.set_num_threads(default)
    if len(timer.step_s) != args.steps or len(timer.mean_len) != args.steps:
        raise SystemExit(f"TRL ran {len(timer.step_s)} steps with {len(timer.mean_len)} logged lengths; "
                         f"expected {args.steps} of each")
    w = args.warmup
    step_s = timer.step_s[w:]
    # generate = model.generate + grading (ours grades inside its generate phase too);
    # train = the rest of the step: forward/backward of every micro-batch, optimizer,
    # tokenizing, advantages, logging.
    generate = [g + r for g, r in zip(gen_s[w:args.steps], reward_s[w:args.steps])]
    phases = {"generate": generate, "train": [t - g for t, g in zip(step_s, generate)]}
    return Run(step_s=step_s, gen_tokens=[m * n for m in timer.mean_len[w:]], phases=phases, total_s=total,
               busy=busy_threads(before, after, {"trl": "trl"}))


# ---------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="first steps of each run left out of the figures")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--group", type=int, default=8, help="samples per prompt (TRL: num_generations)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="most generated tokens per sample")
    ap.add_argument("--micro-batch", type=int, default=8,
                    help="sequences per forward/backward on both sides (ours: train.micro_batch_size; "
                         "TRL: per_device_train_batch_size)")
    ap.add_argument("--threads", type=int, nargs="+", default=[0, 1],
                    help="torch threads per process, one pair of rows each (0 = torch's default)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="runs of each row, interleaved, the order reversed every other round (shared machine)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, metrics)")
    args = ap.parse_args()
    n = args.prompts * args.group
    if args.steps <= args.warmup or args.warmup < 0:
        ap.error("need 0 <= --warmup < --steps")
    if args.group < 2 or n % args.micro_batch:
        ap.error(f"--group must be >= 2 and --micro-batch must divide prompts x group ({n})")
    if args.repeats < 1 or min(args.threads) < 0:
        ap.error("--repeats must be >= 1 and --threads >= 0")
    return args


def table_rows(sides: list[Side]) -> list[dict]:
    trl_by_threads = {s.threads: s for s in sides if s.framework.startswith("TRL")}
    best_trl = min(trl_by_threads.values(), key=lambda s: s.s_per_step)
    rows = []
    for side in sides:
        same = trl_by_threads[side.threads]
        busy = sorted({r.busy for r in side.runs})
        rows.append({
            "framework": side.framework, "threads": side.threads or "default", "busy_threads": "; ".join(busy),
            "steps_timed": len(side.step_s), "s_per_step": round(side.s_per_step, 3),
            "median_s_per_step": round(side.median_s_per_step, 3), "gen_tokens_per_s": round(side.tokens_per_s, 1),
            "tokens_per_step": round(side.tokens_per_step, 1), **{f"{p}_s": side.phase(p) for p in PHASES},
            "run_total_s": round(statistics.fmean(r.total_s for r in side.runs), 1),
            "load_per_run": "/".join(map(str, side.load)),
            "speedup_vs_trl_same_threads": round(same.s_per_step / side.s_per_step, 2),
            "speedup_vs_best_trl": round(best_trl.s_per_step / side.s_per_step, 2)})
    return rows


def main() -> int:
    args = parse_args()
    try:
        trl_version = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        print(f"TRL is not installed; it is a benchmark-only dependency:\n"
              f"    {pathlib.Path(sys.executable).parent / 'pip'} install -r {REQUIREMENTS}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_vs_trl-"))
    plan: list[tuple[Side, Callable[..., Run]]] = []
    for threads in args.threads:
        plan.append((Side("megatron-rl train", threads), run_ours))
        plan.append((Side(f"TRL {trl_version} GRPOTrainer", threads), run_trl))
    try:
        hf_dir, data = build_workload(tmp, num_prompts=max(256, args.prompts * args.steps))
        print("ours:", " ".join(ours_command(args, tmp / "recipe.yaml", hf_dir, data, tmp / "ours-TAG")),
              flush=True)
        for rep in range(args.repeats):
            for side, run in plan if rep % 2 == 0 else plan[::-1]:
                side.add(run(args, tmp, hf_dir, data, side.threads, f"{side.threads}-{rep}"))
                last = side.runs[-1]
                print(f"  round {rep + 1}/{args.repeats} {side.framework} threads={side.threads or 'default'}: "
                      f"{statistics.fmean(last.step_s):.3f} s/step, busy threads {last.busy}, load {side.load[-1]}",
                      flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    sides = [side for side, _ in plan]
    cols = ["framework", "threads", "busy_threads", "steps_timed", "s_per_step", "median_s_per_step",
            "gen_tokens_per_s", "tokens_per_step", *(f"{p}_s" for p in PHASES), "run_total_s", "load_per_run",
            "speedup_vs_trl_same_threads", "speedup_vs_best_trl"]
    write_table(table_rows(sides), cols, CSV_PATH, device_col="machine", trl=trl_version, prompts=args.prompts,
                group=args.group, max_new_tokens=args.max_new_tokens, micro_batch=args.micro_batch,
                steps=args.steps, warmup=args.warmup, repeats=args.repeats)
    ours_best = min((s for s in sides if not s.framework.startswith("TRL")), key=lambda s: s.s_per_step)
    trl_best = min((s for s in sides if s.framework.startswith("TRL")), key=lambda s: s.s_per_step)
    ratio = trl_best.s_per_step / ours_best.s_per_step
    print(f"best vs best: ours (threads={ours_best.threads or 'default'}) {ours_best.s_per_step:.3f} s/step, TRL "
          f"(threads={trl_best.threads or 'default'}) {trl_best.s_per_step:.3f} s/step: ours {ratio:.2f}x "
          f"({'faster' if ratio > 1 else 'slower'}), {ours_best.tokens_per_s / trl_best.tokens_per_s:.2f}x the "
          "generated tokens/s.\nPhases (s/step): generate includes grading on both sides; TRL's train_s is the rest "
          "of its step; ours also runs a log-prob pass and a weight sync.\nProcesses: ours = a trainer and a "
          "rollout server taking turns on the cores (+ 1 reward worker); TRL = one process doing both.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
