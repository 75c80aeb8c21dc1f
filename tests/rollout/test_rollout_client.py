"""RolloutClient against fake SGLang servers: balancing, failover, malformed replies, timeouts."""

import asyncio
import logging
import time

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from megatron_rl.errors import RolloutError
from megatron_rl.rollout.client import RolloutClient
from megatron_rl.rollout.sglang_api import MalformedReply
from megatron_rl.rollout.types import RolloutRequest, SamplingParams


def reply_for(body, tag=0):
    """A well-formed SGLang reply echoing the prompt: output = [tag, last prompt token]."""
    prompt, n = body["input_ids"], body["sampling_params"].get("n", 1)
    one = {"text": "", "output_ids": [tag, prompt[-1]], "meta_info": {
        "id": body.get("rid"), "finish_reason": {"type": "stop", "matched": prompt[-1]},
        "prompt_tokens": len(prompt), "completion_tokens": 2, "weight_version": "default",
        "output_token_logprobs": [[-0.5, tag, None], [-0.25, prompt[-1], None]]}}
    return one if n == 1 else [one] * n


class Fake:
    """A fake server whose /generate behaviour is a coroutine ``handler(request_body) -> Response``."""

    def __init__(self, handler, tag):
        self.handler, self.tag, self.hits, self.inflight, self.max_inflight, self.aborts = handler, tag, 0, 0, 0, []
        self.healthy, self.version = True, "default"

    def app(self):
        async def generate(request):
            body = await request.json()
            self.hits += 1
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            try:
                return await self.handler(self, body)
            finally:
                self.inflight -= 1

        async def health(request):
            return web.Response(status=200 if self.healthy else 503)

        async def abort(request):
            self.aborts.append((await request.json()).get("rid"))
            return web.Response()

        async def info(request):
            return web.json_response({"weight_version": self.version})

        app = web.Application()
        app.router.add_post("/generate", generate)
        app.router.add_get("/health_generate", health)
        app.router.add_post("/abort_request", abort)
        app.router.add_get("/get_model_info", info)
        return app


async def good(fake, body):
    await asyncio.sleep(0.02)
    return web.json_response(reply_for(body, fake.tag))


def run_fakes(handlers, body, **client_kw):
    async def main():
        fakes = [Fake(h, tag) for tag, h in enumerate(handlers)]
        servers = [TestServer(f.app(), host="127.0.0.1") for f in fakes]
        for s in servers:
            await s.start_server()
        try:
            urls = [str(s.make_url("")).rstrip("/") for s in servers]
            async with RolloutClient(urls, **client_kw) as client:
                return await body(client, fakes)
        finally:
            for s in servers:
                await s.close()
    return asyncio.run(main())


def requests(count, n=1):
    return [RolloutRequest(f"q{i}", [i + 1, 100 + i], SamplingParams(n=n)) for i in range(count)]


def test_least_outstanding_balancing_and_inflight_cap():
    async def body(client, fakes):
        return await client.generate(requests(24)), fakes
    samples, fakes = run_fakes([good, good], body, max_inflight_per_server=3)
    assert [s.request_id for s in samples] == [f"q{i}" for i in range(24)]
    assert [s.response_ids[1] for s in samples] == [100 + i for i in range(24)]  # each its own answer
    assert [f.hits for f in fakes] == [12, 12] and max(f.max_inflight for f in fakes) == 3


def test_failing_server_is_marked_dead_and_requests_retry_elsewhere(caplog):
    async def broken(fake, body):
        return web.Response(status=503, text="overloaded")

    async def body(client, fakes):
        return await client.generate(requests(10, n=2)), fakes, client.pool.servers
    with caplog.at_level(logging.ERROR, logger="megatron_rl.rollout"):
        samples, fakes, servers = run_fakes([broken, good], body, reprobe_interval_s=60)
    assert [(s.request_id, s.sample_index) for s in samples] == [(f"q{i}", j) for i in range(10) for j in range(2)]
    assert {s.server_url for s in samples} == {servers[1].url} and not servers[0].alive
    assert fakes[0].hits >= 1 and any(s.attempts == 2 for s in samples)
    assert any("marked dead" in r.message for r in caplog.records)
    assert any("failed on" in r.message and "HTTP 503" in r.message for r in caplog.records)


