"""``megatron-rl plot RUN_DIR``: training curves from metrics.jsonl (and eval.jsonl) to PNG."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_rl.errors import UserError

PANELS = (
    ("reward", ("reward/mean", "reward/accuracy")),
    ("evaluation", ("eval/accuracy",)),
    ("response length", ("response/length_mean", "response/length_max")),
    ("entropy / KL", ("actor/entropy_mean", "actor/kl_loss", "actor/ppo_kl")),
    ("mismatch", ("mismatch/abs_logp_diff_mean", "mismatch/abs_logp_diff_max")),
    ("gradient norm", ("actor/grad_norm",)),
    ("SFT loss", ("sft/nll",)),
    ("seconds per step", ("time/step", "time/generate", "time/train")),
)


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="draw a run's curves (metrics.jsonl, eval.jsonl) to PNG",
                       description="Reads RUN_DIR/metrics.jsonl (and eval.jsonl) and writes RUN_DIR/curves.png.")
    p.add_argument("run_dir", help="the run's logging.output_dir")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
    p.set_defaults(run=run)


def read_rows(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line of a killed run
    return rows


def run(args) -> int:
    run_dir = Path(args.run_dir)
    rows = read_rows(run_dir / "metrics.jsonl") + read_rows(run_dir / "eval.jsonl")
    if not rows:
        raise UserError(f"`{run_dir}` has no metrics.jsonl rows to plot: give the run directory "
                        "(`logging.output_dir` of a run that completed at least one step).")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, [k for k in keys if any(k in r for r in rows)]) for title, keys in PANELS]
    panels = [(t, ks) for t, ks in panels if ks]
    cols = 2
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(11, 3.2 * ((len(panels) + 1) // 2)),
                             squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for k in keys:
            pts = sorted((r["step"], r[k]) for r in rows if k in r and isinstance(r[k], (int, float)))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(args.out) if args.out else run_dir / "curves.png"
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")
    return 0
