"""Per-step and evaluation metrics computed from scored samples (pure functions)."""

from __future__ import annotations

from collections import defaultdict

from megatron_rl.eval.metrics import ProblemSamples, math_answer, pass_at_k, summarize
from megatron_rl.trainer.samples import ScoredSample

__all__ = ["eval_metrics", "pass_at_k", "sample_metrics"]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def sample_metrics(samples: list[ScoredSample], max_new_tokens: int) -> dict[str, float]:
    """Reward mean and accuracy overall and per ``data_source``; response lengths and clip ratio."""
    out: dict[str, float] = {}
    by_source: dict[str, list[ScoredSample]] = defaultdict(list)
    for x in samples:
        by_source[x.data_source].append(x)
    for prefix, group in [("reward", samples)] + [(f"reward/{k}", v) for k, v in sorted(by_source.items())]:
        out[f"{prefix}/mean"] = _mean([x.reward for x in group])
        out[f"{prefix}/accuracy"] = _mean([float(x.score >= 1.0) for x in group])
    lengths = [len(x.response_ids) for x in samples]
    out["response/length_mean"] = _mean([float(n) for n in lengths])
    out["response/length_max"] = float(max(lengths, default=0))
    out["response/clip_ratio"] = _mean([float(x.finish_reason == "length") for x in samples])
    out["rollout/samples"] = float(len(samples))
    out["rollout/groups"] = float(len({x.group for x in samples}))
    out["train/masked_samples"] = float(sum(not x.trainable for x in samples))
    return out


def eval_metrics(groups: list[list[ScoredSample]], pass_k: list[int],
                 default_kind: str = "math") -> dict[str, float]:
    """avg@n accuracy (mean score), its 95% interval, pass@k, maj@n (math sources), mean length
    and truncation rate, overall and per ``data_source``: ``megatron_rl.eval.metrics`` (the
    same code as ``megatron-rl eval``). ``default_kind`` is the grader of unknown sources."""
    out: dict[str, float] = {}
    by_source: dict[str, list[list[ScoredSample]]] = defaultdict(list)
    for g in groups:
        by_source[g[0].data_source].append(g)
    for prefix, gs in [("eval", groups)] + [(f"eval/{k}", v) for k, v in sorted(by_source.items())]:
        if not gs:
            continue
        m = summarize([_problem(g, default_kind) for g in gs], ks=pass_k)
        out[f"{prefix}/accuracy"] = m.avg.mean
        if m.avg.low is not None and m.avg.high is not None:
            out[f"{prefix}/accuracy_ci95_low"], out[f"{prefix}/accuracy_ci95_high"] = m.avg.low, m.avg.high
        for k, v in m.pass_at.items():
            out[f"{prefix}/pass@{k}"] = v
        if m.maj is not None:
            out[f"{prefix}/maj@{m.n}"] = m.maj
        out[f"{prefix}/length_mean"] = m.length_mean
        out[f"{prefix}/truncated"] = m.truncated
    out["eval/problems"] = float(len(groups))
    return out


def _problem(group: list[ScoredSample], default_kind: str) -> ProblemSamples:
    from megatron_rl.trainer.generate import grader_kind

    is_math = grader_kind(group[0].data_source, default_kind) == "math"
    return ProblemSamples(
        correct=[x.score >= 1.0 for x in group], lengths=[len(x.response_ids) for x in group],
        truncated=[x.finish_reason == "length" for x in group],
        answers=[math_answer(x.extra.get("text", "")) for x in group] if is_math else None,
        grader_failed=sum(x.grader_failed for x in group))