@pytest.mark.parametrize("answer, needle", [
    (lambda body: web.Response(text="<html>garbage</html>"), "not JSON"),
    (lambda body: web.json_response({"hello": 1}), "output_ids"),
    (lambda body: web.json_response({**reply_for(body), "meta_info": {**reply_for(body)["meta_info"],
                                     "output_token_logprobs": [[-1.0, 1, None]]}}), "1 output log-probs for 2"),
    (lambda body: web.json_response({**reply_for(body), "meta_info": {**reply_for(body)["meta_info"],
                                     "finish_reason": "done"}}), "finish_reason"),
    (lambda body: web.json_response([reply_for(body)] * 2), "expected 1 result"),
])
def test_malformed_reply_is_a_clear_rollout_error_within_timeout(answer, needle):
    async def handler(fake, body):
        return answer(body)

    async def body(client, fakes):
        start = time.monotonic()
        with pytest.raises(MalformedReply, match=needle) as info:
            await client.generate(requests(3))
        return time.monotonic() - start, str(info.value)
    elapsed, message = run_fakes([handler], body, request_timeout_s=10)
    assert elapsed < 10 and "malformed" in message or "not JSON" in message


def test_4xx_is_not_retried():
    async def refuse(fake, body):
        return web.json_response({"object": "error", "message": "top_p must be in (0, 1]", "code": 400}, status=400)

    async def body(client, fakes):
        with pytest.raises(RolloutError, match=r"HTTP 400: top_p must be in \(0, 1\]"):
            await client.generate(requests(1))
        return fakes
    (fake,) = run_fakes([refuse], body)
    assert fake.hits == 1


def test_timeout_retries_on_another_server_and_aborts_there(caplog):
    async def hang(fake, body):
        await asyncio.sleep(30)

    async def body(client, fakes):
        samples = await client.generate(requests(2))
        await asyncio.sleep(0.2)  # let the best-effort aborts land
        return samples, fakes
    with caplog.at_level(logging.ERROR, logger="megatron_rl.rollout"):
        samples, fakes = run_fakes([hang, good], body, request_timeout_s=0.5, reprobe_interval_s=60)
    assert all(s.response_ids[0] == 1 for s in samples)
    assert fakes[0].aborts and "within 0 s" not in caplog.text and "no answer to /generate" in caplog.text


def test_no_live_server_gives_rollout_error_within_timeout():
    async def broken(fake, body):
        return web.Response(status=500)

    async def body(client, fakes):
        for fake in fakes:
            fake.healthy = False  # re-probes keep failing too
        start = time.monotonic()
        with pytest.raises(RolloutError, match="No rollout server could take the request"):
            await client.generate(requests(1))
        return time.monotonic() - start
    elapsed = run_fakes([broken, broken], body, no_server_timeout_s=1.0, reprobe_interval_s=0.2, max_retries=5)
    assert elapsed < 5


def test_dead_server_comes_back_only_with_the_synced_weight_version():
    calls = {"n": 0}

    async def flaky(fake, body):
        calls["n"] += 1
        if calls["n"] == 1:
            return web.Response(status=502)
        return await good(fake, body)

    async def body(client, fakes):
        await client.generate(requests(1))  # first server fails once, marked dead
        client.expected_weight_version = "v2"
        fakes[0].version = "v1"
        await asyncio.sleep(0.3)
        client.pool.reprobe_due(client._probe)
        await asyncio.sleep(0.3)
        stale = client.pool.servers[0].alive
        fakes[0].version = "v2"
        client.pool.reprobe_due(client._probe)
        await asyncio.sleep(0.3)
        return stale, client.pool.servers[0].alive, client.pool.servers[0].last_error
    stale, revived, reason = run_fakes([flaky, good], body, reprobe_interval_s=0.1)
    assert stale is False and revived is True and "missed a sync" in reason
