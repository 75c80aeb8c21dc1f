"""SGLang's native HTTP API as we speak it: request payloads out, validated replies in.

Followed: SGLang v0.5.4 (``python/sglang/srt/entrypoints/http_server.py`` and
``python/sglang/srt/managers/io_struct.py``), read from source; the fields used here are
unchanged on SGLang's main branch as of this writing. No SGLang server ran in this
project's CI (it has no CPU path): the embedded engine serves the same shapes and is what
the tests exercise, and the shapes it does *not* reproduce are listed in
docs/embedded_engine.md.

/generate (one prompt; the batch form takes lists) ::

    {"input_ids": [int], "sampling_params": {...}, "return_logprob": true,
     "logprob_start_len": -1, "rid": "..."}
    -> {"text": str, "output_ids": [int],
        "meta_info": {"id": rid, "finish_reason": {"type": "stop", "matched": 2} |
                      {"type": "length", "length": 16} | {"type": "abort", "message": ...},
                      "prompt_tokens": int, "completion_tokens": int, "cached_tokens": int,
                      "output_token_logprobs": [[logprob, token_id, null], ...],
                      "input_token_logprobs": [[null, id0, null], [lp, id1, null], ...]}}

With ``sampling_params.n > 1`` a single prompt answers a list of n such objects. Weight
updates answer ``{"success": bool, "message": str}`` (400 when success is false).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from megatron_rl.errors import RolloutError

SGLANG_VERSION_TESTED = "0.5.4"
"""The SGLang release whose HTTP payloads this module follows (see the module docstring)."""

DEFAULT_GROUP_NAME = "weight_update_group"
"""SGLang's default name for the trainer -> servers weight-update process group."""


class MalformedReply(RolloutError):
    """A server answered something that is not the SGLang reply we asked for."""


@dataclass
class GenerateOutput:
    """One parsed element of a /generate reply."""

    output_ids: list[int]
    output_logprobs: list[float]
    finish_type: str
    matched: int | str | None
    prompt_tokens: int
    weight_version: str | None
    input_logprobs: list[float | None] | None
    token_weight_versions: list[str] | None = None
    """The weight version each output token was generated with, when the server says
    (``meta_info.output_token_weight_versions``: a partial rollout spans a weight update)."""


def generate_payload(
    input_ids: list[int] | list[list[int]],
    sampling_params: dict[str, Any],
    *,
    rid: str | list[str] | None = None,
    logprob_start_len: int = -1,
) -> dict[str, Any]:
    """/generate body with log-probs on; ``logprob_start_len >= 0`` also scores the prompt."""
    body: dict[str, Any] = {
        "input_ids": input_ids,
        "sampling_params": sampling_params,
        "return_logprob": True,
        "logprob_start_len": logprob_start_len,
    }
    if rid is not None:
        body["rid"] = rid
    return body


def _malformed(url: str, what: str, body: Any) -> MalformedReply:
    text = repr(body)
    if len(text) > 300:
        text = text[:300] + "..."
    return MalformedReply(
        f"The rollout server at {url} answered a malformed reply: {what}. Got: {text}. "
        "Check that the URL points at an SGLang server (or `megatron-rl serve`) of a version "
        f"that speaks the native /generate API (followed: SGLang {SGLANG_VERSION_TESTED}), "
        "and that nothing in between (a proxy, a load balancer) rewrites replies."
    )


def _logprob_list(entries: Any, url: str, body: Any, what: str, allow_none: bool) -> list:
    if not isinstance(entries, list):
        raise _malformed(url, f"`meta_info.{what}` is not a list", body)
    values: list[float | None] = []
    for entry in entries:
        if not isinstance(entry, (list, tuple)) or len(entry) < 2:
            raise _malformed(url, f"an entry of `meta_info.{what}` is not [logprob, token_id, text]", body)
        lp = entry[0]
        if lp is None and allow_none:
            values.append(None)
            continue
        if not isinstance(lp, (int, float)) or isinstance(lp, bool) or math.isnan(lp):
            raise _malformed(url, f"`meta_info.{what}` holds a non-numeric log-prob {lp!r}", body)
        values.append(float(lp))
    return values


def parse_generate_item(item: Any, url: str, *, want_input_logprobs: bool = False) -> GenerateOutput:
    """Validate one /generate reply object; raises MalformedReply naming what is wrong."""
    if not isinstance(item, dict):
        raise _malformed(url, "expected a JSON object per prompt", item)
    output_ids = item.get("output_ids")
    meta = item.get("meta_info")
    if not isinstance(output_ids, list) or not all(isinstance(t, int) for t in output_ids):
        raise _malformed(url, "`output_ids` is missing or not a list of token ids", item)
    if not isinstance(meta, dict):
        raise _malformed(url, "`meta_info` is missing", item)
    finish = meta.get("finish_reason")
    if not isinstance(finish, dict) or finish.get("type") not in ("stop", "length", "abort"):
        raise _malformed(url, "`meta_info.finish_reason` is not {type: stop|length|abort, ...}", item)
    logprobs = _logprob_list(meta.get("output_token_logprobs"), url, item, "output_token_logprobs", False)
    if len(logprobs) != len(output_ids):
        raise _malformed(
            url, f"{len(logprobs)} output log-probs for {len(output_ids)} output tokens", item)
    prompt_tokens = meta.get("prompt_tokens")
    if not isinstance(prompt_tokens, int):
        raise _malformed(url, "`meta_info.prompt_tokens` is missing", item)
    input_logprobs = None
    if want_input_logprobs:
        input_logprobs = _logprob_list(meta.get("input_token_logprobs"), url, item, "input_token_logprobs", True)
    matched = finish.get("matched")
    version = meta.get("weight_version")
    token_versions = meta.get("output_token_weight_versions")
    if token_versions is not None and (not isinstance(token_versions, list) or len(token_versions) != len(output_ids)
                                       or not all(isinstance(v, str) for v in token_versions)):
        raise _malformed(url, "`meta_info.output_token_weight_versions` is not one version string per output token",
                         item)
    return GenerateOutput(
        output_ids=list(output_ids), output_logprobs=logprobs, finish_type=finish["type"],
        matched=matched if isinstance(matched, (int, str)) else None,
        prompt_tokens=prompt_tokens, weight_version=version if isinstance(version, str) else None,
        input_logprobs=input_logprobs, token_weight_versions=token_versions,
    )


def parse_generate_reply(body: Any, url: str, expected: int, *, want_input_logprobs: bool = False) -> list[GenerateOutput]:
    """A reply for one prompt with n samples (object if n == 1, else list of n), or a batch list."""
    items = [body] if isinstance(body, dict) and expected == 1 else body
    if not isinstance(items, list) or len(items) != expected:
        got = len(items) if isinstance(items, list) else type(body).__name__
        raise _malformed(url, f"expected {expected} result(s), got {got}", body)
    return [parse_generate_item(it, url, want_input_logprobs=want_input_logprobs) for it in items]


def check_success(body: Any, url: str, endpoint: str) -> str:
    """Weight-update style replies: {"success": true, "message": ...}; returns the message."""
    if not isinstance(body, dict) or not isinstance(body.get("success"), bool):
        raise _malformed(url, f"{endpoint} did not answer {{success, message}}", body)
    if not body["success"]:
        raise RolloutError(
            f"The rollout server at {url} refused {endpoint}: {body.get('message', '')}. "
            "Weights on that server may now be partly updated; re-run the sync after fixing "
            "the cause (names must be Hugging Face parameter names of the served model)."
        )
    return str(body.get("message", ""))
