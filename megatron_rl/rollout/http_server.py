"""SGLang's native HTTP API in front of the embedded engine (aiohttp).

Handlers never run the model: generation lives in the engine's scheduler thread and
weight updates in worker threads, so /health stays answerable during a long batch. Every
request the engine refuses is a 4xx with SGLang's error body
``{"object": "error", "message": ..., "type": "BadRequest", "param": null, "code": 400}``;
an unexpected exception is a 500 with the same shape and the server keeps serving.
Endpoints and reply shapes: see ``megatron_rl.rollout.sglang_api`` and docs/embedded_engine.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from aiohttp import web

from megatron_rl.rollout.engine import EmbeddedEngine, Job
from megatron_rl.rollout.sampling import BadRequest, parse_sampling_params

log = logging.getLogger(__name__)
ENGINE_KEY: web.AppKey[EmbeddedEngine] = web.AppKey("engine", EmbeddedEngine)
MAX_BODY_BYTES = 4 << 30  # weight payloads over /update_weights_from_tensor can be large


def error_response(message: str, status: int = 400) -> web.Response:
    kind = "BadRequest" if status < 500 else "InternalServerError"
    body = {"object": "error", "message": message, "type": kind, "param": None, "code": status}
    return web.json_response(body, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except BadRequest as e:
        return error_response(str(e), 400)
    except web.HTTPException:
        raise
    except Exception as e:  # a bug: answer 500, keep the server alive
        log.exception("handler for %s failed", request.path)
        return error_response(f"{type(e).__name__}: {e}", 500)


async def _json_body(request: web.Request) -> dict[str, Any]:
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


def _per_prompt(value: Any, count: int, name: str, is_batch: bool) -> list[Any]:
    """SGLang's batch rule: a field is one value for all prompts, or a list of one per prompt."""
    if is_batch and isinstance(value, list):
        if len(value) != count:
            raise BadRequest(f"{name} has {len(value)} entries for {count} prompts.")
        return value
    return [value] * count


def _prompts(body: dict[str, Any], engine: EmbeddedEngine) -> tuple[list[list[int]], bool]:
    ids, text = body.get("input_ids"), body.get("text")
    if ids is None and text is not None:
        if engine.tokenizer is None:
            raise BadRequest("`text` needs a tokenizer and this model has none: send `input_ids`.")
        texts = text if isinstance(text, list) else [text]
        if not all(isinstance(t, str) for t in texts):
            raise BadRequest("`text` must be a string or a list of strings.")
        encoded = [engine.tokenizer.encode(t) for t in texts]
        return encoded, isinstance(text, list)
    if ids is None:
        raise BadRequest("Give `input_ids` (a list of token ids, or a list of such lists).")
    if not isinstance(ids, list) or not ids:
        raise BadRequest("`input_ids` must be a non-empty list of token ids (or of lists of token ids).")
    if all(isinstance(p, list) for p in ids):
        if not all(p and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in ids):
            raise BadRequest("Every prompt in batched `input_ids` must be a non-empty list of integers.")
        return ids, True
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise BadRequest("`input_ids` must hold integers only.")
    return [ids], False


def _reply(job: Job, engine: EmbeddedEngine) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": job.rid,
        "finish_reason": job.finish,
        "prompt_tokens": len(job.prompt),
        "completion_tokens": len(job.output_ids),
        "cached_tokens": 0,
        "weight_version": engine.weight_version,
        "e2e_latency": time.perf_counter() - job.start,
    }
    if job.return_logprob:
        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(job.output_logprobs, job.output_ids)]
        start = max(job.logprob_start_len, 0)
        meta["input_token_logprobs"] = [
            [lp, t, None] for lp, t in zip(job.input_logprobs, job.prompt[start:])
        ] if job.logprob_start_len >= 0 else []
    text = engine.tokenizer.decode(job.output_ids) if engine.tokenizer is not None else ""
    return {"text": text, "output_ids": list(job.output_ids), "meta_info": meta}


