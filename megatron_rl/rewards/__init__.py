"""Rewards: verifiable graders for math and code, and a pool that runs them concurrently.

Public API
----------
``get_reward_fn(name)``
    "math" -> ``math.compute_score(response, ground_truth) -> float`` (DeepScaleR: last
    ``\\boxed{}`` after ``</think>``, equivalence by normalisation, sympy and math-verify;
    graded in a worker process under a time limit).
    "code" -> ``code.compute_score(response, tests, *, timeout_s=6.0) -> float``
    (DeepCoder: last fenced Python block, 1.0 only if every test passes; stdin/stdout,
    call-based and assert-based tests; run in a sandbox).
``RewardPool(num_workers, max_queue)`` with ``score_batch(items) -> list[float]`` and
    ``grade_batch(items) -> list[Grade]`` over ``RewardItem(kind, response, reference)``:
    concurrent, bounded queue, results in input order; a grader's own failure is logged,
    scored 0.0 and marked ``Grade.grader_failed`` (unknown, for the trainer to mask).
``Grade(score, reason)``: what graders return when the reason matters.
``sandbox_protections(backend="auto")``: which sandbox protections hold on this machine.

Layering: nothing here imports torch or any ``megatron_rl`` module except
``megatron_rl.errors``; reward workers stay light. Submodules that pull in sympy or
math-verify are imported lazily.
"""

from __future__ import annotations

from collections.abc import Callable

from megatron_rl.errors import ConfigError
from megatron_rl.rewards.grade import Grade
from megatron_rl.rewards.pool import RewardItem, RewardPool
from megatron_rl.rewards.sandbox_setup import Protections, SandboxLimits

REWARD_NAMES = ("math", "code")

__all__ = ["REWARD_NAMES", "Grade", "Protections", "RewardItem", "RewardPool",
           "SandboxLimits", "get_reward_fn", "sandbox_protections"]


def get_reward_fn(name: str) -> Callable[..., float]:
    """The ``compute_score`` function registered under ``name`` ("math" or "code")."""
    if name == "math":
        from megatron_rl.rewards.math import compute_score as math_score

        return math_score
    if name == "code":
        from megatron_rl.rewards.code import compute_score as code_score

        return code_score
    raise ConfigError(f"unknown reward function {name!r}; the registered rewards are "
                      f"{', '.join(REWARD_NAMES)}. Set the reward name to one of them.")


def sandbox_protections(backend: str = "auto") -> Protections:
    """Which protections the code sandbox gives on this machine (probes once, cached)."""
    from megatron_rl.rewards.sandbox_setup import detect

    return detect(backend).protections
