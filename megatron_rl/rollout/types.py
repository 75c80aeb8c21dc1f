"""The one contract between the trainer and rollout: what is asked, and what comes back.

The trainer builds ``RolloutRequest``s (token ids + ``SamplingParams``) and receives
``Sample``s (response token ids, the engine's log-probs of those tokens, why generation
stopped, who served it). Nothing else crosses: no dicts of SGLang replies, no raw JSON.

Log-prob convention (``Sample.response_logprobs``): as SGLang returns them by default, the
log-probability of each sampled token under softmax(logits / temperature) over the whole
vocabulary (top-k / top-p truncation not applied); for greedy requests (temperature 0)
that is the plain log-softmax. See docs/embedded_engine.md for the exact rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from megatron_rl.errors import ConfigError

if TYPE_CHECKING:
    from megatron_rl.config.rollout import RolloutConfig

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    """How one prompt is sampled; field names and defaults follow SGLang's ``sampling_params``."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 keeps the whole vocabulary."""
    top_k: int = -1
    """Keep only the k most likely tokens; -1 keeps all."""
    max_new_tokens: int = 128
    """Most tokens to generate; reaching it finishes with reason ``length``."""
    stop: tuple[str, ...] = ()
    """Stop strings (need a tokenizer on the server); the matched string is reported."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (the stop token is kept in the response)."""
    ignore_eos: bool = False
    """Keep generating past the model's EOS token(s)."""
    n: int = 1
    """Samples drawn for this prompt (a GRPO group)."""
    seed: int | None = None
    """Sampling seed (SGLang ``sampling_seed``); None = the server's own random stream."""

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            problems.append(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            problems.append(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 0:
            problems.append(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.n < 1:
            problems.append(f"n must be >= 1, got {self.n}")
        if any(t < 0 for t in self.stop_token_ids):
            problems.append(f"stop_token_ids must be >= 0, got {list(self.stop_token_ids)}")
        if problems:
            raise ConfigError("Invalid sampling parameters: " + "; ".join(problems) + ".")

    @classmethod
    def from_config(cls, cfg: RolloutConfig, **overrides: Any) -> SamplingParams:
        """The rollout section's sampling defaults, with per-call overrides (e.g. eval's n)."""
        values: dict[str, Any] = dict(
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            max_new_tokens=cfg.max_new_tokens, n=cfg.n_samples,
        )
        values.update(overrides)
        return cls(**values)

    def to_sglang(self) -> dict[str, Any]:
        """The ``sampling_params`` object of SGLang's /generate (our ``seed`` is its ``sampling_seed``)."""
        out: dict[str, Any] = {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "max_new_tokens": self.max_new_tokens, "ignore_eos": self.ignore_eos, "n": self.n,
        }
        if self.stop:
            out["stop"] = list(self.stop)
        if self.stop_token_ids:
            out["stop_token_ids"] = list(self.stop_token_ids)
        if self.seed is not None:
            out["sampling_seed"] = self.seed
        return out


@dataclass
class RolloutRequest:
    """One prompt to sample ``sampling.n`` responses for."""

    request_id: str
    """Caller-chosen id, unique within one ``generate`` call; results are keyed by it."""
    prompt_ids: list[int]
    """Prompt token ids (already templated and tokenized)."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    """How to sample."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Opaque to rollout, copied onto every Sample (e.g. the data row, the label)."""

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ConfigError(f"Rollout request {self.request_id!r} has an empty prompt.")


@dataclass
class Sample:
    """One generated response, as the trainer consumes it."""

    request_id: str
    """Id of the RolloutRequest this answers."""
    sample_index: int
    """Which of the request's n samples this is (0 .. n-1)."""
    prompt_ids: list[int]
    """The prompt, as sent."""
    response_ids: list[int]
    """Generated token ids (a matched stop token / EOS included, as SGLang returns them)."""
    response_logprobs: list[float]
    """Engine log-prob of each response token (same length as response_ids); see module doc."""
    finish_reason: FinishReason
    """stop (EOS, stop token or stop string), length (max_new_tokens) or abort."""
    matched_stop: int | str | None = None
    """The stop token id or stop string that ended it, when finish_reason is stop."""
    server_url: str = ""
    """The server that produced it."""
    latency_s: float = 0.0
    """Wall time of the successful HTTP call, seconds (client side)."""
    attempts: int = 1
    """How many servers were tried for this request (1 = no retry)."""
    weight_version: str | None = None
    """The server's weight version when it answered (set by weight updates)."""
    token_weight_versions: list[str] | None = None
    """Per response token, the weight version that generated it, when the server reports it
    (differs within a sample only for a partial rollout continued across a weight update)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """The request's metadata."""

    @property
    def truncated(self) -> bool:
        """Stopped by the length budget (what overlong filtering masks out)."""
        return self.finish_reason == "length"