async def generate(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE_KEY]
    body = await _json_body(request)
    if body.get("stream"):
        raise BadRequest("stream=true is not supported by the embedded engine; send stream=false.")
    for field_name in ("top_logprobs_num", "token_ids_logprob", "input_embeds", "image_data", "lora_path"):
        value = body.get(field_name)
        if value not in (None, 0, [], False) and not (isinstance(value, list) and not any(value)):
            raise BadRequest(f"`{field_name}` is not supported by the embedded engine; use SGLang for it.")
    prompts, is_batch = _prompts(body, engine)
    count = len(prompts)
    params = [parse_sampling_params(p, engine.vocab_size)
              for p in _per_prompt(body.get("sampling_params"), count, "sampling_params", is_batch)]
    rid = body.get("rid")
    rids = _per_prompt(rid, count, "rid", is_batch) if isinstance(rid, list) or rid is None else (
        [rid] if count == 1 else [f"{rid}-{i}" for i in range(count)])
    rids = [str(r) if r is not None else uuid.uuid4().hex for r in rids]
    want_lp = _per_prompt(body.get("return_logprob"), count, "return_logprob", is_batch)
    starts = _per_prompt(body.get("logprob_start_len"), count, "logprob_start_len", is_batch)
    futures, owners = [], []
    try:
        for i, prompt in enumerate(prompts):
            start = -1 if starts[i] is None else starts[i]
            if not isinstance(start, int) or isinstance(start, bool):
                raise BadRequest(f"logprob_start_len must be an integer, got {start!r}.")
            got = engine.submit(prompt, params[i], rid=rids[i], return_logprob=bool(want_lp[i]),
                                logprob_start_len=start)
            futures += got
            owners += [rids[i]] * len(got)
        jobs = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
    except (asyncio.CancelledError, BadRequest):
        for r in set(owners):  # the client went away (or one prompt was bad): stop the rest
            engine.abort(r, message="Aborted: client disconnected or request refused")
        raise
    replies = [_reply(job, engine) for job in jobs]
    if not is_batch and params[0].n == 1:
        return web.json_response(replies[0])
    return web.json_response(replies)


async def health(request: web.Request) -> web.Response:
    return web.Response(status=200 if request.app[ENGINE_KEY].alive() else 503)


