"""The embedded engine's sampling: SGLang's ``sampling_params`` parsed, then one token per row.

Legend: B = rows in the batch, V = vocabulary size.

Rules reproduced from SGLang (v0.5.4, ``sampling_params.py`` and ``layers/sampler.py``):
- temperature in [0, 1e-6) means greedy: SGLang rewrites it to temperature 1 and top_k 1;
  greedy here is the argmax of the logits.
- otherwise probs = softmax(logits / temperature); sorted descending, a token is dropped when
  the mass of the tokens strictly before it already exceeds top_p or when its rank is >= top_k
  (both judged on the untruncated probs); the rest is renormalised and one token is drawn.
- the returned log-prob is log softmax(logits / temperature) at the drawn token, over the
  full vocabulary (top-k/top-p truncation does not change it); with
  ``original_logprobs=True`` (SGLANG_RETURN_ORIGINAL_LOGPROB) it is log softmax(logits).

The draw is counter-based, as SGLang's seeded sampler (``multinomial_with_seed`` in
``layers/sampler.py``): the random number of a seeded row is a hash of (sampling_seed,
position), never state carried from earlier steps, so it does not depend on what else was
batched or in which order requests came. The n copies of one request share the seed and the
positions, hence draw the same samples, as in SGLang. Our hash and draw (inverse CDF over the
kept tokens) are our own: same seed, different numbers than SGLang's Gumbel noise.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

GREEDY_EPS = 1e-6  # SGLang's _SAMPLING_EPS

# Accepted SGLang sampling fields the engine does not implement, with their no-op values.
_NEUTRAL = {
    "min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
    "min_new_tokens": 0, "json_schema": None, "regex": None, "ebnf": None, "structural_tag": None,
    "logit_bias": None, "custom_params": None, "stop_regex": None,
}
_IGNORED = {"skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "stream_interval"}


class BadRequest(ValueError):
    """A request the engine refuses; the HTTP layer answers 400 with this message."""


@dataclass
class RequestParams:
    """One request's validated sampling parameters."""

    temperature: float = 1.0
    greedy: bool = False
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop: list[str] = field(default_factory=list)
    stop_token_ids: set[int] = field(default_factory=set)
    ignore_eos: bool = False
    n: int = 1
    seed: int | None = None


def _number(d: dict[str, Any], key: str, default: float, kind: type) -> Any:
    value = d.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise BadRequest(f"sampling_params.{key} must be a{'n integer' if kind is int else ' number'}, got {value!r}.")
    return kind(value)


def parse_sampling_params(raw: Any, vocab_size: int) -> RequestParams:
    """Validate an SGLang ``sampling_params`` object; BadRequest names the offending field."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BadRequest(f"sampling_params must be an object, got {type(raw).__name__}.")
    known = set(_NEUTRAL) | _IGNORED | {
        "temperature", "top_p", "top_k", "max_new_tokens", "stop", "stop_token_ids",
        "ignore_eos", "n", "sampling_seed"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise BadRequest(f"Unknown sampling_params field(s) {unknown}; known: {sorted(known)}.")
    for key, neutral in _NEUTRAL.items():
        if raw.get(key, neutral) not in (neutral, None):
            raise BadRequest(f"sampling_params.{key}={raw[key]!r} is not supported by the embedded engine "
                             f"(only the neutral value {neutral!r}); use SGLang for it.")
    p = RequestParams(
        temperature=_number(raw, "temperature", 1.0, float), top_p=_number(raw, "top_p", 1.0, float),
        top_k=_number(raw, "top_k", -1, int), max_new_tokens=_number(raw, "max_new_tokens", 128, int),
        n=_number(raw, "n", 1, int), ignore_eos=bool(raw.get("ignore_eos") or False))
    seed = raw.get("sampling_seed")
    if seed is not None:
        p.seed = _number(raw, "sampling_seed", 0, int)
        if not -(2**31) <= p.seed < 2**31:  # SGLang packs seeds into an int32 tensor
            raise BadRequest(f"sampling_seed must fit in int32 (as in SGLang), got {p.seed}.")
    if not (p.temperature >= 0 and p.temperature != float("inf")):
        raise BadRequest(f"temperature must be a non-negative finite number, got {p.temperature}.")
    if not 0.0 < p.top_p <= 1.0:
        raise BadRequest(f"top_p must be in (0, 1], got {p.top_p}.")
    if p.top_k == 0 or p.top_k < -1:
        raise BadRequest(f"top_k must be -1 (disable) or at least 1, got {p.top_k}.")
    if p.max_new_tokens < 0:
        raise BadRequest(f"max_new_tokens must be at least 0, got {p.max_new_tokens}.")
    if not 1 <= p.n <= 1024:
        raise BadRequest(f"n must be in [1, 1024], got {p.n}.")
    stop = raw.get("stop") or []
    p.stop = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) and s for s in p.stop):
        raise BadRequest(f"stop must be a string or a list of non-empty strings, got {stop!r}.")
    ids = raw.get("stop_token_ids") or []
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise BadRequest(f"stop_token_ids must be a list of token ids, got {ids!r}.")
    if any(not 0 <= t < vocab_size for t in ids):
        raise BadRequest(f"stop_token_ids must be in [0, {vocab_size}), got {ids}.")
    p.stop_token_ids = set(ids)
    if p.temperature < GREEDY_EPS:
        p.greedy, p.temperature, p.top_k = True, 1.0, 1
    return p


def seeded_uniform(seed: int, position: int) -> float:
    """A uniform number in [0, 1) from (seed, position) alone: 53 bits of a BLAKE2b hash."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) * 2.0**-53


