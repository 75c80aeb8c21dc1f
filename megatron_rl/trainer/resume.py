"""Where a run starts: its own latest checkpoint, a previous stage's, or the model fresh.

Precedence: ``checkpoint.resume`` (``auto``: this run's ``checkpoint.dir/latest`` when it
exists; a path: that checkpoint; ``none``: never resume) wins over ``checkpoint.init_from``
(a previous stage), which wins over a fresh start from ``model.path``. A resume restores
everything (weights, optimizer, RNG streams, step, data position); a stage keeps weights,
optimizer state, step count and, when its training files are the same, the data position,
while its new response length, group size or batch size apply from its first step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from megatron_rl.checkpoint import io
from megatron_rl.config.run import RunConfig
from megatron_rl.errors import CheckpointError


@dataclass(frozen=True)
class StartPoint:
    kind: Literal["fresh", "resume", "stage"]
    path: Path | None = None
    """The checkpoint step directory to load (None when fresh)."""


def find_start(cfg: RunConfig) -> StartPoint:
    ck = cfg.checkpoint
    if ck.resume not in ("auto", "none"):
        return StartPoint("resume", io.resolve(ck.resume))
    if ck.resume == "auto" and ck.dir:
        latest = io.read_latest(Path(ck.dir)) if Path(ck.dir).exists() else None
        if latest is not None:
            return StartPoint("resume", latest)
    if ck.init_from:
        if not Path(ck.init_from).exists():
            raise CheckpointError(
                f"`checkpoint.init_from` is `{ck.init_from}`, which does not exist: point it at the previous "
                "stage's checkpoint directory (its `checkpoint.dir`, or one `step_XXXXXXXX/` in it).")
        return StartPoint("stage", io.resolve(ck.init_from))
    return StartPoint("fresh")
