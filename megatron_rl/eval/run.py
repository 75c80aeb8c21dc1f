"""The one driver behind ``megatron-rl eval`` and ``generate``: per model, open the servers (or
attach), sample what ``samples.jsonl`` lacks, grade it; then the caller writes its output."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megatron_rl.errors import UserError
from megatron_rl.eval.backends import SamplingSettings
from megatron_rl.eval.models import ServeSettings, open_backend
from megatron_rl.eval.problems import EvalProblem
from megatron_rl.eval.records import SampleStore, check_settings
from megatron_rl.eval.sampling import SamplingJob, sample_all

log = logging.getLogger(__name__)


@dataclass
class GradingSettings:
    """How samples are graded."""

    default_kind: str = "math"
    """Grader of data sources that name neither math nor code."""
    workers: int = 2
    math_timeout_s: float = 10.0
    code_timeout_s: float = 6.0
    require_think_close: bool = False


@dataclass
class SamplingRun:
    """Everything one invocation samples: models x problems x n."""

    models: list[str]
    problems: list[EvalProblem]
    n: int
    seed: int
    sampling: SamplingSettings
    serve: ServeSettings
    grading: GradingSettings = field(default_factory=GradingSettings)

    def settings(self) -> dict[str, Any]:
        """What shapes the samples (run.json): a resume with different values is refused."""
        return {"n": self.n, "seed": self.seed, **asdict(self.sampling), "chat_template": self.serve.chat_template,
                "default_grader": self.grading.default_kind,
                "require_think_close": self.grading.require_think_close}


def sample_models(run: SamplingRun, samples_path: Path, settings_path: Path,
                  work_dir: Path) -> tuple[SampleStore, int]:
    """Fill ``samples_path`` for every model (resuming what is there). Returns the store (closed)
    and how many samples could not be generated (``missing_error`` words the error)."""
    from megatron_rl.rewards import RewardPool

    check_settings(settings_path, run.settings())
    store = SampleStore(samples_path)
    g = run.grading
    missing = 0
    try:
        with RewardPool(g.workers, math_timeout_s=g.math_timeout_s, code_timeout_s=g.code_timeout_s,
                        require_think_close=g.require_think_close) as pool:
            for model in run.models:
                if _complete(store, model, run.problems, run.n):
                    log.info("%s: all %d samples already in %s", model, len(run.problems) * run.n, samples_path)
                    continue
                job = SamplingJob(model, run.n, run.seed, g.default_kind)
                with open_backend(model, work_dir, run.serve, run.sampling) as backend:
                    missing += asyncio.run(_sample(backend, pool, store, run.problems, job))
    finally:
        store.close()
    return store, missing


def missing_error(missing: int, samples_path: Path) -> UserError:
    return UserError(f"{missing} samples came back aborted three times and are not in {samples_path}; "
                     "the output covers complete problems only. Run the same command again to retry them.")


async def _sample(backend, pool, store, problems: Sequence[EvalProblem], job: SamplingJob) -> int:
    try:
        return await sample_all(backend, pool, store, problems, job)
    finally:
        await backend.close()


def _complete(store: SampleStore, model: str, problems: Sequence[EvalProblem], n: int) -> bool:
    return all((model, p.dataset, p.index, i) in store for p in problems for i in range(n))