def _draw(probs_V: torch.Tensor, p: RequestParams, u: float) -> int:
    """Inverse CDF at ``u`` over the tokens top-k/top-p keep (renormalised implicitly)."""
    order_V = None
    if p.top_k != -1 and p.top_k < probs_V.shape[0] or p.top_p < 1.0:
        # stable: ties keep vocabulary order, so equal logits always give the same pick
        probs_V, order_V = probs_V.sort(descending=True, stable=True)
        mass_before_V = probs_V.cumsum(0) - probs_V  # on the untruncated probs, as SGLang
        if p.top_p < 1.0:
            probs_V[mass_before_V > p.top_p] = 0.0
        if p.top_k != -1:
            probs_V[p.top_k:] = 0.0
    cdf_V = probs_V.double().cumsum(0)
    pick = int(torch.searchsorted(cdf_V, u * cdf_V[-1], right=True))
    if pick >= cdf_V.shape[0]:  # u * total rounded up to total: the last token with mass
        pick = int(probs_V.nonzero()[-1])
    return pick if order_V is None else int(order_V[pick])


def sample_rows(
    logits_BV: torch.Tensor,
    params: list[RequestParams],
    uniforms: list[float],
    *,
    original_logprobs: bool = False,
) -> tuple[list[int], list[float]]:
    """Draw one token per row with its uniform number; returns (token ids, log-probs per the module rules).

    Every step is row-wise, so a row's result depends on its own logits and number only.
    """
    logits_BV = logits_BV.float()
    temps = [p.temperature for p in params]
    # The division and the argmax cost a pass over B x V each (~0.4 ms for 8 x 32000): only when needed.
    tempered_BV = logits_BV if all(t == 1.0 for t in temps) else \
        logits_BV / torch.tensor(temps, dtype=torch.float32).unsqueeze(1)
    logp_BV = torch.log_softmax(tempered_BV, dim=-1)
    raw_logp_BV = torch.log_softmax(logits_BV, dim=-1) if original_logprobs and tempered_BV is not logits_BV \
        else logp_BV
    greedy_B = logits_BV.argmax(dim=-1) if any(p.greedy for p in params) else None
    tokens = [int(greedy_B[row]) if p.greedy else _draw(logp_BV[row].exp(), p, u)
              for row, (p, u) in enumerate(zip(params, uniforms))]
    index_B = torch.tensor(tokens, dtype=torch.long)
    chosen = raw_logp_BV.gather(1, index_B.unsqueeze(1)).squeeze(1)
    return tokens, chosen.tolist()
