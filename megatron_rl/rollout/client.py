"""Async HTTP client for SGLang servers (and the embedded engine, which speaks the same API).

``ServerClient`` is one server's endpoints, typed. ``RolloutClient`` drives many servers:
each request goes to the live server with the fewest outstanding requests; a connection
error, a timeout or a 5xx marks that server dead (logged at ERROR) and the request is
retried on another one, so every request yields its samples exactly once, in input order.
A 4xx (the request itself is bad) or a malformed reply raises ``RolloutError`` at once.
It also implements ``megatron_rl.weights.sync.WeightReceiver`` (weight updates reach every
server). Payload shapes: ``megatron_rl.rollout.sglang_api``.

Use it inside one event loop at a time (``async with RolloutClient(...) as c``); the HTTP
session is made lazily in the running loop.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import aiohttp

from megatron_rl.errors import RolloutError
from megatron_rl.rollout import sglang_api as api
from megatron_rl.rollout.balancer import Server, ServerPool
from megatron_rl.rollout.types import RolloutRequest, Sample

if TYPE_CHECKING:
    import torch

    from megatron_rl.config.rollout import RolloutConfig

log = logging.getLogger(__name__)


class ServerUnavailable(Exception):
    """The server did not answer usefully (connection, timeout, 5xx): try another one."""


class ServerClient:
    """The native SGLang endpoints of one server."""

    def __init__(self, url: str, session: aiohttp.ClientSession, *, timeout_s: float = 600.0):
        self.url, self.session, self.timeout_s = url.rstrip("/"), session, timeout_s

    async def call(self, method: str, path: str, body: Any = None, *, timeout_s: float | None = None,
                   expect_json: bool = True) -> Any:
        """One HTTP call; ServerUnavailable on transport trouble or 5xx, RolloutError on 4xx."""
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.timeout_s)
        try:
            async with self.session.request(method, self.url + path, json=body, timeout=timeout) as resp:
                raw = await resp.read()
                status = resp.status
        except TimeoutError:
            raise ServerUnavailable(f"no answer to {path} within {timeout.total:g} s") from None
        except aiohttp.ClientError as e:
            raise ServerUnavailable(f"{type(e).__name__}: {e}") from None
        text = raw.decode("utf-8", errors="replace")
        if status >= 500:
            raise ServerUnavailable(f"HTTP {status} from {path}: {text[:300]}")
        if status >= 400:
            raise RolloutError(
                f"The rollout server at {self.url} refused {path} with HTTP {status}: {_error_text(text)}. "
                "This request would fail on any server: fix what the message names (prompt token ids, "
                "sampling parameters, weight names) rather than retrying.")
        if not expect_json:
            return text
        try:
            return await _decode_json(raw)
        except ValueError:
            raise api.MalformedReply(
                f"The rollout server at {self.url} answered {path} with something that is not JSON: "
                f"{text[:200]!r}. Check that the URL points at an SGLang server or `megatron-rl serve`, "
                "not another service on that port.") from None

    async def generate(self, payload: dict[str, Any], *, timeout_s: float | None = None) -> Any:
        return await self.call("POST", "/generate", payload, timeout_s=timeout_s)

    async def health(self, timeout_s: float = 10.0) -> bool:
        try:
            await self.call("GET", "/health_generate", timeout_s=timeout_s, expect_json=False)
            return True
        except (ServerUnavailable, RolloutError):
            return False

    async def get_model_info(self) -> dict[str, Any]:
        return await self.call("GET", "/get_model_info")

    async def get_server_info(self) -> dict[str, Any]:
        return await self.call("GET", "/get_server_info")

    async def flush_cache(self) -> None:
        await self.call("POST", "/flush_cache", expect_json=False)

    async def pause_generation(self, mode: str = "abort") -> None:
        """SGLang's modes: abort (end running requests), in_place (freeze them between steps)."""
        await self.call("POST", "/pause_generation", {"mode": mode})

    async def continue_generation(self) -> None:
        await self.call("POST", "/continue_generation", {})

    async def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        await self.call("POST", "/abort_request", {"rid": rid, "abort_all": abort_all}, expect_json=False)

    async def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        await self.call("POST", "/release_memory_occupation", {"tags": tags}, expect_json=False)

    async def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        await self.call("POST", "/resume_memory_occupation", {"tags": tags}, expect_json=False)

    async def _weights(self, path: str, body: dict[str, Any]) -> str:
        return api.check_success(await self.call("POST", path, body), self.url, path)

    async def init_weights_update_group(self, *, master_address: str, master_port: int, rank_offset: int,
                                        world_size: int, group_name: str, backend: str) -> str:
        return await self._weights("/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend})

    async def destroy_weights_update_group(self, group_name: str) -> str:
        return await self._weights("/destroy_weights_update_group", {"group_name": group_name})

    async def update_weights_from_distributed(self, *, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                              group_name: str, load_format: str | None = None,
                                              weight_version: str | None = None) -> str:
        return await self._weights("/update_weights_from_distributed", {
            "names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
            "load_format": load_format, "flush_cache": False, "weight_version": weight_version})

    async def update_weights_from_tensor(self, serialized_named_tensors: list[str], *, load_format: str | None = None,
                                         weight_version: str | None = None) -> str:
        return await self._weights("/update_weights_from_tensor", {
            "serialized_named_tensors": serialized_named_tensors, "load_format": load_format,
            "flush_cache": False, "weight_version": weight_version})

    async def update_weights_from_disk(self, model_path: str, *, weight_version: str | None = None) -> str:
        return await self._weights("/update_weights_from_disk", {
            "model_path": model_path, "weight_version": weight_version})


class RolloutClient:
    """Many servers behind one ``generate``; also the ``WeightReceiver`` of weight syncs."""

    def __init__(self, urls: Sequence[str], *, engine: str = "embedded", tp_sizes: Sequence[int] | None = None,
                 request_timeout_s: float = 1800.0, max_retries: int = 3, max_inflight_per_server: int = 256,
                 no_server_timeout_s: float = 600.0, reprobe_interval_s: float = 5.0,
                 control_timeout_s: float = 1800.0):
        self.pool = ServerPool(urls, tp_sizes, max_inflight=max_inflight_per_server,
                               reprobe_interval_s=reprobe_interval_s)
        self.engine, self.request_timeout_s, self.max_retries = engine, request_timeout_s, max_retries
        self.no_server_timeout_s, self.control_timeout_s = no_server_timeout_s, control_timeout_s
        self.expected_weight_version: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_config(cls, cfg: RolloutConfig, urls: Sequence[str] | None = None, **kwargs: Any) -> RolloutClient:
        """From the rollout section; ``urls`` defaults to ``cfg.server_urls`` (attach mode)."""
        urls = list(urls if urls is not None else cfg.server_urls)
        return cls(urls, engine=cfg.engine, tp_sizes=[cfg.tp_size] * len(urls),
                   request_timeout_s=cfg.request_timeout_s, max_retries=cfg.max_retries,
                   max_inflight_per_server=cfg.max_inflight_per_server,
                   no_server_timeout_s=cfg.health_timeout_s, **kwargs)

    # ------------------------------------------------------------------ plumbing
    def _server(self, server: Server) -> ServerClient:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            self._session_loop = loop
        return ServerClient(server.url, self._session, timeout_s=self.control_timeout_s)

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    async def __aenter__(self) -> RolloutClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _probe(self, server: Server) -> bool:
        client = self._server(server)
        if not await client.health():
            return False
        if self.expected_weight_version is None:
            return True
        info = await client.get_model_info()
        if info.get("weight_version") != self.expected_weight_version:
            server.last_error = (f"serves weight version {info.get('weight_version')!r}, "
                                 f"expected {self.expected_weight_version!r} (it missed a sync)")
            return False
        return True

    # ------------------------------------------------------------------ generation
    async def generate(self, requests: Sequence[RolloutRequest]) -> list[Sample]:
        """All samples of all requests: request order, then sample_index order within one."""
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise ValueError(f"request ids must be unique within one generate call; repeated: {dup}")
        results: dict[str, list[Sample]] = {}
        try:
            async with asyncio.TaskGroup() as tasks:  # one failure cancels the rest
                for request in requests:
                    tasks.create_task(self._run(request, results))
        except ExceptionGroup as group:
            raise group.exceptions[0] from None
        return [s for r in requests for s in results[r.request_id]]

    async def _run(self, request: RolloutRequest, results: dict[str, list[Sample]]) -> None:
        payload = api.generate_payload(request.prompt_ids, request.sampling.to_sglang(), rid=request.request_id)
        outputs, server, latency, attempts = await self._call_with_retries(
            request.request_id, payload, request.sampling.n, want_input_logprobs=False)
        results[request.request_id] = [
            Sample(request_id=request.request_id, sample_index=i, prompt_ids=list(request.prompt_ids),
                   response_ids=o.output_ids, response_logprobs=o.output_logprobs,
                   finish_reason=o.finish_type,  # type: ignore[arg-type]
                   matched_stop=o.matched if o.finish_type == "stop" else None, server_url=server,
                   latency_s=latency, attempts=attempts, weight_version=o.weight_version,
                   token_weight_versions=o.token_weight_versions, metadata=request.metadata)
            for i, o in enumerate(outputs)]

    async def _call_with_retries(self, rid: str, payload: dict[str, Any], expected: int, *,
                                 want_input_logprobs: bool) -> tuple[list[api.GenerateOutput], str, float, int]:
        tried: set[str] = set()
        failures: list[str] = []
        for attempt in range(1, self.max_retries + 2):
            deadline = time.monotonic() + self.no_server_timeout_s
            server = await self.pool.acquire(tried, deadline, self._probe)
            tried.add(server.url)
            start = time.perf_counter()
            ok = False
            try:
                body = await self._server(server).generate(payload, timeout_s=self.request_timeout_s)
                outputs = api.parse_generate_reply(body, server.url, expected, want_input_logprobs=want_input_logprobs)
                ok = True
                return outputs, server.url, time.perf_counter() - start, attempt
            except ServerUnavailable as e:
                failures.append(f"{server.url}: {e}")
                log.error("Rollout request %s failed on %s (attempt %d of %d): %s", rid, server.url,
                          attempt, self.max_retries + 1, e)
                self.pool.mark_dead(server, str(e))
                asyncio.ensure_future(self._abort_quietly(server, rid))
            finally:
                await self.pool.release(server, ok)
        raise RolloutError(
            f"Rollout request {rid} failed on {len(failures)} server(s) and `rollout.max_retries` "
            f"({self.max_retries}) is spent: {'; '.join(failures)}. Check the servers' logs (out of "
            "memory, crashed, unreachable) and `rollout.request_timeout_s`.")

    async def _abort_quietly(self, server: Server, rid: str) -> None:
        """Best effort: a timed-out request should not keep burning the server it left."""
        try:
            await self._server(server).call("POST", "/abort_request", {"rid": rid}, timeout_s=5.0, expect_json=False)
        except (ServerUnavailable, RolloutError):
            pass

    async def score(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Teacher-forced log-probs: entry t-1 of each list is log p(seq[t] | seq[:t]), t >= 1.

        SGLang's ``logprob_start_len`` path with ``max_new_tokens=0``: the log-softmax of the
        raw logits (no temperature), what the trainer's log-probs are compared against.
        """
        async def one(i: int, seq: Sequence[int]) -> list[float]:
            payload = api.generate_payload(list(seq), {"max_new_tokens": 0}, rid=f"score-{i}-{time.time_ns()}",
                                           logprob_start_len=0)
            outputs, *_ = await self._call_with_retries(payload["rid"], payload, 1, want_input_logprobs=True)
            values = outputs[0].input_logprobs or []
            return [float(v) for v in values[1:] if v is not None]

        return list(await asyncio.gather(*(one(i, s) for i, s in enumerate(sequences))))

    # ------------------------------------------------------------------ all servers
    async def _each(self, method: str, *args: Any, live_only: bool = False, **kwargs: Any) -> list[Any]:
        servers = self.pool.alive() if live_only else self.pool.servers
        dead = [s.url for s in servers if not s.alive]
        if dead:
            raise RolloutError(
                f"Rollout server(s) {dead} are down, so `{method}` cannot reach every server. A weight sync "
                "must update all servers: restart them (or drop them from `rollout.server_urls`).")

        async def call(server: Server) -> Any:
            try:
                return await getattr(self._server(server), method)(*args, **kwargs)
            except ServerUnavailable as e:
                self.pool.mark_dead(server, str(e))
                raise RolloutError(f"Rollout server {server.url} failed `{method}`: {e}. Check its log.") from None

        return list(await asyncio.gather(*(call(s) for s in servers)))

    async def health(self) -> dict[str, bool]:
        """/health_generate of every server (dead or not)."""
        answers = await asyncio.gather(*(self._server(s).health() for s in self.pool.servers))
        return {s.url: ok for s, ok in zip(self.pool.servers, answers)}

    def num_weight_ranks(self) -> int:
        return sum(s.tp_size for s in self.pool.servers)

    async def pause_generation(self, mode: str = "abort") -> None:
        await self._each("pause_generation", mode, live_only=True)

    async def continue_generation(self) -> None:
        await self._each("continue_generation", live_only=True)

    async def flush_cache(self) -> None:
        await self._each("flush_cache", live_only=True)

    async def abort_all(self) -> None:
        await self._each("abort_request", "", True, live_only=True)

    async def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        await self._each("release_memory_occupation", tags, live_only=True)

    async def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        await self._each("resume_memory_occupation", tags, live_only=True)

    async def init_weights_update_group(self, *, master_address: str, master_port: int, world_size: int,
                                        group_name: str, backend: str) -> None:
        """Server i joins at rank 1 + (TP sizes of servers before it), as SGLang's rank_offset."""
        offsets = [1 + sum(s.tp_size for s in self.pool.servers[:i]) for i in range(len(self.pool.servers))]

        async def join(server: Server, offset: int) -> None:
            await self._server(server).init_weights_update_group(
                master_address=master_address, master_port=master_port, rank_offset=offset,
                world_size=world_size, group_name=group_name, backend=backend)

        await asyncio.gather(*(join(s, o) for s, o in zip(self.pool.servers, offsets)))

    async def destroy_weights_update_group(self, group_name: str) -> None:
        await self._each("destroy_weights_update_group", group_name)

    async def update_weights_from_distributed(self, *, names: list[str], dtypes: list[str], shapes: list[list[int]],
                                              group_name: str, flattened: bool, weight_version: str | None) -> None:
        await self._each("update_weights_from_distributed", names=names, dtypes=dtypes, shapes=shapes,
                         group_name=group_name, load_format="flattened_bucket" if flattened else None,
                         weight_version=weight_version)
        self._note_version(weight_version)

    async def update_weights_from_disk(self, path: str, *, weight_version: str | None) -> None:
        await self._each("update_weights_from_disk", path, weight_version=weight_version)
        self._note_version(weight_version)

    async def update_weights_from_tensor(self, named_tensors: Sequence[tuple[str, torch.Tensor]], *,
                                         weight_version: str | None) -> None:
        if self.engine == "sglang":
            # SGLang expects its own pickled CUDA-IPC handles here (same node, per TP rank);
            # building them needs sglang in the trainer, which this layer never imports.
            raise RolloutError(
                "`rollout.sync_transport=tensor` is implemented for the embedded engine only; with "
                "SGLang servers use `rollout.sync_transport=distributed` (or `disk`).")
        payload = [_serialize_safetensors_b64(named_tensors)]
        await self._each("update_weights_from_tensor", payload, weight_version=weight_version)
        self._note_version(weight_version)

    async def post_weights(self, path: str, body: dict[str, Any]) -> None:
        """POST a weight-update body built by ``megatron_rl.weights`` (e.g. a delta or a shared-memory
        handle) to every server; raises RolloutError on any refusal."""
        await self._each("_weights", path, body)
        self._note_version(body.get("weight_version"))

    def _note_version(self, version: str | None) -> None:
        if version is not None:
            self.expected_weight_version = version


def _error_text(text: str) -> str:
    """The ``message`` of SGLang's error body, else the raw text (trimmed)."""
    import json

    try:
        body = json.loads(text)
        if isinstance(body, dict):
            inner = body.get("error") if isinstance(body.get("error"), dict) else body
            if "message" in inner:
                return str(inner["message"])
    except ValueError:
        pass
    return text[:300]


async def _decode_json(raw: bytes) -> Any:
    import json

    if len(raw) > 1 << 20:  # big replies: keep the event loop free while parsing
        return await asyncio.to_thread(json.loads, raw)
    return json.loads(raw)


def _serialize_safetensors_b64(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> str:
    """The embedded engine's /update_weights_from_tensor format (no pickle over the network)."""
    from safetensors.torch import save

    tensors = {name: t.detach().cpu().contiguous() for name, t in named_tensors}
    return base64.b64encode(save(tensors)).decode("ascii")

