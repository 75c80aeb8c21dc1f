"""OpenAI-compatible ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``.

Followed: SGLang v0.5.4 ``entrypoints/openai/`` (``protocol.py``, ``serving_completions.py``,
``serving_chat.py``, ``usage_processor.py``), read from source. Requests become the same
``Submission``s as /generate (so sampling, log-probs and the text rules of ``detokenize``
are identical) and replies are built by ``openai_format``. Field defaults are SGLang's:
completions ``max_tokens`` 16, ``temperature``/``top_p`` 1, ``top_k`` -1; chat requests
without ``temperature``/``top_p``/``top_k`` take them from the model's
``generation_config.json`` (SGLang's ``--sampling-defaults model``), ``max_tokens`` absent
means up to the context length. ``skip_special_tokens``, ``no_stop_trim``, ``stop_token_ids``,
``ignore_eos``, ``top_k``, ``min_p`` and the other SGLang extras are read as in SGLang.

Departures (docs/embedded_engine.md): ``seed`` is honoured (mapped to ``sampling_seed``;
v0.5.4 ignores it); top log-probs (completions ``logprobs > 0``, chat ``top_logprobs > 0``),
tool-call parsing, forced tool choice, ``response_format``, multimodal content and LoRA
are refused with 400. Chat prompts are the tokenizer's chat template applied to the
messages (``tools`` and ``chat_template_kwargs`` passed to it).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from megatron_rl.rollout import openai_format as fmt
from megatron_rl.rollout.detokenize import bool_field
from megatron_rl.rollout.engine import EmbeddedEngine
from megatron_rl.rollout.sampling import BadRequest
from megatron_rl.rollout.serving import (
    Submission,
    abort_all,
    engine_params,
    json_body,
    request_ids,
    submit,
    wait_all,
)
from megatron_rl.rollout.streaming import TokenNotifier, merged_chunks, open_sse, send_event

# OpenAI/SGLang fields copied into sampling_params under SGLang's name (None = not given).
_SAMPLING_FIELDS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "n": "n",
    "stop": "stop", "stop_token_ids": "stop_token_ids", "ignore_eos": "ignore_eos",
    "no_stop_trim": "no_stop_trim", "skip_special_tokens": "skip_special_tokens",
    "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
    "repetition_penalty": "repetition_penalty", "min_tokens": "min_new_tokens", "logit_bias": "logit_bias",
    "regex": "regex", "ebnf": "ebnf", "json_schema": "json_schema", "stop_regex": "stop_regex",
    "custom_params": "custom_params", "seed": "sampling_seed",
}
_REFUSED = ("lora_path", "return_hidden_states", "custom_logit_processor", "suffix", "session_params")
_CHAT_DEFAULT_KEYS = ("temperature", "top_p", "top_k")


def _positive_int(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BadRequest(f"`{key}` must be a positive integer, got {value!r}.")
    return value


def _sampling(body: dict[str, Any], defaults: dict[str, Any], max_new_tokens: int) -> dict[str, Any]:
    """SGLang ``sampling_params`` from the OpenAI fields, over ``defaults`` (absent fields)."""
    for key in _REFUSED:
        if body.get(key) not in (None, False, [], ""):
            raise BadRequest(f"`{key}` is not supported by the embedded engine; use SGLang for it.")
    if body.get("best_of") not in (None, 1) or body.get("response_format") not in (None, {"type": "text"}):
        raise BadRequest("`best_of` and `response_format` are not supported by the embedded engine.")
    raw = dict(defaults)
    raw.update({dest: body[src] for src, dest in _SAMPLING_FIELDS.items() if body.get(src) is not None})
    raw["max_new_tokens"] = max_new_tokens
    return raw


def _stream_options(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise BadRequest("`stream_options` must be an object like {\"include_usage\": true}.")
    return bool_field(options, "include_usage")


def _need_tokenizer(engine: EmbeddedEngine, what: str) -> Any:
    if engine.tokenizer is None:
        raise BadRequest(f"{what} needs a tokenizer, and {engine.model_path} has none (no tokenizer files).")
    return engine.tokenizer


# ------------------------------------------------------------------------ /v1/completions
def _completion_prompts(body: dict[str, Any], engine: EmbeddedEngine, echo: bool) -> tuple[list[list[int]], list[str]]:
    """Token ids of each prompt and, with ``echo``, its echo text (a string prompt echoes as given)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(p for p in prompt):
        raise BadRequest("`prompt` must be a non-empty string, list of strings, list of token ids or list of "
                         "such lists (Prompt cannot be empty).")
    ids, echoes = [], []
    for p in prompt:
        if isinstance(p, str):
            ids.append(_need_tokenizer(engine, "A text prompt").encode(p))
            echoes += [p] if echo else []
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            ids.append(list(p))
            if echo:  # SGLang echoes token ids decoded without special tokens
                echoes.append(engine.tokenizer.decode(p, skip_special_tokens=True) if engine.tokenizer else "")
        else:
            raise BadRequest("Every prompt must be a string or a list of token ids.")
    return ids, echoes


