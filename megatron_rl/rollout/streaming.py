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
content does not depend on timing. Token progress comes from the engine's per-job hook
(``on_token``, called on the scheduler thread) through ``TokenNotifier``; nothing polls.
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
from megatron_rl.rollout.serving import Submission, abort_all, meta_info, submit

log = logging.getLogger(__name__)


class TokenNotifier:
    """The bridge from the engine's scheduler thread to the event loop, for one request's jobs.

    ``on_token`` is the engine hook: it records the job (keyed by its future) and wakes that
    job's feed. A feed registers before it first looks, and looks before it sleeps, so a
    token that comes before the feed exists is seen, and one that comes later wakes it.
    """

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.jobs: dict[Future, Job] = {}
        self.events: dict[Future, asyncio.Event] = {}

    def on_token(self, job: Job, token: int, logprob: float) -> None:  # scheduler thread
        self.jobs[job.done] = job
        event = self.events.get(job.done)
        if event is not None:
            self._wake(event)

    def _wake(self, event: asyncio.Event) -> None:
        try:
            self.loop.call_soon_threadsafe(event.set)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def feed(self, future: Future) -> JobFeed:
        event = asyncio.Event()
        self.events[future] = event
        future.add_done_callback(lambda _: self._wake(event))
        return JobFeed(self, future, event)


class JobFeed:
    """Waits, inside the event loop, for new tokens or the end of one job."""

    def __init__(self, notifier: TokenNotifier, future: Future, event: asyncio.Event):
        self.notifier, self.future, self.event = notifier, future, event

    @staticmethod
    def available(job: Job) -> int:
        """Tokens recorded in full: the scheduler appends the id, then its log-prob and version."""
        return min(len(job.output_ids), len(job.output_logprobs), len(job.output_versions))

    async def wait(self, seen: int) -> Job:
        """The job once it has more than ``seen`` tokens or is finished (raises the engine's error)."""
        while True:
            if self.future.done():
                return self.future.result()
            job = self.notifier.jobs.get(self.future)
            if job is not None and self.available(job) > seen:
                return job
            await self.event.wait()
            self.event.clear()


def _may_finish(engine: EmbeddedEngine, job: Job, count: int) -> bool:
    """Whether the ``count``-th token can end the job (a superset of the engine's token rules).

    The hook runs before the engine decides, so such a token's chunk waits for the next
    token or the finish: sent early, a stop token's text would be out before it is trimmed.
    Stop strings need no case here: ``may_stream`` holds any tail that contains one.
    """
    token = job.output_ids[count - 1]
    return count >= job.params.max_new_tokens or token in job.params.stop_token_ids or token in engine.eos_ids


async def job_chunks(engine: EmbeddedEngine, feed: JobFeed, sub: Submission) -> AsyncIterator[dict[str, Any]]:
    """SGLang's streamed reply objects for one job, the last one with its finish reason."""
    future, state, sent, emitted, observed = feed.future, None, 0, 0, 0
    while True:
        job = await feed.wait(observed)
        if state is None and engine.tokenizer is not None:
            state = IncrementalText(engine.tokenizer, job.prompt, sub.options)
        finished = future.done()
        observed = len(job.output_ids) if finished else feed.available(job)
        # the finishing token goes out with the finish reason; a token that may finish waits
        ready = observed - 1 if finished or _may_finish(engine, job, observed) else observed
        for count in range(emitted + 1, ready + 1):
            ids = job.output_ids[:count]
            if state is not None and not state.may_stream(ids):
                continue
            if state is None and not _interval_ok(count, sub.options.stream_interval):
                continue
            text = state.update(ids) if state is not None else ""
            yield {"text": text, "output_ids": ids[sent:],
                   "meta_info": meta_info(job, sub, engine, finish=None, count=count, latency=False)}
            sent = count
        emitted = max(emitted, ready)
        if finished:
            text = state.update(job.output_ids, job.finish) if state is not None else ""
            yield {"text": text, "output_ids": job.output_ids[sent:],
                   "meta_info": meta_info(job, sub, engine, finish=job.finish, count=observed, latency=True)}
            return


def _interval_ok(count: int, interval: int) -> bool:
    return count % interval == 1 if interval > 1 else True


async def merged_chunks(engine: EmbeddedEngine, queued: list[tuple[Submission, Future]], notifier: TokenNotifier
                        ) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """(sample index, chunk) of every job as they come (jobs submitted with ``notifier.on_token``)."""
    out: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, sub: Submission, future: Future) -> None:
        try:
            async for chunk in job_chunks(engine, notifier.feed(future), sub):
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


async def stream_generate(request: web.Request, engine: EmbeddedEngine, subs: list[Submission],
                          indexed: bool) -> web.StreamResponse:
    """/generate with ``stream: true``; a client that hangs up aborts every job of the request."""
    notifier = TokenNotifier()
    queued = submit(engine, subs, notifier.on_token)
    resp = await open_sse(request)
    try:
        async for index, chunk in merged_chunks(engine, queued, notifier):
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
