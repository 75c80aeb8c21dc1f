"""Settings and outcomes shared by the benchmark converters (``data.benchmarks``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Options:
    """Per-run settings from the command line; only LiveCodeBench reads them today."""

    release_version: str | None = None
    """LiveCodeBench release (``release_v5``, ``v6``, ``v4_v5``...): which ``test*.jsonl`` files."""
    start: datetime | None = None
    """Keep problems whose contest date is at or after this (LiveCodeBench)."""
    end: datetime | None = None
    """Keep problems whose contest date is at or before this (LiveCodeBench)."""
    float_tol: float | None = None
    """The code grader's ``float_tol`` for every row (None: exact, LiveCodeBench's rule)."""


@dataclass(frozen=True)
class Skip:
    """A record deliberately left out (not malformed), counted by reason in the report."""

    reason: str
