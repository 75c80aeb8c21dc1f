"""The results: ``results.json`` (every figure) and ``results.md`` (the tables).

Both are pure functions of the sample records and the problem list, so a resumed run that
ends with the same records writes the same files. ``results.md`` holds a summary table
(avg@n of every model on every dataset) and one table per dataset with a row per model.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_rl.eval.metrics import ProblemSamples, summarize
from megatron_rl.eval.problems import EvalProblem
from megatron_rl.eval.records import SampleRecord


def problem_samples(records: Sequence[SampleRecord]) -> ProblemSamples:
    """One problem's records (any order) as the metrics' input, in sample order."""
    rs = sorted(records, key=lambda r: r.sample)
    return ProblemSamples(
        correct=[r.correct for r in rs], lengths=[r.response_tokens for r in rs],
        truncated=[r.finish_reason == "length" for r in rs],
        answers=[r.answer for r in rs] if all(r.kind == "math" for r in rs) else None,
        grader_failed=sum(r.grader_failed for r in rs))


def compute_results(records: dict[Any, SampleRecord], models: Sequence[str],
                    problems: Sequence[EvalProblem], n: int) -> dict[str, dict[str, Any]]:
    """model -> dataset -> metrics dict (``DatasetMetrics.to_dict`` plus ``incomplete``: problems
    left out because some of their n samples are missing)."""
    by_problem: dict[tuple[str, str, int], list[SampleRecord]] = defaultdict(list)
    for r in records.values():
        if r.sample < n:
            by_problem[(r.model, r.dataset, r.problem)].append(r)
    datasets = list(dict.fromkeys(p.dataset for p in problems))
    out: dict[str, dict[str, Any]] = {}
    for model in models:
        out[model] = {}
        for ds in datasets:
            groups = [by_problem.get((model, ds, p.index), []) for p in problems if p.dataset == ds]
            full = [problem_samples(g) for g in groups if len(g) == n]
            if not full:
                continue
            out[model][ds] = {**summarize(full).to_dict(), "incomplete": len(groups) - len(full)}
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _avg_cell(m: dict[str, Any]) -> str:
    avg = m["avg"]
    if avg["low"] is None:
        return _pct(avg["mean"])
    return f"{_pct(avg['mean'])} ({_pct(avg['low'])}-{_pct(avg['high'])})"


def markdown(results: dict[str, dict[str, Any]], n: int) -> str:
    """The tables of ``results.md`` (percentages, one decimal)."""
    models = list(results)
    datasets = list(dict.fromkeys(ds for m in results.values() for ds in m))
    lines = [f"# Evaluation: avg@{n}, pass@k, maj@{n} (percent; 95% interval of avg@{n} in brackets)", "",
             "## Summary (avg@n)", "", "| model | " + " | ".join(datasets) + " |",
             "|---|" + "---|" * len(datasets)]
    for model in models:
        cells = [_pct(results[model][ds]["avg"]["mean"]) if ds in results[model] else "-" for ds in datasets]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    for ds in datasets:
        rows = [(model, results[model][ds]) for model in models if ds in results[model]]
        ks = list(rows[0][1]["pass_at"])
        has_maj = any(m["maj"] is not None for _, m in rows)
        head = ["model", "problems", f"avg@{n} (95% CI)", *[f"pass@{k}" for k in ks],
                *([f"maj@{n}"] if has_maj else []), "mean length", "truncated"]
        lines += ["", f"## {ds}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for model, m in rows:
            cells = [model, str(m["problems"]), _avg_cell(m), *[_pct(m["pass_at"].get(k)) for k in ks],
                     *([_pct(m["maj"])] if has_maj else []), f"{m['length_mean']:.1f}", _pct(m["truncated"])]
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"{model}: {m['incomplete']} problems lacked samples and are left out"
                 for model, m in rows if m["incomplete"]]
        notes += [f"{model}: {m['grader_failed']} samples could not be graded (counted wrong)"
                  for model, m in rows if m["grader_failed"]]
        lines += [""] + [f"- {x}" for x in notes] if notes else []
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, results: dict[str, dict[str, Any]], settings: dict[str, Any], n: int) -> None:
    """``results.json`` and ``results.md`` in ``out_dir`` (each replaced atomically)."""
    _write(out_dir / "results.json", json.dumps({"settings": settings, "results": results}, indent=1) + "\n")
    _write(out_dir / "results.md", markdown(results, n))


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

