"""Array jobs: the task list kept in ``OUT/tasks.json``, which tasks are still missing, and
the gather step that writes one table of every task's results.

Two kinds: ``eval`` (one `megatron-rl eval` per checkpoint x dataset, into ``OUT/task-<i>/``)
and ``seeds`` (one `megatron-rl train` per seed, into ``OUT/seed-<s>/``). The list is written
once; a later launch with the same arguments reads it back, so task index -> (checkpoint,
dataset) never changes, and only tasks without a recorded exit status 0 are submitted again.
Each task writes ``exit_code`` into its directory when its command ends (``launch.slurm``).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatron_rl.errors import UserError


@dataclass(frozen=True)
class Task:
    """One array task."""

    index: int
    """$SLURM_ARRAY_TASK_ID."""
    dir: str
    """Its output directory (exit_code, results)."""
    argv: list[str]
    """The exact command it runs."""
    labels: dict[str, str] = field(default_factory=dict)
    """What varies between tasks (checkpoint and dataset, or seed): the gathered table's first columns."""


def eval_tasks(out: str, checkpoints: list[str], datasets: list[str], eval_args: list[str]) -> list[Task]:
    """One `megatron-rl eval` per checkpoint x dataset (checkpoint-major)."""
    tasks = []
    for ckpt in checkpoints:
        for data in datasets:
            i = len(tasks)
            d = f"{out}/task-{i}"
            argv = ["megatron-rl", "eval", "--model", ckpt, "--data", data, *eval_args, "--out", d]
            tasks.append(Task(i, d, argv, {"checkpoint": ckpt, "dataset": Path(data).stem}))
    return tasks


def seed_tasks(out: str, seeds: list[int], recipe: str, overrides: list[str]) -> list[Task]:
    """One `megatron-rl train` per seed, each with its own output and checkpoint directories."""
    tasks = []
    for i, seed in enumerate(seeds):
        d = f"{out}/seed-{seed}"
        argv = ["megatron-rl", "train", recipe, *overrides, f"seed={seed}", f"logging.output_dir={d}",
                f"checkpoint.dir={d}/ckpt"]
        tasks.append(Task(i, d, argv, {"seed": str(seed)}))
    return tasks


def keep_tasks(out: Path, kind: str, tasks: list[Task]) -> None:
    """Write ``tasks.json``, or check it holds the same list (indices must stay stable)."""
    path = out / "tasks.json"
    doc = {"kind": kind, "tasks": [asdict(t) for t in tasks]}
    if path.is_file():
        old = json.loads(path.read_text())
        if old != doc:
            raise UserError(
                f"{path} holds a different task list (another --array kind, checkpoint, dataset, seed or argument): "
                "its indices must keep their meaning, so use another output directory (--out), or delete it "
                "to start over.")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def load_tasks(out: Path) -> tuple[str, list[Task]]:
    path = out / "tasks.json"
    if not path.is_file():
        raise UserError(f"{path} does not exist: `megatron-rl launch gather OUT` reads the task list an array "
                        "launch (--array eval|seeds --out OUT) wrote there.")
    doc = json.loads(path.read_text())
    return doc["kind"], [Task(**t) for t in doc["tasks"]]


def status(task: Task) -> int | None:
    """The task's recorded exit status; None when it never finished (not run, running, killed)."""
    path = Path(task.dir) / "exit_code"
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def missing(tasks: list[Task]) -> list[int]:
    """Indices of the tasks without exit status 0."""
    return [t.index for t in tasks if status(t) != 0]


def array_spec(indices: list[int]) -> str:
    """``0-3,5,7-8``: sbatch --array's form of a sorted index list."""
    parts, run = [], []
    for i in sorted(indices):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def log_path(out: Path, index: int) -> Path:
    return out / "logs" / f"task-{index}.out"


def _eval_rows(task: Task) -> list[dict[str, str]]:
    doc = json.loads((Path(task.dir) / "results.json").read_text())
    rows = []
    for per_ds in doc["results"].values():  # one model per task: its checkpoint label
        for ds, m in per_ds.items():
            row = {**task.labels, "dataset": ds, "problems": str(m["problems"]),
                   "avg": f"{100 * m['avg']['mean']:.1f}"}
            row.update({f"pass@{k}": f"{100 * v:.1f}" for k, v in m["pass_at"].items() if v is not None})
            rows.append(row)
    return rows


def _seed_rows(task: Task) -> list[dict[str, str]]:
    lines = (Path(task.dir) / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    keep = [k for k in last if k == "step" or k.startswith(("reward/mean", "reward/accuracy"))]
    return [{**task.labels, **{k: f"{last[k]:.4g}" if isinstance(last[k], float) else str(last[k]) for k in keep}}]


@dataclass
class Gathered:
    """What ``gather`` found."""

    rows: list[dict[str, str]]
    """One row per result (eval: per model x dataset; seeds: each run's last step)."""
    failed: list[str]
    """One line per failed or unfinished task: index, labels, status, log path."""


def gather(out: Path) -> Gathered:
    """Read every task's results; write ``OUT/results.md`` and ``OUT/results.csv``."""
    kind, tasks = load_tasks(out)
    rows, failed = [], []
    for t in tasks:
        code = status(t)
        what = ", ".join(f"{k} {v}" for k, v in t.labels.items())
        if code != 0:
            state = "never finished (not run yet, running, or killed)" if code is None else f"exit status {code}"
            failed.append(f"task {t.index} ({what}): {state}; log {log_path(out, t.index)}")
            continue
        try:
            rows += _eval_rows(t) if kind == "eval" else _seed_rows(t)
        except (OSError, ValueError, KeyError, IndexError) as e:
            failed.append(f"task {t.index} ({what}): exit status 0 but no readable results ({e}); "
                          f"log {log_path(out, t.index)}")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    (out / "results.md").write_text(markdown(rows, columns, failed))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    (out / "results.csv").write_text(buf.getvalue())
    return Gathered(rows, failed)


def markdown(rows: list[dict[str, str]], columns: list[str], failed: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] if columns else ["(no results)"]
    lines += ["| " + " | ".join(r.get(c, "") for c in columns) + " |" for r in rows]
    if failed:
        lines += ["", "Failed or unfinished tasks:", *[f"- {x}" for x in failed]]
    return "\n".join(lines) + "\n"
