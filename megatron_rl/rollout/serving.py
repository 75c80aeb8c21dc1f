"""What /generate and the OpenAI endpoints share: one prompt's submission and its reply dict.

A ``Submission`` is one prompt as the engine takes it (token ids, validated sampling
parameters, the text options of ``detokenize``, rid, log-prob fields); ``submit`` queues
a list of them prompt-major (``p0s0, p0s1, p1s0, ...``, as SGLang orders ``n > 1``) and
``wait_all`` awaits them, aborting every job when the client goes away or one is refused.
``generate_reply`` is SGLang's native reply object for one finished job.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from megatron_rl.rollout.detokenize import TextOptions, final_text, text_options
from megatron_rl.rollout.engine import EmbeddedEngine, Job, TokenHook
from megatron_rl.rollout.sampling import BadRequest, RequestParams, parse_sampling_params

_NO_EFFECT = ("custom_params",)
"""sampling_params fields accepted and dropped: without a custom logit processor they do nothing."""


@dataclass
class Submission:
    """One prompt as submitted: its ``params.n`` jobs share everything here."""

    prompt: list[int]
    params: RequestParams
    options: TextOptions
    rid: str
    return_logprob: bool = False
    logprob_start_len: int = -1
    logprob_text: bool = False
    """``return_text_in_logprobs``: each log-prob entry carries its token's text."""


async def json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"The request body is not valid JSON: {e}.") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise BadRequest(f"The request body must be a JSON object, got {type(body).__name__}.")
    return body


def engine_params(raw: Any, vocab_size: int) -> tuple[RequestParams, TextOptions]:
    """A raw ``sampling_params`` object -> (engine parameters, text options); BadRequest names the field."""
    if isinstance(raw, dict):
        custom = raw.get("custom_params")
        if custom is not None and not isinstance(custom, dict):
            raise BadRequest(f"sampling_params.custom_params must be an object, got {type(custom).__name__}.")
        raw_for_engine = {k: v for k, v in raw.items() if k not in _NO_EFFECT}
    else:
        raw_for_engine = raw
    options = text_options(raw)
    return parse_sampling_params(raw_for_engine, vocab_size), options


def request_ids(rid: Any, count: int) -> list[str]:
    """SGLang's ``rid`` for ``count`` prompts: one per prompt, or one shared (``rid-i``), or fresh uuids."""
    if isinstance(rid, list):
        if len(rid) != count:
            raise BadRequest(f"rid has {len(rid)} entries for {count} prompts.")
        return [str(r) if r is not None else uuid.uuid4().hex for r in rid]
    if rid is None:
        return [uuid.uuid4().hex for _ in range(count)]
    return [str(rid)] if count == 1 else [f"{rid}-{i}" for i in range(count)]


def submit(engine: EmbeddedEngine, subs: list[Submission], on_token: TokenHook | None = None
           ) -> list[tuple[Submission, Future]]:
    """Queue every submission's jobs (``on_token``: the engine's per-token hook, for streams);
    on a refusal abort what was queued and re-raise."""
    queued: list[tuple[Submission, Future]] = []
    try:
        for sub in subs:
            futures = engine.submit(sub.prompt, sub.params, rid=sub.rid, return_logprob=sub.return_logprob,
                                    logprob_start_len=sub.logprob_start_len, on_token=on_token)
            queued += [(sub, f) for f in futures]
    except BadRequest:
        abort_all(engine, subs, "Aborted: another prompt of the request was refused")
        raise
    return queued


def abort_all(engine: EmbeddedEngine, subs: list[Submission], message: str) -> None:
    for rid in {s.rid for s in subs}:
        engine.abort(rid, message=message)


async def wait_all(engine: EmbeddedEngine, queued: list[tuple[Submission, Future]]) -> list[Job]:
    """The finished jobs, in order; a cancelled wait (client gone) aborts all of them."""
    try:
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for _, f in queued)))
    except asyncio.CancelledError:
        abort_all(engine, [s for s, _ in queued], "Aborted: client disconnected")
        raise


def _entries(logprobs: list, ids: list[int], tokenizer: Any, with_text: bool) -> list[list[Any]]:
    """SGLang's ``[logprob, token_id, text or null]`` entries (text: each token decoded alone)."""
    texts = tokenizer.batch_decode([[t] for t in ids]) if with_text and tokenizer is not None else [None] * len(ids)
    return [[lp, t, text] for lp, t, text in zip(logprobs, ids, texts)]


def meta_info(job: Job, sub: Submission, engine: EmbeddedEngine, *, finish: dict[str, Any] | None, count: int,
              latency: bool) -> dict[str, Any]:
    """SGLang's ``meta_info`` after ``count`` output tokens (log-probs cumulative, as SGLang sends them)."""
    meta: dict[str, Any] = {
        "id": job.rid, "finish_reason": finish, "prompt_tokens": len(job.prompt),
        # SGLang's: the version when the job finished (the engine's current one while it runs)
        "weight_version": job.weight_version if finish is not None and job.weight_version else engine.weight_version,
        # ours (partial rollouts): the version of the weights that produced each output token
        "output_token_weight_versions": list(job.output_versions[:count]),
    }
    if job.return_logprob:
        start = max(job.logprob_start_len, 0)
        meta["input_token_logprobs"] = _entries(job.input_logprobs, job.prompt[start:], engine.tokenizer,
                                                sub.logprob_text) if job.logprob_start_len >= 0 else []
        meta["output_token_logprobs"] = _entries(job.output_logprobs[:count], job.output_ids[:count],
                                                 engine.tokenizer, sub.logprob_text)
    meta["completion_tokens"] = count
    meta["cached_tokens"] = 0
    if latency:
        meta["e2e_latency"] = time.perf_counter() - job.start
    return meta


def generate_reply(job: Job, sub: Submission, engine: EmbeddedEngine) -> dict[str, Any]:
    """SGLang's non-streamed reply for one finished job; ``output_ids`` untrimmed."""
    text = final_text(engine.tokenizer, job.prompt, job.output_ids, job.finish, sub.options)
    meta = meta_info(job, sub, engine, finish=job.finish, count=len(job.output_ids), latency=True)
    return {"text": text, "output_ids": list(job.output_ids), "meta_info": meta}
