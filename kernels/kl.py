"""Per-token KL estimators between the policy and a reference policy, from log-probs.

Schulman's estimators of KL(pi || pi_ref) for a token sampled from pi, written with
``delta = log pi_ref(y) - log pi(y)`` (J. Schulman, "Approximating KL divergence", 2020,
http://joschu.net/blog/kl-approx.html):

    k1  = -delta                        unbiased, high variance, can be negative
    k2  = delta**2 / 2                  biased, low variance ("mse")
    k3  = exp(delta) - delta - 1        unbiased, low variance, >= 0 ("low_var_kl")
    abs = |delta|

Departures, as in verl's ``kl_penalty`` (so recipes ported from verl behave the same): k3
clamps ``delta`` to [-20, 20] before ``exp`` (no overflow to inf for a token the reference
finds impossible) and clamps the result to [-10, 10]; both clamps stop the gradient outside
their range.

No fused kernel here, on purpose: the inputs are two ``[N]`` vectors of log-probs that
come from two different forward passes (policy and reference model, different weights and
hidden states), so there is no vocabulary pass to share; the estimators are a handful of
element-wise ops on O(N) data, already memory-trivial next to the output layer.
``megatron_rl.algos.kl`` owns how KL enters the loss (masking, aggregation, detaching the
reference); these element-wise terms are kept identical to its estimators, which
tests/kernels/test_kernels_kl.py checks.

Shape suffix: N tokens (any shape works; the ops are element-wise).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def kl_k1(logprob_N: torch.Tensor, ref_logprob_N: torch.Tensor) -> torch.Tensor:
    """log pi - log pi_ref."""
    return logprob_N - ref_logprob_N


def kl_k2(logprob_N: torch.Tensor, ref_logprob_N: torch.Tensor) -> torch.Tensor:
    """(log pi - log pi_ref)^2 / 2."""
    return 0.5 * (logprob_N - ref_logprob_N).square()


def kl_k3(logprob_N: torch.Tensor, ref_logprob_N: torch.Tensor) -> torch.Tensor:
    """exp(d) - d - 1 with d = log pi_ref - log pi clamped to [-20, 20]; result in [-10, 10]."""
    delta_N = (ref_logprob_N - logprob_N).clamp(min=-20.0, max=20.0)
    return (torch.exp(delta_N) - delta_N - 1.0).clamp(min=-10.0, max=10.0)


def kl_abs(logprob_N: torch.Tensor, ref_logprob_N: torch.Tensor) -> torch.Tensor:
    """|log pi - log pi_ref|."""
    return (logprob_N - ref_logprob_N).abs()


# The names megatron_rl.algos.kl accepts (``low_var_kl`` is verl's name for k3).
KL_ESTIMATORS: dict[str, KLEstimator] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
    "abs": kl_abs,
    "low_var_kl": kl_k3,
}


def kl_estimate(
    logprob_N: torch.Tensor, ref_logprob_N: torch.Tensor, estimator: str = "k3"
) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate by estimator name (see ``KL_ESTIMATORS``)."""
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(
            f"unknown KL estimator {estimator!r}; choose one of {sorted(KL_ESTIMATORS)}"
        ) from None
    return fn(logprob_N, ref_logprob_N)
