"""Benchmark metrics from graded samples: pure functions, no I/O.

Per problem there are ``n`` samples, each graded correct or not (score >= 1). Per dataset:

* **avg@n** = (1/P) sum_p c_p / n_p: the mean per-sample accuracy, averaged over problems
  (what DeepScaleR reports as "pass@1" of 16 samples). Its 95% interval is the normal
  approximation over problems: with a_p = c_p / n_p, ``se = stdev(a_p) / sqrt(P)``
  (sample standard deviation, ddof 1), interval ``avg +- 1.96 se`` clipped to [0, 1]. It
  covers the spread between problems and the sampling noise inside each a_p; with fewer
  than 2 problems it is undefined (None).
* **pass@k** (Chen et al., 2021, the Codex paper's unbiased estimator) per problem:
  ``1 - C(n - c, k) / C(n, k)``, the chance that k samples drawn without replacement from
  the n contain a correct one; exact for every k <= n (``math.comb``, no float products),
  refused for k > n (it cannot be estimated from n samples). Averaged over problems.
* **maj@n** (math only): the majority vote over the samples' extracted, normalised final
  answers (``rewards.math_extract``: last ``\\boxed{}``, presentation stripped). Samples
  without an answer do not vote; a problem where none has one scores 0. Ties go to the
  answer that appears first in sample order (lowest sample index), so the vote is a pure
  function of the samples. The vote is correct when that answer's first sample was graded
  correct. Answers equal only after symbolic simplification (``1/2`` vs ``0.5``) are
  counted as different answers: the vote compares strings, not values.
* **length** = mean response tokens over all samples; **truncated** = the share of samples
  that stopped at the token budget (finish reason ``length``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

Z95 = 1.959963984540054
"""The standard normal's 97.5% quantile (two-sided 95%)."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct among ``n`` samples (module doc)."""
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got n={n}, c={c}")
    if k < 1:
        raise ValueError(f"pass@k needs k >= 1, got k={k}")
    if k > n:
        raise ValueError(f"pass@{k} cannot be estimated from {n} samples per problem (k > n); "
                         f"sample at least {k} per problem or ask for k <= {n}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_k_values(n: int) -> list[int]:
    """The k reported for n samples: 1, 2, 4, ... (powers of two below n), then n itself."""
    if n < 1:
        raise ValueError(f"need n >= 1 samples per problem, got {n}")
    ks = [1 << i for i in range(n.bit_length()) if (1 << i) < n]
    return ks + [n]


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% interval (``low``/``high`` None when undefined)."""

    mean: float
    low: float | None
    high: float | None


def mean_with_interval(values: Sequence[float]) -> Interval:
    """Mean of per-problem values and its 95% normal-approximation interval (module doc)."""
    if not values:
        return Interval(0.0, None, None)
    p = len(values)
    mean = math.fsum(values) / p
    if p < 2:
        return Interval(mean, None, None)
    var = math.fsum((v - mean) ** 2 for v in values) / (p - 1)
    half = Z95 * math.sqrt(var / p)
    return Interval(mean, max(0.0, mean - half), min(1.0, mean + half))


def majority_index(answers: Sequence[str | None]) -> int | None:
    """Sample index of the majority answer's first occurrence; None when no sample has one.

    Ties between equally frequent answers go to the one seen first (lowest sample index).
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    first = {}
    for i, a in enumerate(answers):
        if a is not None and a not in first:
            first[a] = i
    best = min(counts, key=lambda a: (-counts[a], first[a]))
    return first[best]


def maj_at_n(answers: Sequence[str | None], correct: Sequence[bool]) -> float:
    """1.0 when the majority answer (``majority_index``) was graded correct, else 0.0."""
    if len(answers) != len(correct):
        raise ValueError(f"maj@n needs one answer per grade, got {len(answers)} answers and "
                         f"{len(correct)} grades")
    i = majority_index(answers)
    return float(i is not None and bool(correct[i]))


@dataclass
class ProblemSamples:
    """The graded samples of one problem, in sample order."""

    correct: list[bool]
    """Whether each sample was graded correct (score >= 1)."""
    lengths: list[int]
    """Response tokens of each sample."""
    truncated: list[bool]
    """Whether each sample stopped at the token budget."""
    answers: list[str | None] | None = None
    """Math: each sample's normalised final answer (None: no answer); None for code."""
    grader_failed: int = 0
    """Samples whose grade is unknown (grader crash or timeout), counted as wrong."""


@dataclass
class DatasetMetrics:
    """One dataset's row of the results table."""

    problems: int
    n: int
    """Samples per problem (the smallest over problems)."""
    avg: Interval
    """avg@n with its 95% interval."""
    pass_at: dict[int, float] = field(default_factory=dict)
    """k -> pass@k, for k in ``pass_k_values(n)``."""
    maj: float | None = None
    """maj@n when every problem has math answers, else None."""
    length_mean: float = 0.0
    truncated: float = 0.0
    grader_failed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pass_at"] = {str(k): v for k, v in self.pass_at.items()}
        return d


def summarize(problems: Sequence[ProblemSamples], ks: Sequence[int] | None = None) -> DatasetMetrics:
    """avg@n (with interval), pass@k, maj@n, length and truncation over ``problems``."""
    if not problems or any(not p.correct for p in problems):
        raise ValueError("summarize needs at least one problem, each with at least one sample")
    n = min(len(p.correct) for p in problems)
    ks = pass_k_values(n) if ks is None else list(ks)
    samples = [(ln, t) for p in problems for ln, t in zip(p.lengths, p.truncated)]
    math_votes = all(p.answers is not None for p in problems)
    return DatasetMetrics(
        problems=len(problems), n=n,
        avg=mean_with_interval([sum(p.correct) / len(p.correct) for p in problems]),
        pass_at={k: math.fsum(pass_at_k(len(p.correct), sum(p.correct), k) for p in problems) / len(problems)
                 for k in ks},
        maj=(math.fsum(maj_at_n(p.answers or [], p.correct) for p in problems) / len(problems)
             if math_votes else None),
        length_mean=math.fsum(ln for ln, _ in samples) / len(samples),
        truncated=sum(t for _, t in samples) / len(samples),
        grader_failed=sum(p.grader_failed for p in problems))


def math_answer(response: str) -> str | None:
    """The normalised final answer maj@n votes with (None: the response has no answer)."""
    from megatron_rl.rewards.math_extract import final_answer, normalize

    answer = final_answer(response)
    if answer is None or len(answer) > 1000:  # the math grader's MAX_ANSWER_CHARS: not an answer
        return None
    return normalize(answer) or None