async def model_info(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    return web.json_response({
        "model_path": engine.model_path, "tokenizer_path": engine.model_path if engine.tokenizer else None,
        "is_generation": True, "preferred_sampling_params": None, "weight_version": engine.weight_version,
    })


async def server_info(request: web.Request) -> web.Response:
    from megatron_rl import __version__
    from megatron_rl.rollout.sglang_api import SGLANG_VERSION_TESTED

    engine = request.app[ENGINE_KEY]
    return web.json_response({
        "model_path": engine.model_path, "tp_size": 1, "engine": "megatron-rl-embedded",
        "version": f"megatron-rl {__version__} (SGLang {SGLANG_VERSION_TESTED} API)",
        "max_batch_size": engine.max_batch_size, "context_length": engine.context_len,
        "vocab_size": engine.vocab_size, "weight_version": engine.weight_version,
        "enable_deterministic_inference": engine.deterministic,  # SGLang's server-args name
    })


async def weight_version(request: web.Request) -> web.Response:
    return web.json_response({"weight_version": request.app[ENGINE_KEY].weight_version})


async def flush_cache(request: web.Request) -> web.Response:
    # No prefix cache to flush: every batch is prefilled from scratch.
    return web.Response(text="Cache flushed.\n")


async def pause_generation(request: web.Request) -> web.Response:
    body = await _json_body(request)
    request.app[ENGINE_KEY].pause(str(body.get("mode") or "abort"))
    return web.json_response({"message": "Generation paused successfully.", "status": "ok"})


async def continue_generation(request: web.Request) -> web.Response:
    request.app[ENGINE_KEY].resume()
    return web.json_response({"message": "Generation continued successfully.", "status": "ok"})


async def abort_request(request: web.Request) -> web.Response:
    body = await _json_body(request)
    request.app[ENGINE_KEY].abort(str(body.get("rid") or ""), abort_all=bool(body.get("abort_all")))
    return web.Response(status=200)


async def memory_occupation(request: web.Request) -> web.Response:
    # CPU: nothing to give back to a colocated trainer; accepted so the same driver code runs.
    await _json_body(request)
    return web.json_response(None)


def _need(body: dict[str, Any], *keys: str) -> list[Any]:
    missing = [k for k in keys if k not in body]
    if missing:
        raise BadRequest(f"Missing field(s) {missing}.")
    return [body[k] for k in keys]


async def _weights_reply(request: web.Request, body: dict[str, Any], load: Any, *args: Any) -> web.Response:
    engine = request.app[ENGINE_KEY]
    if body.get("abort_all_requests"):
        engine.abort(abort_all=True, message="Aborted for a weight update")
    try:
        count = await asyncio.to_thread(load, *args)
    except BadRequest as e:
        return web.json_response({"success": False, "message": str(e)}, status=400)
    version = body.get("weight_version")
    if version is not None:
        engine.weight_version = str(version)
    return web.json_response({"success": True, "message": f"Succeeded to update {count} tensors.",
                              "num_paused_requests": 0})


async def update_from_disk(request: web.Request) -> web.Response:
    body = await _json_body(request)
    (path,) = _need(body, "model_path")
    return await _weights_reply(request, body, request.app[ENGINE_KEY].load_from_disk, str(path))


async def update_from_tensor(request: web.Request) -> web.Response:
    body = await _json_body(request)
    (serialized,) = _need(body, "serialized_named_tensors")
    return await _weights_reply(request, body, request.app[ENGINE_KEY].load_serialized, serialized)


async def update_from_distributed(request: web.Request) -> web.Response:
    body = await _json_body(request)
    names, dtypes, shapes = _need(body, "names", "dtypes", "shapes")
    group = str(body.get("group_name") or "weight_update_group")
    fmt = body.get("load_format")
    if fmt not in (None, "flattened_bucket"):
        raise BadRequest(f"load_format {fmt!r} is not supported; use null or 'flattened_bucket'.")
    engine = request.app[ENGINE_KEY]
    return await _weights_reply(request, body, engine.receive_weights, names, dtypes, shapes, group,
                                fmt == "flattened_bucket")


async def init_group(request: web.Request) -> web.Response:
    body = await _json_body(request)
    addr, port, offset, world = _need(body, "master_address", "master_port", "rank_offset", "world_size")
    group = str(body.get("group_name") or "weight_update_group")
    backend = str(body.get("backend") or "nccl")
    try:
        await asyncio.to_thread(request.app[ENGINE_KEY].init_weight_group, str(addr), int(port), int(offset),
                                int(world), group, backend)
    except (BadRequest, RuntimeError, ValueError) as e:  # rendezvous failures are the caller's setup
        return web.json_response({"success": False, "message": f"Failed to initialize group: {e}"}, status=400)
    return web.json_response({"success": True, "message": "Succeeded to initialize custom process group."})


async def destroy_group(request: web.Request) -> web.Response:
    body = await _json_body(request)
    group = str(body.get("group_name") or "weight_update_group")
    try:
        await asyncio.to_thread(request.app[ENGINE_KEY].destroy_weight_group, group)
    except BadRequest as e:
        return web.json_response({"success": False, "message": str(e)}, status=400)
    return web.json_response({"success": True, "message": "Succeeded to destroy custom process group."})


def build_app(engine: EmbeddedEngine, *, stop_engine_on_shutdown: bool = True) -> web.Application:
    """The aiohttp app serving ``engine``; by default shutting the app down stops the engine."""
    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_BODY_BYTES)
    app[ENGINE_KEY] = engine
    both = ("GET", "POST")
    routes = [
        (("GET", "POST"), "/health", health), (both, "/health_generate", health),
        (("GET",), "/get_model_info", model_info), (("GET",), "/get_server_info", server_info),
        (("GET",), "/get_weight_version", weight_version),
        (("POST", "PUT"), "/generate", generate), (both, "/flush_cache", flush_cache),
        (("POST",), "/pause_generation", pause_generation), (("POST",), "/continue_generation", continue_generation),
        (("POST",), "/abort_request", abort_request),
        (both, "/release_memory_occupation", memory_occupation), (both, "/resume_memory_occupation", memory_occupation),
        (("POST",), "/init_weights_update_group", init_group), (("POST",), "/destroy_weights_update_group", destroy_group),
        (("POST",), "/update_weights_from_distributed", update_from_distributed),
        (("POST",), "/update_weights_from_tensor", update_from_tensor),
        (("POST",), "/update_weights_from_disk", update_from_disk),
    ]
    for methods, path, handler in routes:
        for method in methods:
            app.router.add_route(method, path, handler)
    if stop_engine_on_shutdown:
        app.on_shutdown.append(_on_shutdown)
    return app


async def _on_shutdown(app: web.Application) -> None:
    await asyncio.to_thread(app[ENGINE_KEY].shutdown)