def completion_submissions(body: dict[str, Any], engine: EmbeddedEngine) -> tuple[list[Submission], list[str]]:
    echo = bool_field(body, "echo")
    ids, echoes = _completion_prompts(body, engine, echo)
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
        raise BadRequest(f"`logprobs` must be a non-negative integer, got {logprobs!r}.")
    if logprobs:
        raise BadRequest("`logprobs` > 0 asks for top log-probs, which the embedded engine does not compute; "
                         "send logprobs: 0 for the chosen tokens' log-probs.")
    raw = _sampling(body, {}, _positive_int(body, "max_tokens") or 16)
    params, options = engine_params(raw, engine.vocab_size)
    rids = request_ids(body.get("rid"), len(ids))
    subs = [Submission(p, params, options, rid, logprobs is not None, 0 if echo and logprobs is not None else -1)
            for p, rid in zip(ids, rids)]
    return subs, echoes


# ------------------------------------------------------------------- /v1/chat/completions
def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Messages as the chat template takes them: text parts joined, tool-call arguments parsed."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty list (Messages cannot be empty.).")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string `role`.")
        role = m["role"] if m["role"] == "user" else m["role"].lower()
        if role not in ("system", "user", "assistant", "tool", "function"):
            raise BadRequest(f"messages[{i}].role must be system, user, assistant, tool or function, got {role!r}.")
        msg = {k: v for k, v in m.items() if v is not None}
        msg["role"] = role
        content = m.get("content")
        if isinstance(content, list):  # SGLang's "string" content format: text parts joined by spaces
            if any(not isinstance(c, dict) or c.get("type") != "text" for c in content):
                raise BadRequest(f"messages[{i}] has non-text content; the embedded engine serves text only.")
            msg["content"] = " ".join(str(c.get("text", "")) for c in content)
        elif content is not None and not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string or a list of text parts.")
        for call in msg.get("tool_calls") or []:
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except json.JSONDecodeError:
                    raise BadRequest(f"messages[{i}] has tool-call arguments that are not JSON.") from None
        out.append(msg)
    return out


def chat_prompt(body: dict[str, Any], engine: EmbeddedEngine) -> list[int]:
    """The chat template applied to the messages (generation prompt added), as token ids."""
    tok = _need_tokenizer(engine, "/v1/chat/completions")
    messages = _messages(body)
    prefix = None
    if bool_field(body, "continue_final_message") and messages[-1]["role"] == "assistant":
        prefix, messages = messages[-1].get("content") or "", messages[:-1]
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise BadRequest("tool_choice 'required' or a named tool needs constrained decoding, which the "
                         "embedded engine does not have; use 'auto' or 'none'.")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise BadRequest("`chat_template_kwargs` must be an object.")
    tools = [t.get("function", t) if isinstance(t, dict) else t for t in body.get("tools") or []] or None
    try:
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, tools=tools,
                                           reasoning_effort=body.get("reasoning_effort") or "medium", **kwargs)
    except ValueError as e:
        raise BadRequest(f"Cannot apply the chat template of {engine.model_path}: {e} Use /v1/completions "
                         "with a formatted prompt instead.") from None
    ids = tok.encode(rendered, add_special_tokens=False)  # what tokenize=True does
    if prefix:
        extra = tok.encode(prefix)
        ids += extra[1:] if extra and extra[0] == tok.bos_token_id else extra
    return ids


