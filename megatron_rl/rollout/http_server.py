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
import logging
from typing import Any

from aiohttp import web

from megatron_rl.rollout.engine import EmbeddedEngine
from megatron_rl.rollout.openai_api import add_openai_routes
from megatron_rl.rollout.sampling import BadRequest
from megatron_rl.rollout.server_info import load_v054, loads_v1, server_info_body
from megatron_rl.rollout.serving import (
    Submission,
    engine_params,
    generate_reply,
    json_body,
    request_ids,
    submit,
    wait_all,
)
from megatron_rl.rollout.streaming import stream_generate

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


# Request fields with an effect the engine does not have: refused unless empty/false.
_UNSUPPORTED = ("top_logprobs_num", "token_ids_logprob", "input_embeds", "image_data", "video_data",
                "audio_data", "lora_path", "custom_logit_processor", "return_hidden_states",
                "return_routed_experts", "session_params")


def _submissions(body: dict[str, Any], engine: EmbeddedEngine) -> tuple[list[Submission], bool]:
    """The prompts of a /generate body as submissions, and whether it was a batch."""
    for field_name in _UNSUPPORTED:
        value = body.get(field_name)
        if value not in (None, 0, [], False) and not (isinstance(value, list) and not any(value)):
            raise BadRequest(f"`{field_name}` is not supported by the embedded engine; use SGLang for it.")
    prompts, is_batch = _prompts(body, engine)
    count = len(prompts)
    raws = _per_prompt(body.get("sampling_params"), count, "sampling_params", is_batch)
    rids = request_ids(body.get("rid"), count)
    want_lp = _per_prompt(body.get("return_logprob"), count, "return_logprob", is_batch)
    starts = _per_prompt(body.get("logprob_start_len"), count, "logprob_start_len", is_batch)
    with_text = _per_prompt(body.get("return_text_in_logprobs"), count, "return_text_in_logprobs", is_batch)
    subs = []
    for i, prompt in enumerate(prompts):
        start = -1 if starts[i] is None else starts[i]
        if not isinstance(start, int) or isinstance(start, bool):
            raise BadRequest(f"logprob_start_len must be an integer, got {start!r}.")
        params, options = engine_params(raws[i], engine.vocab_size)
        subs.append(Submission(prompt, params, options, rids[i], bool(want_lp[i]), start, bool(with_text[i])))
    return subs, is_batch


async def generate(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE_KEY]
    body = await json_body(request)
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise BadRequest(f"`stream` must be true or false, got {stream!r}.")
    subs, is_batch = _submissions(body, engine)
    single = not is_batch and subs[0].params.n == 1
    if stream:
        return await stream_generate(request, engine, subs, indexed=not single)
    queued = submit(engine, subs)
    jobs = await wait_all(engine, queued)
    replies = [generate_reply(job, sub, engine) for job, (sub, _) in zip(jobs, queued)]
    return web.json_response(replies[0] if single else replies)


async def health(request: web.Request) -> web.Response:
    return web.Response(status=200 if request.app[ENGINE_KEY].alive() else 503)


async def model_info(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    return web.json_response({
        "model_path": engine.model_path, "tokenizer_path": engine.model_path if engine.tokenizer else None,
        "is_generation": True, "preferred_sampling_params": None, "weight_version": engine.weight_version,
    })


async def server_info(request: web.Request) -> web.Response:
    return web.json_response(server_info_body(request.app[ENGINE_KEY], request.host))


async def get_load(request: web.Request) -> web.Response:
    return web.json_response(load_v054(request.app[ENGINE_KEY]))


async def v1_loads(request: web.Request) -> web.Response:
    include = request.query.get("include")
    sections = [s.strip() for s in include.split(",")] if include else None
    dp_rank = request.query.get("dp_rank")
    if dp_rank not in (None, "0"):
        raise BadRequest(f"dp_rank={dp_rank} does not exist: the embedded engine has one rank (0).")
    if request.query.get("format", "json") != "json":
        raise BadRequest("Only format=json is served by the embedded engine.")
    return web.json_response(loads_v1(request.app[ENGINE_KEY], sections))


async def weight_version(request: web.Request) -> web.Response:
    return web.json_response({"weight_version": request.app[ENGINE_KEY].weight_version})


async def flush_cache(request: web.Request) -> web.Response:
    # No prefix cache to flush: every batch is prefilled from scratch.
    return web.Response(text="Cache flushed.\n")


async def pause_generation(request: web.Request) -> web.Response:
    body = await json_body(request)
    # a thread: pause returns once the forward in flight has ended, which the loop must not wait on
    await asyncio.to_thread(request.app[ENGINE_KEY].pause, str(body.get("mode") or "abort"))
    return web.json_response({"message": "Generation paused successfully.", "status": "ok"})


async def continue_generation(request: web.Request) -> web.Response:
    request.app[ENGINE_KEY].resume()
    return web.json_response({"message": "Generation continued successfully.", "status": "ok"})


async def abort_request(request: web.Request) -> web.Response:
    body = await json_body(request)
    request.app[ENGINE_KEY].abort(str(body.get("rid") or ""), abort_all=bool(body.get("abort_all")))
    return web.Response(status=200)


async def memory_occupation(request: web.Request) -> web.Response:
    # CPU: nothing to give back to a colocated trainer; accepted so the same driver code runs.
    await json_body(request)
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
    body = await json_body(request)
    (path,) = _need(body, "model_path")
    return await _weights_reply(request, body, request.app[ENGINE_KEY].load_from_disk, str(path))


async def update_from_tensor(request: web.Request) -> web.Response:
    body = await json_body(request)
    (serialized,) = _need(body, "serialized_named_tensors")
    engine = request.app[ENGINE_KEY]
    fmt = body.get("load_format")
    if fmt == "shared_memory":  # colocated: a JSON handle to a file of --weight-shm-dir
        return await _weights_reply(request, body, engine.load_shared_memory, serialized)
    if fmt is not None:
        raise BadRequest(f"load_format {fmt!r} is not supported here; use null (base64 safetensors) or "
                         "'shared_memory'.")
    return await _weights_reply(request, body, engine.load_serialized, serialized)


async def update_from_distributed(request: web.Request) -> web.Response:
    body = await json_body(request)
    names, dtypes, shapes = _need(body, "names", "dtypes", "shapes")
    group = str(body.get("group_name") or "weight_update_group")
    fmt = body.get("load_format")
    if fmt not in (None, "flattened_bucket", "delta"):
        raise BadRequest(f"load_format {fmt!r} is not supported; use null, 'flattened_bucket' or 'delta'.")
    delta = _need(body, "delta")[0] if fmt == "delta" else None
    engine = request.app[ENGINE_KEY]
    return await _weights_reply(request, body, engine.receive_weights, names, dtypes, shapes, group,
                                fmt == "flattened_bucket", delta)


async def init_group(request: web.Request) -> web.Response:
    body = await json_body(request)
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
    body = await json_body(request)
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
        (("GET",), "/get_weight_version", weight_version), (("GET",), "/get_load", get_load),
        (("GET",), "/v1/loads", v1_loads),
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
    add_openai_routes(app, ENGINE_KEY)
    if stop_engine_on_shutdown:
        app.on_shutdown.append(_on_shutdown)
    return app


async def _on_shutdown(app: web.Application) -> None:
    await asyncio.to_thread(app[ENGINE_KEY].shutdown)
