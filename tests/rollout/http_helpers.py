"""Driving the embedded engine's aiohttp app in process: a free local port, a client session, SSE."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from megatron_rl.rollout.http_server import build_app


def serve(engine, body):
    """Run ``body(session, base_url)`` against the engine's app on a free local port.

    Handlers are cancelled when their client hangs up, as under ``megatron-rl serve``.
    """
    async def main():
        server = TestServer(build_app(engine, stop_engine_on_shutdown=False), host="127.0.0.1",
                            handler_cancellation=True)
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as session:
                return await body(session, str(server.make_url("")).rstrip("/"))
        finally:
            await server.close()
    return asyncio.run(main())


async def post(session, url, body, raw=None):
    """(status, JSON reply) of one POST; ``raw`` bytes replace the JSON body."""
    kwargs = {"data": raw} if raw is not None else {"json": body}
    async with session.post(url, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


async def post_sse(session, url, body) -> tuple[int, str, list[Any]]:
    """(status, content type, events) of a streamed POST; events are parsed JSON, or the string '[DONE]'.

    Checks the framing on the way: every event is one ``data: ...`` line followed by a blank line.
    """
    async with session.post(url, json=body) as resp:
        raw = (await resp.read()).decode()
        status, ctype = resp.status, resp.headers.get("Content-Type", "")
    assert raw.endswith("\n\n"), raw[-200:]
    events = []
    for block in raw[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block[:200]
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return status, ctype, events
