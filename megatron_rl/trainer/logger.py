"""What a run writes for people to read (rank 0 only): metrics, samples, progress, wandb.

``<output_dir>/metrics.jsonl``: one JSON object per completed step (``step`` first, then
sorted metric names; ``time/*`` and ``perf/*`` are timings, everything else is reproducible
and equal across an interrupted-and-resumed run and an uninterrupted one).
``samples.jsonl``: a few samples per step. ``eval.jsonl``: one object per evaluation.
``train.log``: the log. On resume, lines of steps at or after the resumed step are dropped
first, so a step killed half-way never appears twice.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from megatron_rl.config.logging import LoggingConfig

log = logging.getLogger("megatron_rl.train")

TIMING_PREFIXES = ("time/", "perf/")
LINE_KEYS = ("reward/mean", "reward/accuracy", "sft/nll", "response/length_mean", "actor/entropy_mean",
             "mismatch/abs_logp_diff_mean")
"""What the plain progress line (and the bar) shows, when present."""


def truncate_jsonl(path: Path, keep_before_step: int) -> None:
    """Keep whole lines whose ``step`` is below ``keep_before_step`` (a torn last line goes too)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] < keep_before_step:
            kept.append(line)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(f"{ln}\n" for ln in kept))
    tmp.replace(path)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunLogger:
    """Rank 0's writer of metrics.jsonl, samples.jsonl, eval.jsonl, progress and wandb."""

    def __init__(self, cfg: LoggingConfig, out_dir: Path, *, total_steps: int, start_step: int,
                 config_dict: dict[str, Any]):
        self.cfg, self.dir = cfg, out_dir
        self.total, self.start = total_steps, start_step
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "samples.jsonl", "eval.jsonl"):
            truncate_jsonl(self.dir / name, start_step)
        handler = logging.FileHandler(self.dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        self._t0 = time.perf_counter()
        mode = cfg.progress
        self.bar = None
        if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stderr)
        self.wandb = None
        if cfg.wandb_project and cfg.wandb_mode != "disabled":
            import wandb  # an extra: `pip install megatron-rl[wandb]`

            self.wandb = wandb.init(project=cfg.wandb_project, mode=cfg.wandb_mode, dir=str(self.dir),
                                    config=config_dict, name=self.dir.name, resume="allow")

    def phase(self, step: int, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"step {step}: {name}", refresh=True)

    def step(self, step: int, metrics: dict[str, float], samples: list[dict]) -> None:
        row = {"step": step, **{k: _clean(metrics[k]) for k in sorted(metrics)}}
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if samples:
            with open(self.dir / "samples.jsonl", "a") as f:
                for s in samples:
                    f.write(json.dumps({"step": step, **s}) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        done = step + 1 - self.start
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / max(done, 1) * (self.total - step - 1)
        shown = [(k, metrics[k]) for k in LINE_KEYS if k in metrics]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(" ".join(f"{k.split('/')[-1]} {v:.3g}" for k, v in shown[:3]), refresh=True)
        else:
            text = " | ".join(f"{k} {v:.4g}" for k, v in shown)
            print(f"step {step + 1}/{self.total} | {text} | {metrics.get('time/step', 0):.1f} s | eta {eta:.0f} s",
                  flush=True)

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.dir / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **{k: _clean(metrics[k]) for k in sorted(metrics)}}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        text = " ".join(f"{k}={v:.3f}" for k, v in sorted(metrics.items()) if k.endswith(("accuracy", "mean")))
        (self.bar.write if self.bar is not None else print)(f"eval at step {step}: {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
