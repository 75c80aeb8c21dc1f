"""``actor_loss`` as a sum of per-token terms, for the fused loss-in-forward kernel.

Shape legend: B = sequences in this micro-batch, T = tokens (padded), N = B * T flattened
row-major (token (b, t) is row b * T + t, as the actor flattens hidden states), n = a chunk
of N.

For ``policy_loss = "ppo"`` every term of ``actor_loss`` is token-separable:

    actor_loss = sum_t w_t * [iw_t * pg_t(logp_t) + kl_coef * kl_t(logp_t) - entropy_coef * ent_t]

with ``pg_t`` the clipped surrogate of token t's own ratio, ``iw_t`` its rollout-correction
weight, ``kl_t`` the estimator of its own log-ratio to the reference, and ``w_t`` the
aggregation weight of ``aggregation_weights`` (0 on padding), fixed before the step by the
mask and the step's ``LossNormalizer``. So ``megatron_rl.kernels.linear_logprobs_loss`` may
take the gradient of each token's loss while that token's logits are at hand (3 passes over
the output layer instead of 4). GSPO is not separable (its ratio is a mean over the sequence):
``build_token_loss`` refuses it, and callers ask ``token_separable(cfg)`` first.

Metrics are not computed here: call ``actor_loss`` on the detached log-probs and entropy the
kernel returns (under ``torch.no_grad()``; O(N) work) to get them, and its loss value, which
equals the fused loss up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_rl.algos.aggregation import LossNormalizer
from megatron_rl.algos.kl import kl_estimate, needs_ref_logprobs
from megatron_rl.algos.policy_loss import clipped_surrogate, token_log_ratio
from megatron_rl.config.algorithm import AlgorithmConfig, LossAggMode, check_choice, choices
from megatron_rl.errors import ConfigError

# Policy losses whose per-token loss depends on that token's log-prob only.
TOKEN_SEPARABLE_POLICY_LOSSES = ("ppo",)


def token_separable(cfg: AlgorithmConfig) -> bool:
    """Whether ``actor_loss`` under ``cfg`` is a sum of per-token terms (fused path allowed)."""
    return cfg.policy_loss in TOKEN_SEPARABLE_POLICY_LOSSES


def aggregation_weights(mask_BT: Tensor, mode: str, norm: LossNormalizer) -> Tensor:
    """Per-token weights ``w_BT`` (fp32, 0 on padding) such that, for any ``x_BT``,
    ``aggregate(x_BT, mask_BT, mode, norm) == (where(mask_BT, x_BT, 0) * w_BT).sum()``.

    ``seq-mean-token-mean`` needs each sequence's length: it is taken from ``mask_BT``, so
    pass whole sequences (as ``aggregate`` assumes too).
    """
    check_choice("loss_agg_mode", mode, choices(LossAggMode))
    valid = mask_BT.bool()
    seqs = max(norm.num_seqs, 1.0)
    if mode == "seq-mean-token-mean":
        len_B = valid.sum(dim=-1).clamp(min=1).to(torch.float32)
        per_token = (1.0 / (len_B * seqs))[:, None]
    else:
        denominator = {
            "token-mean": max(norm.num_tokens, 1.0),
            "seq-mean-token-sum": seqs,
            "seq-mean-token-sum-norm": seqs * norm.max_len,
        }[mode]
        per_token = torch.tensor(1.0 / denominator, device=valid.device)
    return torch.where(valid, per_token, 0.0)


@dataclass(frozen=True)
class TokenLoss:
    """One micro-batch's ``actor_loss`` as ``token_loss_fn(logp_n, ent_n, rows) -> loss_n``.

    All fields are flattened ``[N]`` constants (detached). ``rows`` selects the tokens: a
    slice, or an index tensor (the actor maps a context-parallel rank's rows to rows of the
    whole sequences that way).
    """

    cfg: AlgorithmConfig
    old_logp_N: Tensor | None
    """None: the policy that sampled is the one being trained (one update per step), so the
    old log-probs are the current ones, detached: the ratio is 1 in value, not in gradient."""
    adv_N: Tensor
    valid_N: Tensor
    agg_weight_N: Tensor
    ref_logp_N: Tensor | None
    is_weight_N: Tensor | None

    def __call__(self, logp_n: Tensor, ent_n: Tensor, rows: slice | Tensor) -> Tensor:
        cfg, valid_n = self.cfg, self.valid_N[rows]
        old_n = logp_n.detach() if self.old_logp_N is None else self.old_logp_N[rows]
        log_ratio_n = token_log_ratio(logp_n, old_n, valid_n)
        adv_n = self.adv_N[rows].to(log_ratio_n.dtype)
        per_n = clipped_surrogate(log_ratio_n, adv_n, cfg.clip_low, cfg.clip_high, cfg.dual_clip_c)
        if self.is_weight_N is not None:
            per_n = per_n * self.is_weight_N[rows]
        if self.ref_logp_N is not None:
            zero = torch.zeros((), dtype=logp_n.dtype, device=logp_n.device)
            kl_n = kl_estimate(
                torch.where(valid_n, logp_n, zero),
                torch.where(valid_n, self.ref_logp_N[rows], zero),
                cfg.kl_estimator,
            )
            per_n = per_n + cfg.kl_coef * kl_n
        if cfg.entropy_coef != 0.0:
            per_n = per_n - cfg.entropy_coef * ent_n
        # where, not a product with the 0 weight: padding may hold -inf log-probs.
        return torch.where(valid_n, per_n * self.agg_weight_N[rows], 0.0)


def build_token_loss(
    cfg: AlgorithmConfig,
    norm: LossNormalizer,
    *,
    old_logp_BT: Tensor | None,
    adv: Tensor,
    mask_BT: Tensor,
    ref_logp_BT: Tensor | None = None,
    weight_BT: Tensor | None = None,
) -> TokenLoss:
    """The token loss whose sum over all ``B * T`` tokens is ``actor_loss(cfg, norm, ...)``
    with the same arguments. ``adv`` is ``[B]`` or ``[B, T]``.

    Raises ConfigError for a policy loss that is not token-separable (GSPO), and
    ValueError when a coefficient needs an input that is missing (as ``actor_loss``).
    """
    if not token_separable(cfg):
        raise ConfigError(
            f"`algorithm.policy_loss` is {cfg.policy_loss!r}, whose per-token loss depends on "
            f"other tokens (a sequence-level ratio), so the fused loss-in-forward path cannot "
            f"serve it; only {list(TOKEN_SEPARABLE_POLICY_LOSSES)} can. Compute log-probs with "
            f"linear_logprobs and call actor_loss instead."
        )
    use_kl = needs_ref_logprobs(cfg.kl_coef)
    if use_kl and ref_logp_BT is None:
        raise ValueError("kl_coef != 0 but no ref_logp_BT was given")
    flat = lambda x: x.detach().reshape(-1)  # noqa: E731
    adv_BT = (adv[:, None] if adv.dim() == 1 else adv).expand(mask_BT.shape)
    return TokenLoss(
        cfg=cfg,
        old_logp_N=None if old_logp_BT is None else flat(old_logp_BT),
        adv_N=flat(adv_BT),
        valid_N=flat(mask_BT.bool()),
        agg_weight_N=flat(aggregation_weights(mask_BT, cfg.loss_agg_mode, norm)),
        ref_logp_N=flat(ref_logp_BT) if use_kl else None,
        is_weight_N=None if weight_BT is None else flat(weight_BT).float(),
    )
