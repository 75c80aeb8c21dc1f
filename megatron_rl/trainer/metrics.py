"""Per-step and evaluation metrics computed from scored samples (pure functions)."""

from __future__ import annotations

from collections import defaultdict
from math import comb

from megatron_rl.trainer.samples import ScoredSample


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


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def eval_metrics(groups: list[list[ScoredSample]], pass_k: list[int]) -> dict[str, float]:
    """avg@n accuracy (mean score) and pass@k, overall and per ``data_source``."""
    out: dict[str, float] = {}
    by_source: dict[str, list[list[ScoredSample]]] = defaultdict(list)
    for g in groups:
        by_source[g[0].data_source].append(g)
    for prefix, gs in [("eval", groups)] + [(f"eval/{k}", v) for k, v in sorted(by_source.items())]:
        out[f"{prefix}/accuracy"] = _mean([_mean([float(x.score >= 1.0) for x in g]) for g in gs])
        for k in pass_k:
            out[f"{prefix}/pass@{k}"] = _mean([pass_at_k(len(g), sum(x.score >= 1.0 for x in g), k) for g in gs])
        out[f"{prefix}/length_mean"] = _mean([float(len(x.response_ids)) for g in gs for x in g])
    out["eval/problems"] = float(len(groups))
    return out