def chat_defaults(model_path: str) -> dict[str, Any]:
    """temperature/top_p/top_k written in the model's generation_config.json (SGLang's defaults)."""
    try:
        config = json.loads((Path(model_path) / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: config[k] for k in _CHAT_DEFAULT_KEYS if config.get(k) is not None}


def chat_submission(body: dict[str, Any], engine: EmbeddedEngine) -> Submission:
    prompt = chat_prompt(body, engine)
    top = body.get("top_logprobs")
    if top not in (None, 0):
        raise BadRequest("`top_logprobs` > 0 is not supported by the embedded engine (no top log-probs).")
    limit = _positive_int(body, "max_completion_tokens") or _positive_int(body, "max_tokens")
    if len(prompt) >= engine.context_len:
        raise BadRequest(f"The chat prompt ({len(prompt)} tokens) is longer than the model's context length "
                         f"({engine.context_len} tokens).")
    raw = _sampling(body, chat_defaults(engine.model_path), limit or engine.context_len - len(prompt) - 1)
    params, options = engine_params(raw, engine.vocab_size)
    return Submission(prompt, params, options, request_ids(body.get("rid"), 1)[0], bool_field(body, "logprobs"), -1)


# --------------------------------------------------------------------------- handlers
def add_openai_routes(app: web.Application, engine_key: web.AppKey) -> None:
    """Register the OpenAI endpoints on the app serving ``app[engine_key]``."""

    async def completions(request: web.Request) -> web.StreamResponse:
        engine, body = request.app[engine_key], await json_body(request)
        subs, echoes = completion_submissions(body, engine)
        return await _serve(request, engine, body, subs, fmt.CompletionFormat(engine, body, subs, echoes))

    async def chat(request: web.Request) -> web.StreamResponse:
        engine, body = request.app[engine_key], await json_body(request)
        sub = chat_submission(body, engine)
        return await _serve(request, engine, body, [sub], fmt.ChatFormat(engine, body, [sub]))

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [fmt.model_card(request.app[engine_key])]})

    async def model(request: web.Request) -> web.Response:
        engine, name = request.app[engine_key], request.match_info["model"]
        if name != engine.model_path:
            return web.json_response({"error": {
                "message": f"The model '{name}' does not exist", "type": "invalid_request_error",
                "param": "model", "code": "model_not_found"}}, status=404)
        return web.json_response(fmt.model_card(engine))

    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model)


async def _serve(request: web.Request, engine: EmbeddedEngine, body: dict[str, Any], subs: list[Submission],
                 form: fmt.Format) -> web.StreamResponse:
    stream, include_usage = bool_field(body, "stream"), _stream_options(body)
    if not stream:
        jobs = await wait_all(engine, submit(engine, subs))
        return web.json_response(form.response(jobs, int(time.time())))
    notifier = TokenNotifier()
    queued = submit(engine, subs, notifier.on_token)
    resp = await open_sse(request)
    try:
        async for index, chunk in merged_chunks(engine, queued, notifier):
            for event in form.chunk_events(index, chunk):
                await send_event(resp, event)
        for event in form.closing_events(include_usage):
            await send_event(resp, event)
    except (asyncio.CancelledError, ConnectionResetError):
        abort_all(engine, subs, "Aborted: client disconnected")
        raise
    except Exception as e:  # noqa: BLE001 - headers are out: report in-band, as SGLang does
        abort_all(engine, subs, "Aborted: the stream failed")
        await send_event(resp, {"error": fmt.error_body(f"{type(e).__name__}: {e}")})
    await send_event(resp, "[DONE]")
    await resp.write_eof()
    return resp
