"""Which server takes the next request: least outstanding requests among the live ones.

A server that fails a request is marked dead and stays out of rotation until a health
re-probe (at most every ``reprobe_interval_s``) finds it answering again, and, once
weights were synced with a version, serving that version: a server that missed a sync
must never serve stale weights.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from megatron_rl.errors import RolloutError

log = logging.getLogger(__name__)


@dataclass
class Server:
    """One server's place in the pool."""

    url: str
    tp_size: int = 1
    outstanding: int = 0
    alive: bool = True
    dead_since: float = 0.0
    last_error: str = ""
    served: int = 0


Probe = Callable[[Server], Awaitable[bool]]


class ServerPool:
    """Live/dead bookkeeping and least-outstanding selection (one asyncio loop at a time)."""

    def __init__(self, urls: Sequence[str], tp_sizes: Sequence[int] | None = None, *,
                 max_inflight: int = 256, reprobe_interval_s: float = 5.0):
        if not urls:
            raise RolloutError("No rollout server URLs were given: set `rollout.server_urls` or launch servers.")
        sizes = list(tp_sizes) if tp_sizes is not None else [1] * len(urls)
        self.servers = [Server(u.rstrip("/"), tp) for u, tp in zip(urls, sizes)]
        self.max_inflight, self.reprobe_interval_s = max_inflight, reprobe_interval_s
        self._changed: asyncio.Event | None = None
        self._probing: set[str] = set()

    def _event(self) -> asyncio.Event:
        """Set (and replaced) whenever a server frees a slot or comes back. An Event, not a
        Condition: waiters are cancelled in bulk when a step fails, and a Condition's waiter
        cancelled while re-acquiring its lock (Python 3.11) can leave the lock held for good."""
        loop = asyncio.get_running_loop()
        if self._changed is None or getattr(self._changed, "_mr_loop", None) is not loop:
            self._changed = asyncio.Event()
            self._changed._mr_loop = loop  # type: ignore[attr-defined]
        return self._changed

    def alive(self) -> list[Server]:
        return [s for s in self.servers if s.alive]

    def _pick(self, exclude: set[str]) -> Server | None:
        live = [s for s in self.servers if s.alive]
        fresh = [s for s in live if s.url not in exclude] or live  # all tried: any live one will do
        free = [s for s in fresh if s.outstanding < self.max_inflight]
        if not free:
            return None
        return min(free, key=lambda s: (s.outstanding, s.served))

    async def acquire(self, exclude: set[str], deadline: float, probe: Probe) -> Server:
        """A live server with room, waiting (and re-probing dead ones) until ``deadline``."""
        while True:
            # pick and count without awaiting in between: atomic on the event loop
            server = self._pick(exclude)
            if server is not None:
                server.outstanding += 1
                return server
            self.reprobe_due(probe)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RolloutError(self._no_server_message())
            try:
                await asyncio.wait_for(self._event().wait(), timeout=min(remaining, self.reprobe_interval_s))
            except TimeoutError:
                pass

    async def release(self, server: Server, ok: bool) -> None:
        server.outstanding -= 1
        server.served += int(ok)
        await self._notify()

    async def _notify(self) -> None:
        event = self._event()
        self._changed = None  # later waiters get a fresh event; everyone waiting on this one wakes
        event.set()

    def mark_dead(self, server: Server, reason: str) -> None:
        if server.alive:
            log.error("Rollout server %s marked dead (%s); its requests go to the other servers "
                      "and it is re-probed every %.0f s.", server.url, reason, self.reprobe_interval_s)
        server.alive, server.dead_since, server.last_error = False, time.monotonic(), reason

    def reprobe_due(self, probe: Probe) -> None:
        """Start a health probe of each dead server not probed within the interval."""
        now = time.monotonic()
        for server in self.servers:
            if not server.alive and server.url not in self._probing and now - server.dead_since >= self.reprobe_interval_s:
                self._probing.add(server.url)
                asyncio.ensure_future(self._reprobe(server, probe))

    async def _reprobe(self, server: Server, probe: Probe) -> None:
        try:
            ok = await probe(server)
        except Exception as e:  # noqa: BLE001 - a failed probe just leaves it dead
            ok, server.last_error = False, f"{type(e).__name__}: {e}"
        finally:
            self._probing.discard(server.url)
        if ok:
            log.warning("Rollout server %s answers again; back in rotation.", server.url)
            server.alive = True
            await self._notify()
        else:
            server.dead_since = time.monotonic()

    def _no_server_message(self) -> str:
        states = "; ".join(f"{s.url}: {'alive, busy' if s.alive else 'dead (' + s.last_error + ')'}" for s in self.servers)
        return (f"No rollout server could take the request in time. Servers: {states}. Check the "
                "server logs, that the URLs are reachable from the trainer, and raise "
                "`rollout.request_timeout_s` if the servers are merely slow.")
