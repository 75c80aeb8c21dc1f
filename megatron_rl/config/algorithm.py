"""Algorithm section: advantages, policy loss, KL / entropy, rollout correction, shaping.

Defaults are the DeepScaleR-1.5B GRPO recipe (see ANCHORS.md): GRPO advantages divided by
the group std, PPO clip 0.2 both sides, token-mean loss, k3 (low_var_kl) KL loss at 0.001,
n = 8 samples per prompt. The maths lives in ``megatron_rl.algos``; this class only names
and validates the choices.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from megatron_rl.config.base import closest, require

AdvantageEstimator = Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"]
PolicyLossKind = Literal["ppo", "gspo"]
LossAggMode = Literal[
    "token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"
]
KLEstimator = Literal["k1", "k2", "k3", "abs", "low_var_kl"]
TISMode = Literal["none", "token", "sequence", "icepop-token", "icepop-sequence"]
GSPO_MAX_CLIP = 0.01
"""Largest clip epsilon accepted with GSPO (the paper uses 3e-4 / 4e-4)."""


def choices(literal: object) -> tuple[str, ...]:
    """The valid names of one of the ``Literal`` aliases above (single source of truth)."""
    return typing.get_args(literal)


def check_choice(what: str, name: str, valid: typing.Iterable[str]) -> str:
    """Return ``name`` if valid, else raise ConfigError naming the closest valid one."""
    names = list(valid)
    require(
        name in names,
        f"`{what}` is {name!r}, which is not one of {names}{closest(str(name), names)}.",
    )
    return name


@dataclass
class AlgorithmConfig:
    adv_estimator: AdvantageEstimator = "grpo"
    """Advantage estimator: grpo, dr_grpo (no std), rloo (leave-one-out), reinforce_pp (group baseline, batch std)."""
    norm_adv_by_std: bool = True
    """GRPO only: divide the group-centred reward by the group std (False = Dr.GRPO's advantage)."""
    policy_loss: PolicyLossKind = "ppo"
    """ppo: token-level ratio; gspo: sequence-level ratio (length-normalised, GSPO-token gradient)."""
    clip_low: float = 0.2
    """Lower PPO clip epsilon: the ratio is clipped at 1 - clip_low (GSPO uses ~3e-4)."""
    clip_high: float = 0.2
    """Upper PPO clip epsilon: 1 + clip_high (DAPO clip-higher: 0.28; GSPO uses ~4e-4)."""
    dual_clip_c: float | None = None
    """Dual-clip bound c > 1 for negative advantages (None = off)."""
    loss_agg_mode: LossAggMode = "token-mean"
    """How per-token losses become one number; normalisers are global over the step."""
    kl_coef: float = 0.001
    """KL-to-reference loss coefficient; 0 = no KL and no reference model at all."""
    kl_estimator: KLEstimator = "k3"
    """KL estimator: k1, k2, k3 (= verl's low_var_kl, clamped to [-10, 10]) or abs."""
    entropy_coef: float = 0.001
    """Entropy bonus coefficient (0.001 was verl's default when DeepScaleR ran; 0 = off)."""
    tis_mode: TISMode = "none"
    """Rollout/trainer mismatch correction: truncated IS (token, sequence) or ICEPOP masking."""
    tis_cap: float = 2.0
    """Truncation cap C of the token / sequence importance weight (token, sequence modes)."""
    tis_low: float = 0.5
    """ICEPOP: tokens / sequences whose ratio is below this are masked out of the loss."""
    tis_high: float = 2.0
    """ICEPOP: tokens / sequences whose ratio is above this are masked out of the loss."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose rewards are all equal and generate more."""
    dynamic_sampling_max_rounds: int = 10
    """Most generation rounds per step while refilling; then train on what was kept."""
    overlong_buffer_len: int = 0
    """DAPO soft overlong penalty: length of the buffer before the max length (0 = off)."""
    overlong_penalty: float = 1.0
    """DAPO soft overlong penalty at the max length (it grows linearly over the buffer)."""
    overlong_filter: bool = False
    """DeepCoder overlong filtering: truncated samples are masked out of the loss."""

    def __post_init__(self) -> None:
        # from_dict already checks Literal fields; direct construction (tests, code) does not.
        for name, alias in (
            ("adv_estimator", AdvantageEstimator),
            ("policy_loss", PolicyLossKind),
            ("loss_agg_mode", LossAggMode),
            ("kl_estimator", KLEstimator),
            ("tis_mode", TISMode),
        ):
            check_choice(f"algorithm.{name}", getattr(self, name), choices(alias))
        require(0 <= self.clip_low < 1, f"`algorithm.clip_low` must be in [0, 1), got {self.clip_low}.")
        require(self.clip_high >= 0, f"`algorithm.clip_high` must be >= 0, got {self.clip_high}.")
        require(
            self.dual_clip_c is None or self.dual_clip_c > 1,
            f"`algorithm.dual_clip_c` must be null or > 1, got {self.dual_clip_c}.",
        )
        require(self.kl_coef >= 0, f"`algorithm.kl_coef` must be >= 0, got {self.kl_coef}.")
        require(self.entropy_coef >= 0, f"`algorithm.entropy_coef` must be >= 0, got {self.entropy_coef}.")
        require(self.tis_cap > 0, f"`algorithm.tis_cap` must be > 0, got {self.tis_cap}.")
        require(
            0 <= self.tis_low < 1 < self.tis_high,
            f"`algorithm.tis_low`/`tis_high` must satisfy 0 <= low < 1 < high, got "
            f"[{self.tis_low}, {self.tis_high}].",
        )
        require(self.dynamic_sampling_max_rounds >= 1, "`algorithm.dynamic_sampling_max_rounds` must be >= 1.")
        require(self.overlong_buffer_len >= 0, "`algorithm.overlong_buffer_len` must be >= 0 (0 = off).")
        require(self.overlong_penalty >= 0, "`algorithm.overlong_penalty` must be >= 0.")


def check_trainable(cfg: AlgorithmConfig) -> None:
    """Refuse settings that parse but would train wrongly (called for whole runs by RunConfig;
    the loss functions themselves stay usable with any values, for tests of their maths)."""
    if cfg.policy_loss == "gspo":
        # GSPO's ratio is a length-normalised sequence ratio, ~1 +- 1e-3: the token-level
        # clip range (0.2) never binds on it, so the run would train effectively unclipped.
        require(
            cfg.clip_low <= GSPO_MAX_CLIP and cfg.clip_high <= GSPO_MAX_CLIP,
            f"`algorithm.policy_loss: gspo` clips a sequence-level ratio, which stays within ~1e-3 "
            f"of 1, so clip_low={cfg.clip_low} / clip_high={cfg.clip_high} would never clip: use "
            f"the GSPO paper's range, clip_low=3e-4 and clip_high=4e-4 (at most {GSPO_MAX_CLIP}).",
        )
        require(
            cfg.loss_agg_mode == "seq-mean-token-mean",
            f"`algorithm.policy_loss: gspo` is a sequence-level objective: set "
            f"`algorithm.loss_agg_mode: seq-mean-token-mean` (got {cfg.loss_agg_mode!r}).",
        )
