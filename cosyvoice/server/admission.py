"""Admission and the worker threads: `workers` requests run at once, up to `max_queue` more wait,
and any beyond are refused with 503 and Retry-After. A waiting request whose client has gone is
dropped before it gets a worker. Used from the event loop only."""
from __future__ import annotations

import asyncio
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

from .errors import ClientGone, Overloaded
from .metrics import Metrics

GONE_POLL_S = 0.2   # how often a queued request checks that its client is still there


class Slot:
    """A worker held by one admitted request; release() gives it back (once, however often called)."""

    def __init__(self, release: Callable[[], None]):
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()


class WorkerPool:
    def __init__(self, workers: int, max_queue: int, retry_after_s: int, metrics: Metrics):
        self.workers = workers
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="synth")
        self._slots = asyncio.Semaphore(workers)
        self._in_flight = 0               # admitted requests: running or waiting
        self._running = 0                 # of which running

    async def enter(self, gone: Callable[[], Awaitable[bool]] | None = None) -> Slot:
        """Admits a request and waits for a free worker. Raises Overloaded when the queue is full,
        and ClientGone when `gone()` turns true while it waits (checked every GONE_POLL_S; it may
        also raise, e.g. Overloaded when the server is stopping)."""
        limit = self.workers + self.max_queue
        if self._in_flight >= limit:
            self.metrics.rejected.inc()
            raise Overloaded(f"the server is busy ({self._in_flight} requests in progress, queue full); "
                             "try again shortly", self.retry_after_s)
        self._in_flight += 1
        self._update_gauges()
        try:
            await self._acquire(gone)
        except BaseException:   # gone, or cancelled, while queued
            self._in_flight -= 1
            self._update_gauges()
            raise
        self._update_gauges(running_delta=1)
        return Slot(self._leave)

    async def _acquire(self, gone: Callable[[], Awaitable[bool]] | None) -> None:
        if gone is None or not self._slots.locked():
            return await self._slots.acquire()
        acquiring = asyncio.ensure_future(self._slots.acquire())
        try:
            while not (await asyncio.wait({acquiring}, timeout=GONE_POLL_S))[0]:
                if await gone():
                    raise ClientGone()
            acquiring.result()
        except BaseException:
            if not acquiring.done():
                acquiring.cancel()
            elif not acquiring.cancelled() and acquiring.exception() is None:
                self._slots.release()    # a worker came free just as the request gave up
            raise

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """enter() ... release() around a block."""
        held = await self.enter()
        try:
            yield
        finally:
            held.release()

    def _leave(self) -> None:
        self._slots.release()
        self._in_flight -= 1
        self._update_gauges(running_delta=-1)

    def _update_gauges(self, running_delta: int = 0) -> None:
        self._running += running_delta
        self.metrics.active.set(self._running)
        self.metrics.queue_depth.set(self._in_flight - self._running)

    async def call(self, function: Callable, *args):
        """Awaits one call on a worker thread (for a request already holding a slot)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def submit(self, function: Callable, *args) -> Future:
        """Runs a call on a worker thread without waiting for it."""
        return self._executor.submit(function, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
