"""Benchmark files: parquet in the training schema, one dataset per file.

A dataset is named by its file's stem (``aime24.parquet`` -> ``aime24``); two files with the
same stem are an error, since their rows would mix in the table. Problem ``index`` is the
0-based row in its file: what ``samples.jsonl`` and the per-sample seeds are keyed by. Rows
are checked with the training reader's cell checks (``data.schema``); nothing is dropped for
length (a benchmark scored on fewer problems than it has is a different benchmark).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_rl.data.parquet import ParquetSource
from megatron_rl.data.schema import (
    Message,
    Where,
    decode_answer,
    decode_data_source,
    decode_extra_info,
    decode_prompt,
)
from megatron_rl.errors import DataError


@dataclass(frozen=True)
class EvalProblem:
    """One benchmark row."""

    dataset: str
    """The file's stem."""
    index: int
    """0-based row in the file."""
    prompt: str | list[Message]
    """As stored: text (one user message) or chat messages."""
    answer: str | list[str]
    """Ground truth for the grader (code: the tests' JSON text)."""
    data_source: str
    """Picks the grader."""
    extra_info: dict[str, Any]

    @property
    def messages(self) -> list[Message]:
        """The prompt as chat messages."""
        return [{"role": "user", "content": self.prompt}] if isinstance(self.prompt, str) else list(self.prompt)


def dataset_names(files: Sequence[str]) -> list[str]:
    """The dataset name of each file (its stem); DataError on repeated names."""
    names = [Path(f).stem for f in files]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"Several --data files are named {repeated[0]!r} (a dataset is named by its "
                        f"file's stem, and the table keeps datasets apart by name): rename one of "
                        f"{[f for f in files if Path(f).stem == repeated[0]]}.")
    return names


def load_problems(files: Sequence[str], prompt_key: str = "prompt",
                  answer_key: str = "answer") -> list[EvalProblem]:
    """Every row of every file, checked, in file then row order."""
    out: list[EvalProblem] = []
    for name, path in zip(dataset_names(files), files):
        source = ParquetSource([path], required=[prompt_key, answer_key, "data_source"],
                               optional=["extra_info"])
        for rg in source.row_groups():
            for j, row in enumerate(rg.rows):
                i = rg.first_row_in_file + j
                out.append(EvalProblem(
                    dataset=name, index=i,
                    prompt=decode_prompt(row[prompt_key], Where(path, i, prompt_key)),
                    answer=decode_answer(row[answer_key], Where(path, i, answer_key)),
                    data_source=decode_data_source(row["data_source"], Where(path, i, "data_source")),
                    extra_info=decode_extra_info(row.get("extra_info"), Where(path, i, "extra_info"))))
    return out
