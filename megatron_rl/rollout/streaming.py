"""Streamed generation (``stream: true``): SGLang's chunks for each job, merged, as SSE.

SGLang v0.5.4 (``entrypoints/http_server.py`` ``generate_request``, ``TokenizerManager
._handle_batch_output`` and ``_handle_batch_request``, read from source) streams
``text/event-stream`` events ``data: {json}\\n\\n`` and ends with ``data: [DONE]\\n\\n``.
Each chunk is a full reply object of one sample: ``text`` is cumulative, ``output_ids``
holds only the ids new since the previous chunk of that sample, and ``meta_info`` carries
the cumulative ``output_token_logprobs`` (and ``input_token_logprobs``), the token count
so far and ``finish_reason: null`` until the last chunk, which adds ``e2e_latency``. With
several samples (a batch, or ``n > 1``) chunks of different samples interleave and each
carries ``"index"``, the sample's place in the prompt-major order. A chunk is sent after
every token (``stream_interval``), except while the output may be the start of a stop
string (see ``detokenize``). An error inside the stream is sent as
``data: {"error": {"message": ...}}`` before ``[DONE]``.

Chunks are emitted per token even when several tokens arrive at once, so the stream's
content does not depend on timing. Token progress comes from the engine's per-job hook when
it has one, else the job is polled (see ``JobFeed``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from concurrent.futures import Future
from typing import Any

from aiohttp import web

from megatron_rl.rollout.detokenize import IncrementalText
from megatron_rl.rollout.engine import EmbeddedEngine, Job
from megatron_rl.rollout.serving import Submission, abort_all, meta_info

log = logging.getLogger(__name__)
POLL_S = 0.005  # polling period of JobFeed when the engine has no per-token hook


class _Ticker:
    """One wake-up every ``POLL_S`` for all the feeds of an event loop, while any waits.

    The fallback when the engine has no per-token hook: polling costs one timer per loop,
    not one per streamed job.
    """

    _by_loop: dict[asyncio.AbstractEventLoop, _Ticker] = {}

    def __init__(self) -> None:
        self.tick = asyncio.Event()
        self.waiting = 0
        self.task: asyncio.Task | None = None

    @classmethod
    def of_running_loop(cls) -> _Ticker:
        loop = asyncio.get_running_loop()
        for old in [lp for lp in cls._by_loop if lp.is_closed()]:
            del cls._by_loop[old]
        return cls._by_loop.setdefault(loop, cls())

    async def _run(self) -> None:
        while self.waiting:
            await asyncio.sleep(POLL_S)
            self.tick.set()
            self.tick = asyncio.Event()
        self.task = None

    async def wait(self) -> None:
        self.waiting += 1
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())
        try:
            await self.tick.wait()
        finally:
            self.waiting -= 1


class JobFeed:
    """Waits for new tokens of one job, from inside the event loop."""

    def __init__(self, engine: EmbeddedEngine, future: Future):
        self.engine, self.future = engine, future
        self.job: Job | None = None
        self.ticker = _Ticker.of_running_loop()

    def _find(self) -> Job | None:
        if self.future.done():
            return self.future.result()  # raises the engine's exception, if any
        with self.engine._cv:  # the scheduler moves jobs between these under this lock
            for job in [*self.engine._pending, *self.engine._running]:
                if job.done is self.future:
                    return job
        return None

    def available(self, job: Job) -> int:
        """Tokens whose log-probs are in too (the scheduler appends ids first)."""
        count = len(job.output_ids)
        return min(count, len(job.output_logprobs)) if job.return_logprob else count

    async def wait(self, seen: int) -> Job:
        """The job once it has more than ``seen`` tokens or is finished."""
        while True:
            if self.job is None:
                self.job = self._find()
            if self.job is not None and (self.future.done() or self.available(self.job) > seen):
                if self.future.done():
                    self.future.result()
                return self.job
            await self.ticker.wait()


async def job_chunks(engine: EmbeddedEngine, future: Future, sub: Submission) -> AsyncIterator[dict[str, Any]]:
    """SGLang's streamed reply objects for one job, the last one with its finish reason."""
    feed, state, sent, seen = JobFeed(engine, future), None, 0, 0
    while True:
        job = await feed.wait(seen)
        if state is None and engine.tokenizer is not None:
            state = IncrementalText(engine.tokenizer, job.prompt, sub.options)
        finished = future.done()
        total = len(job.output_ids) if finished else feed.available(job)
        last = total if finished else total + 1  # the finishing token goes out with the finish reason
        for count in range(seen + 1, last):
            ids = job.output_ids[:count]
            if state is not None and not state.may_stream(ids):
                continue
            if state is None and not _interval_ok(count, sub.options.stream_interval):
                continue
            text = state.update(ids) if state is not None else ""
            yield {"text": text, "output_ids": ids[sent:],
                   "meta_info": meta_info(job, sub, engine, finish=None, count=count, latency=False)}
            sent = count
        seen = total
        if finished:
            text = state.update(job.output_ids, job.finish) if state is not None else ""
            yield {"text": text, "output_ids": job.output_ids[sent:],
                   "meta_info": meta_info(job, sub, engine, finish=job.finish, count=total, latency=True)}
            return


def _interval_ok(count: int, interval: int) -> bool:
    return count % interval == 1 if interval > 1 else True


async def merged_chunks(engine: EmbeddedEngine, queued: list[tuple[Submission, Future]]
                        ) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """(sample index, chunk) of every job as they come; the generators are closed on exit."""
    out: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, sub: Submission, future: Future) -> None:
        try:
            async for chunk in job_chunks(engine, future, sub):
                await out.put((index, chunk))
        except Exception as e:  # noqa: BLE001 - an engine failure ends this sample's stream with an error
            log.exception("streamed job %s failed", sub.rid)
            await out.put((index, e))
        finally:
            await out.put((index, done))

    tasks = [asyncio.create_task(pump(i, sub, f)) for i, (sub, f) in enumerate(queued)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await out.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def open_sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    return resp


async def send_event(resp: web.StreamResponse, data: Any) -> None:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    await resp.write(f"data: {text}\n\n".encode())


async def stream_generate(request: web.Request, engine: EmbeddedEngine,
                          queued: list[tuple[Submission, Future]], indexed: bool) -> web.StreamResponse:
    """/generate with ``stream: true``; a client that hangs up aborts every job of the request."""
    resp = await open_sse(request)
    try:
        async for index, chunk in merged_chunks(engine, queued):
            if indexed:
                chunk["index"] = index
            await send_event(resp, chunk)
    except (asyncio.CancelledError, ConnectionResetError):
        abort_all(engine, [s for s, _ in queued], "Aborted: client disconnected")
        raise
    except Exception as e:  # noqa: BLE001 - the 200 header is out: report in-band, as SGLang does
        abort_all(engine, [s for s, _ in queued], "Aborted: the stream failed")
        await send_event(resp, {"error": {"message": f"{type(e).__name__}: {e}"}})
    await send_event(resp, "[DONE]")
    await resp.write_eof()
    return resp
