"""One admitted synthesis from its first chunk to its end: chunks are computed one call at a time
on a worker thread, and a closed synthesis makes no further call, so a client that leaves stops
its synthesis within one chunk. So does a server that is stopping: the synthesis ends early,
`interrupted`, and its response ends cleanly."""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import AsyncIterator, Iterator

import numpy as np

from .admission import Slot, WorkerPool
from .cache import ResponseCache
from .metrics import Metrics
from .modes import Job, open_stream

log = logging.getLogger("cosyvoice.server")


class Synthesis:
    """Its model iterator is only touched on worker threads, one call at a time (the lock), and
    never after close(). Made by SpeechService.start."""

    from_cache = False

    def __init__(self, job: Job, model, pool: WorkerPool, slot: Slot, metrics: Metrics,
                 cache: ResponseCache, requested: float, stopping: threading.Event | None = None):
        self.job = job
        self.completed = False
        self.failed = False
        self.interrupted = False                # ended early because the server is stopping
        self._stopping = stopping or threading.Event()
        self._model = model
        self._pool = pool
        self._slot = slot
        self._metrics = metrics
        self._cache = cache
        self._requested = requested
        self._iterator: Iterator[np.ndarray] | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._first: np.ndarray | None = None
        self._produced: list[np.ndarray] = []   # kept for the cache only
        self._samples = 0
        self._compute_seconds = 0.0

    async def begin(self) -> None:
        """Opens the model's iterator and computes the first chunk, so that bad input is still an
        HTTP error rather than a broken stream. On failure the caller closes nothing: the slot is
        released here."""
        try:
            self._first = await self._pool.call(self._open_and_step)
        except BaseException:
            self._slot.release()
            raise
        if self._first is not None:
            self._metrics.first_chunk.observe(time.perf_counter() - self._requested)

    def _open_and_step(self) -> np.ndarray | None:
        started = time.perf_counter()
        with self._lock:
            self._iterator = open_stream(self._model, self.job)
        self._compute_seconds += time.perf_counter() - started
        return self._step()

    def _step(self) -> np.ndarray | None:
        """The next chunk, or None at the end or once closed (the cancel check between chunks)."""
        started = time.perf_counter()
        with self._lock:
            if self._closed.is_set():
                return None
            if self._stopping.is_set():
                self.interrupted = True
                return None
            chunk = next(self._iterator, None)
        self._compute_seconds += time.perf_counter() - started
        return chunk

    async def chunks(self) -> AsyncIterator[np.ndarray]:
        """Yields every chunk; closes the synthesis when done, failed or abandoned."""
        try:
            chunk = self._first
            while chunk is not None:
                self._record(chunk)
                yield chunk
                chunk = await self._pool.call(self._step)
            self.completed = not self._closed.is_set() and not self.interrupted
        except Exception:
            self.failed = True
            log.exception("synthesis failed in the middle of a response; the stream is cut")
            raise
        finally:
            self.close()

    def _record(self, chunk: np.ndarray) -> None:
        self._metrics.chunks.inc()
        self._metrics.audio_seconds.inc(len(chunk) / self._model.sample_rate)
        self._samples += len(chunk)
        if self.job.cache_key is not None and self._cache.enabled:
            self._produced.append(chunk)

    def close(self) -> None:
        """Stops generating (between two chunks) and frees the worker slot. Safe to call twice."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._slot.release()
        metrics = self._metrics
        if self.completed:
            if self._samples:
                metrics.rtf.observe(self._compute_seconds / (self._samples / self._model.sample_rate))
            if self._produced:
                self._cache.put(self.job.cache_key, self._produced)
        else:
            if self.failed:
                metrics.errors.labels(route=f"synthesis:{self.job.mode.value}", status="500").inc()
            else:
                metrics.cancelled.inc()
            self._pool.submit(self._close_iterator).add_done_callback(_log_failure)
        self._produced = []

    def _close_iterator(self) -> None:
        with self._lock:
            if self._iterator is not None:
                self._iterator.close()


class CachedSynthesis:
    """A finished synthesis's chunks answering an identical request; holds no worker."""

    from_cache = True
    interrupted = False

    def __init__(self, chunks: list[np.ndarray]):
        self.completed = False
        self.failed = False
        self._chunks = chunks

    async def chunks(self) -> AsyncIterator[np.ndarray]:
        for chunk in self._chunks:
            yield chunk
        self.completed = True

    def close(self) -> None:
        pass


def _log_failure(future: Future) -> None:
    if future.exception() is not None:
        log.error("closing a cancelled synthesis failed", exc_info=future.exception())


# what SpeechService.start returns, and responses stream
StartedSynthesis = Synthesis | CachedSynthesis
