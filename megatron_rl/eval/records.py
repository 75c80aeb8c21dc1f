"""``samples.jsonl``: one graded sample per line, appended as each finishes.

The file is the run's state: a resumed run reads it, skips every (model, dataset, problem,
sample) already there, and generates the rest with the same seeds. A process killed while
writing leaves at most one torn last line; it is cut off on open (that sample is simply
generated again). ``run.json`` beside it records the settings that shaped the samples, so
resuming with different ones is refused instead of mixing two evaluations in one table.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from megatron_rl.errors import UserError

Key = tuple[str, str, int, int]
"""(model, dataset, problem index, sample index)."""


@dataclass
class SampleRecord:
    """One graded sample: a line of ``samples.jsonl``."""

    model: str
    """The ``--model`` value it came from."""
    dataset: str
    problem: int
    """0-based row of the problem in its file."""
    sample: int
    """0 .. n-1."""
    seed: int
    """The request's sampling seed (a function of --seed, problem and sample index)."""
    data_source: str
    kind: str
    """Grader used: math or code."""
    response: str
    """The decoded response text."""
    response_tokens: int
    finish_reason: str
    """stop or length."""
    score: float
    grade: str
    """The grader's reason ("correct", "wrong_answer: ...", "grader_error: ...")."""
    answer: str | None = None
    """Math: the normalised final answer maj@n votes with; None otherwise."""
    prefix: str = ""
    """What the chat template's generation prompt already opened (``<think>\\n``): a
    transcript's assistant turn is prefix + response."""

    @property
    def key(self) -> Key:
        return (self.model, self.dataset, self.problem, self.sample)

    @property
    def correct(self) -> bool:
        return self.score >= 1.0

    @property
    def grader_failed(self) -> bool:
        return self.grade.startswith("grader_error")


_FIELDS = {f.name for f in fields(SampleRecord)}


class SampleStore:
    """The records of ``path`` (loaded on open) and an append handle for new ones."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: dict[Key, SampleRecord] = {}
        if self.path.exists():
            self._load()
        self._out = open(self.path, "a")

    def _load(self) -> None:
        raw = self.path.read_bytes()
        keep = raw if raw.endswith(b"\n") or not raw else raw[:raw.rfind(b"\n") + 1]
        if len(keep) != len(raw):  # a torn last line from a killed run
            with open(self.path, "r+b") as f:
                f.truncate(len(keep))
        for n, line in enumerate(keep.decode().splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                rec = SampleRecord(**{k: v for k, v in d.items() if k in _FIELDS})
            except (ValueError, TypeError) as e:
                raise UserError(f"{self.path}, line {n}: not a sample record ({e}). The file was edited "
                                "or belongs to something else: move it away to start afresh.") from None
            self.records[rec.key] = rec

    def add(self, rec: SampleRecord) -> None:
        """Append and flush (a kill right after loses nothing written before)."""
        self._out.write(json.dumps(asdict(rec), ensure_ascii=False) + "\n")
        self._out.flush()
        self.records[rec.key] = rec

    def close(self) -> None:
        self._out.close()

    def __contains__(self, key: Key) -> bool:
        return key in self.records


def check_settings(path: Path, settings: dict[str, Any]) -> None:
    """Write ``settings`` to ``path`` (run.json), or refuse if it holds different ones."""
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old is not None:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if diff:
                shown = ", ".join(f"{k}: {old.get(k)!r} then, {settings.get(k)!r} now" for k in diff[:4])
                raise UserError(f"{path.parent} holds samples made with other settings ({shown}). "
                                "Resuming would mix two evaluations in one table: pass the same "
                                "settings, or a new --out directory.")
            return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings, indent=1, sort_keys=True))
    os.replace(tmp, path)
