"""Graded samples -> the chat parquet ``megatron-rl sft`` reads (distillation traces).

One row per kept sample, in (dataset, problem, sample) order: ``messages`` = the problem's
prompt messages + ``{"role": "assistant", "content": prefix + response}`` (``prefix`` is what
the template's generation prompt opened, e.g. ``<think>\\n`` for R1-Distill, so the turn
reads as the model wrote it), plus provenance columns (``dataset``, ``problem``, ``sample``,
``data_source``, ``score``, ``grade``, ``finish_reason``, ``response_tokens``) that SFT ignores.
``keep="correct"`` keeps samples graded correct (score >= 1), as Open-R1 filtered its traces;
``"all"`` keeps every sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from megatron_rl.errors import UserError
from megatron_rl.eval.problems import EvalProblem
from megatron_rl.eval.records import SampleRecord

KEEP = ("correct", "all")


def trace_rows(records: dict, problems: Sequence[EvalProblem], model: str, n: int, keep: str) -> list[dict]:
    """The parquet rows (module doc) of ``model``'s samples of ``problems``."""
    if keep not in KEEP:
        raise UserError(f"--keep {keep}: use one of {', '.join(KEEP)}.")
    rows = []
    for p in problems:
        for i in range(n):
            r: SampleRecord | None = records.get((model, p.dataset, p.index, i))
            if r is None or (keep == "correct" and not r.correct):
                continue
            rows.append({"messages": [*p.messages, {"role": "assistant", "content": r.prefix + r.response}],
                         "dataset": p.dataset, "problem": p.index, "sample": i, "data_source": p.data_source,
                         "score": r.score, "grade": r.grade, "finish_reason": r.finish_reason,
                         "response_tokens": r.response_tokens})
    return rows


def write_traces(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` as parquet (``messages``: list<struct<role, content>>), atomically."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema([("messages", pa.list_(message)), ("dataset", pa.string()), ("problem", pa.int64()),
                        ("sample", pa.int64()), ("data_source", pa.string()), ("score", pa.float64()),
                        ("grade", pa.string()), ("finish_reason", pa.string()), ("response_tokens", pa.int64())])
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    os.replace(tmp, path)
