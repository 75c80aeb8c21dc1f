"""Generation (rank 0): every sample its own seeded request, graded as soon as it arrives.

Why one request per sample: SGLang derives a seeded sample's random numbers from the seed
and the position only, so ``n`` samples sent as one request with one ``sampling_seed`` come
out identical and every group advantage is 0. Each sample therefore carries its own seed,
a hash of (run seed, step, round, problem uid, sample index): generation is reproducible
sample by sample, which exact resume needs.

A sample that comes back aborted (a server paused, restarted or lost mid-request) is asked
again with the same seed, ``rollout.max_abort_retries`` times; then its whole group is
dropped, never graded as a wrong answer. Dynamic sampling (DAPO) generates further rounds of
new problems until ``prompts_per_step`` groups with differing rewards are kept.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from megatron_rl import algos
from megatron_rl.config.run import RunConfig
from megatron_rl.rewards import RewardItem, RewardPool
from megatron_rl.rollout.client import RolloutClient
from megatron_rl.rollout.types import RolloutRequest, Sample, SamplingParams
from megatron_rl.trainer.samples import ScoredSample

log = logging.getLogger(__name__)

CODE_SOURCES = ("deepcoder", "taco", "lcb", "livecodebench", "primeintellect", "codeforces", "apps",
                "code_contests", "kodcode", "humaneval", "mbpp")
MATH_SOURCES = ("deepscaler", "math", "aime", "amc", "gsm8k", "omni", "still", "arithmetic", "olympiad",
                "minerva")


def grader_kind(data_source: str, default: str) -> str:
    """Which grader a data source needs: known code / math sources by name, else ``default``."""
    name = data_source.lower()
    if name.startswith(CODE_SOURCES):
        return "code"
    if name.startswith(MATH_SOURCES):
        return "math"
    return default


def sample_seed(run_seed: int, step: int, round_: int, uid: int, index: int) -> int:
    """A 31-bit seed that depends on nothing but the sample's identity."""
    key = f"{run_seed}/{step}/{round_}/{uid}/{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % (2**31 - 1)


async def gather_all(coros: list) -> list:
    """Results in order; the first failure cancels the rest (no orphaned requests or stray
    "exception was never retrieved" tracebacks) and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as tasks:
            futures = [tasks.create_task(c) for c in coros]
    except BaseExceptionGroup as group:
        leaf = group
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        raise leaf from None
    return [f.result() for f in futures]


@dataclass
class GenerationResult:
    groups: list[list[ScoredSample]]
    """Kept groups, in problem order; each holds n samples."""
    metrics: dict[str, float] = field(default_factory=dict)


class Generator:
    """Rank 0's generation phase: the client, the reward pool and the tokenizer to decode."""

    def __init__(self, cfg: RunConfig, client: RolloutClient, pool: RewardPool, tokenizer: Any):
        from megatron_rl.data.template import stop_token_ids

        self.cfg, self.client, self.pool, self.tokenizer = cfg, client, pool, tokenizer
        # The template's end-of-turn tokens, not only the tokenizer's EOS (they differ for some).
        self.stop_ids = tuple(stop_token_ids(tokenizer, cfg.data)) if hasattr(tokenizer, "convert_tokens_to_ids") else ()

    def sampling(self, *, seed: int, eval_mode: bool = False) -> SamplingParams:
        r, e = self.cfg.rollout, self.cfg.eval
        if eval_mode:
            return SamplingParams(temperature=e.temperature, top_p=e.top_p, top_k=-1,
                                  max_new_tokens=e.max_new_tokens, n=1, seed=seed, stop_token_ids=self.stop_ids)
        return SamplingParams.from_config(r, n=1, seed=seed, stop_token_ids=self.stop_ids)

    async def _one(self, problem, index: int, step: int, round_: int, eval_mode: bool,
                   counts: Counter) -> ScoredSample | None:
        seed = sample_seed(self.cfg.seed, step, round_, problem.uid, index)
        params = self.sampling(seed=seed, eval_mode=eval_mode)
        tag = "eval" if eval_mode else "train"
        sample: Sample | None = None
        for attempt in range(self.cfg.rollout.max_abort_retries + 1):
            rid = f"{tag}-s{step}-r{round_}-u{problem.uid}-i{index}-a{attempt}"
            (sample,) = await self.client.generate([RolloutRequest(rid, problem.prompt_ids, params)])
            if sample.finish_reason != "abort":
                break
            counts["rollout/aborted"] += 1
        if sample is None or sample.finish_reason == "abort":
            return None
        text = self.tokenizer.decode(sample.response_ids, skip_special_tokens=True)
        kind = grader_kind(problem.data_source, self.cfg.reward.kind)
        loop = asyncio.get_running_loop()
        future = await loop.run_in_executor(None, self.pool.submit, RewardItem(kind, text, problem.answer))
        grade = await asyncio.wrap_future(future)
        return ScoredSample(
            uid=problem.uid, group=-1, sample_index=index, prompt_ids=list(problem.prompt_ids),
            response_ids=list(sample.response_ids), rollout_logprobs=list(sample.response_logprobs),
            finish_reason=sample.finish_reason, data_source=problem.data_source, score=float(grade.score),
            reward=float(grade.score), grade_tag=grade.reason, trainable=True,
            weight_version=sample.weight_version, token_versions=sample.token_weight_versions,
            extra={"text": text})

    async def _group(self, problem, n: int, step: int, round_: int, eval_mode: bool,
                     counts: Counter) -> list[ScoredSample] | None:
        samples = await gather_all([self._one(problem, i, step, round_, eval_mode, counts) for i in range(n)])
        if any(s is None for s in samples):
            counts["rollout/groups_dropped_aborted"] += 1
            return None
        return list(samples)  # type: ignore[arg-type]

    async def run_groups(self, problems: list, n: int, step: int, round_: int = 0,
                         eval_mode: bool = False) -> tuple[list[list[ScoredSample]], Counter]:
        """Generate and grade ``n`` samples of each problem; groups lost to aborts are dropped."""
        counts: Counter = Counter()
        groups = await gather_all([self._group(p, n, step, round_, eval_mode, counts) for p in problems])
        return [g for g in groups if g is not None], counts

    async def step(self, stream, step: int) -> GenerationResult:
        """One training step's groups: ``prompts_per_step`` problems, refilled under dynamic sampling."""
        cfg = self.cfg
        target, n = cfg.train.prompts_per_step, cfg.rollout.n_samples
        counts: Counter = Counter()
        scored: list[list[ScoredSample]] = []
        problems = stream.take(target)
        rounds = cfg.algorithm.dynamic_sampling_max_rounds if cfg.algorithm.dynamic_sampling else 1
        metrics: dict[str, float] = {}
        for round_ in range(rounds):
            groups, c = await self.run_groups(problems, n, step, round_)
            counts.update(c)
            scored.extend(groups)
            if not cfg.algorithm.dynamic_sampling:
                break
            result = algos.dynamic_sampling(scored, lambda g: [s.score for s in g], target)
            metrics.update(result.metrics)
            if result.num_needed == 0:
                break
            if round_ + 1 < rounds:
                problems = stream.take(result.num_needed)
        if cfg.algorithm.dynamic_sampling:
            kept = algos.dynamic_sampling(scored, lambda g: [s.score for s in g], target)
            metrics.update(kept.metrics)
            scored = kept.kept
            metrics["sampling/rounds"] = float(round_ + 1)
        for gi, group in enumerate(scored):
            for s in group:
                s.group = gi
        metrics.update({k: float(v) for k, v in counts.items()})
        return GenerationResult(scored, metrics)
