"""Runs synthesis on worker threads for the event loop: admission, queueing, cancellation, cache.

    generation = await engine.start(job)      # 503 when full, 400 on bad input, first chunk ready
    async for chunk in generation.chunks():   # float32 mono at engine.sample_rate
        ...
    generation.close()                        # idempotent; stops the model between two chunks

A request is admitted while fewer than `workers + max_queue` are in flight, else it gets 503 with
Retry-After. `workers` requests generate at once; the others wait their turn. Each chunk is
computed by one call on a worker thread, and a closed generation makes no further call, so a
client that leaves stops its generation within one chunk.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Hashable, Iterator

import numpy as np

from ..voice import Voice
from .cache import ResponseCache
from .errors import Overloaded
from .metrics import Metrics
from .settings import Settings
from .voices import VoiceStore, read_prompt

log = logging.getLogger("cosyvoice.server")

WARMUP_TEXT = "Hello."


@dataclass(frozen=True)
class PromptUpload:
    """Prompt audio sent with the request, prepared on the worker thread."""
    audio: bytes
    prompt_text: str


@dataclass(frozen=True)
class Job:
    """One synthesis request, in the runtime's terms."""
    mode: str                                 # zero_shot, cross_lingual, instruct2 or sft
    text: str
    voice: Voice | PromptUpload | None = None  # for every mode but sft
    speaker: str = ""                         # sft: a built-in speaker of the model
    instruct: str = ""                        # instruct2
    speed: float = 1.0
    seed: int | None = None
    stream: bool = True                       # token-level chunks (needs speed 1.0)
    cache_key: Hashable | None = None         # None: never cached


class Engine:
    def __init__(self, settings: Settings, metrics: Metrics, voices: VoiceStore, tts=None,
                 llm_backend="torch"):
        """`tts`: an already loaded model (else load() loads one with `llm_backend`, a name or a
        factory as cosyvoice.load takes it)."""
        self.settings = settings
        self.metrics = metrics
        self.voices = voices
        self.tts = tts
        self.llm_backend = llm_backend
        self.state = "loading"            # loading -> ready | failed
        self._loader: threading.Thread | None = None
        self.cache = ResponseCache(int(settings.cache_mb * 1024 * 1024))
        self._executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="synth")
        self._slots = asyncio.Semaphore(settings.workers)
        self._in_flight = 0               # admitted requests: generating or waiting
        self._running = 0                 # of which generating

    @property
    def sample_rate(self) -> int:
        return self.tts.sample_rate

    # ---- loading ---------------------------------------------------------------------------------

    def load(self) -> None:
        """Loads the model (unless given), opens the voice store and warms up. Blocking."""
        try:
            if self.tts is None:
                import torch

                import cosyvoice

                dtype = self.settings.torch_dtype()
                log.info("loading model from %s on %s (%s)", self.settings.model_dir, self.settings.device, dtype)
                self.tts = cosyvoice.load(self.settings.model_dir, device=self.settings.device,
                                          dtype=getattr(torch, dtype), llm_backend=self._backend())
            synthesizer = getattr(self.tts, "synthesizer", None)   # absent on a stand-in model
            self.metrics.watch_batches(getattr(getattr(synthesizer, "llm", None), "step_sizes", None),
                                       getattr(getattr(synthesizer, "flow_decoder", None), "batch_sizes", None))
            self.voices.open(self.tts)
            self._warm_up()
        except BaseException:
            self.state = "failed"
            raise
        self.state = "ready"
        self.metrics.ready.set(1)
        log.info("model ready (sample rate %d Hz)", self.sample_rate)

    def start_loading(self, on_failure: Callable[[BaseException], None] | None = None) -> None:
        """load() on a background thread, once; a failure is logged, shown by /ready and passed
        to `on_failure`."""
        if self._loader is not None:
            return

        def run() -> None:
            try:
                self.load()
            except Exception as error:
                log.exception("the model could not be loaded")
                if on_failure is not None:
                    on_failure(error)
        self._loader = threading.Thread(target=run, name="model-loader", daemon=True)
        self._loader.start()

    def _backend(self):
        """The LLM backend to load; the batched PyTorch one gets a slot per worker."""
        from ..backends import torch_backend   # imports torch: only once loading starts

        if self.llm_backend == "torch":
            return functools.partial(torch_backend, max_batch=self.settings.workers)
        return self.llm_backend

    def _warm_up(self) -> None:
        """Runs every stage once (prompt features, LLM, flow, vocoder) up to the first chunk, on a
        synthetic prompt, so no voice is needed."""
        started = time.perf_counter()
        noise = np.random.default_rng(0).standard_normal(16000 * 2).astype(np.float32) * 0.1
        voice = self.tts.prepare_voice(noise, "", sample_rate=16000)
        chunks = self.tts.cross_lingual(WARMUP_TEXT, voice=voice, stream=True, seed=0)
        next(chunks)
        chunks.close()
        log.info("warm-up took %.2f s", time.perf_counter() - started)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- requests --------------------------------------------------------------------------------

    async def run(self, function: Callable, *args):
        """Runs a heavy call (voice preparation) on a worker, under the same admission rules."""
        self._admit()
        try:
            async with self._slots:
                self._update_gauges(running_delta=1)
                try:
                    return await self.on_worker(function, *args)
                finally:
                    self._update_gauges(running_delta=-1)
        finally:
            self._in_flight -= 1
            self._update_gauges()

    async def start(self, job: Job) -> "Generation":
        """Admits the job, waits for a worker, and computes the first chunk (so a bad input is
        still an HTTP error, not a broken stream). Raises Overloaded, InputError or ApiError."""
        requested = time.perf_counter()
        cached = self.cache.get(job.cache_key) if job.cache_key is not None else None
        if cached is not None:
            self.metrics.cache_hits.inc()
            return Generation.from_cache(cached)
        self._admit()
        try:
            await self._slots.acquire()
        except BaseException:   # cancelled while queued
            self._in_flight -= 1
            self._update_gauges()
            raise
        self._update_gauges(running_delta=1)
        generation = Generation(self, job, requested)
        try:
            await generation.begin()
        except BaseException:
            self._finished()
            raise
        return generation

    def check_ready(self) -> None:
        if self.state != "ready":
            self.metrics.rejected.inc()
            message = "the model failed to load; see the server log" if self.state == "failed" \
                else "the model is still loading; try again shortly"
            raise Overloaded(message, self.settings.retry_after_s)

    def _admit(self) -> None:
        self.check_ready()
        limit = self.settings.workers + self.settings.max_queue
        if self._in_flight >= limit:
            self.metrics.rejected.inc()
            raise Overloaded(f"the server is busy ({self._in_flight} requests in progress, queue full); "
                             "try again shortly", self.settings.retry_after_s)
        self._in_flight += 1
        self._update_gauges()

    def _finished(self) -> None:
        """Called once by each Generation that held a worker slot."""
        self._slots.release()
        self._in_flight -= 1
        self._update_gauges(running_delta=-1)

    def _update_gauges(self, running_delta: int = 0) -> None:
        self._running += running_delta
        self.metrics.active.set(self._running)
        self.metrics.queue_depth.set(self._in_flight - self._running)

    def _open_iterator(self, job: Job) -> Iterator[np.ndarray]:
        """On a worker: prepares an uploaded prompt and calls the mode (which validates)."""
        tts = self.tts
        options = dict(stream=job.stream, speed=job.speed, seed=job.seed)
        voice = job.voice
        if isinstance(voice, PromptUpload):
            samples, rate = read_prompt(voice.audio)
            voice = tts.prepare_voice(samples, voice.prompt_text, sample_rate=rate)
        if job.mode == "sft":
            return tts.sft(job.text, job.speaker, **options)
        if job.mode == "zero_shot":
            return tts.zero_shot(job.text, voice=voice, **options)
        if job.mode == "cross_lingual":
            return tts.cross_lingual(job.text, voice=voice, **options)
        return tts.instruct2(job.text, job.instruct, voice=voice, **options)

    def submit(self, function: Callable, *args) -> Future:
        return self._executor.submit(function, *args)

    async def on_worker(self, function: Callable, *args):
        """Awaits one call on a worker thread (for a generation already holding a slot)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)


class Generation:
    """One admitted synthesis. Its model iterator is only touched on worker threads, one call
    at a time (the lock), and never after close()."""

    def __init__(self, engine: Engine | None, job: Job | None, requested: float):
        self.engine = engine
        self.job = job
        self.requested = requested
        self.from_cache = engine is None
        self.completed = False
        self.failed = False
        self._iterator: Iterator[np.ndarray] | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._first: np.ndarray | None = None
        self._produced: list[np.ndarray] = []   # kept for the cache only
        self._samples = 0
        self._compute_seconds = 0.0

    @classmethod
    def from_cache(cls, chunks: list[np.ndarray]) -> "Generation":
        generation = cls(None, None, time.perf_counter())
        generation._produced = chunks
        return generation

    async def begin(self) -> None:
        self._first = await self.engine.on_worker(self._open_and_step)
        if self._first is not None:
            self.engine.metrics.first_chunk.observe(time.perf_counter() - self.requested)

    def _open_and_step(self) -> np.ndarray | None:
        started = time.perf_counter()
        with self._lock:
            self._iterator = self.engine._open_iterator(self.job)
        self._compute_seconds += time.perf_counter() - started
        return self._step()

    def _step(self) -> np.ndarray | None:
        """The next chunk, or None at the end or once closed (the cancel check between chunks)."""
        started = time.perf_counter()
        with self._lock:
            if self._closed.is_set():
                return None
            chunk = next(self._iterator, None)
        self._compute_seconds += time.perf_counter() - started
        return chunk

    async def chunks(self) -> AsyncIterator[np.ndarray]:
        """Yields every chunk; closes the generation when done, failed or abandoned."""
        try:
            if self.from_cache:
                for chunk in self._produced:
                    yield chunk
                self.completed = True
                return
            chunk = self._first
            while chunk is not None:
                self._record(chunk)
                yield chunk
                chunk = await self.engine.on_worker(self._step)
            self.completed = not self._closed.is_set()
        except Exception:
            self.failed = True
            log.exception("synthesis failed in the middle of a response; the stream is cut")
            raise
        finally:
            self.close()

    def _record(self, chunk: np.ndarray) -> None:
        metrics = self.engine.metrics
        metrics.chunks.inc()
        metrics.audio_seconds.inc(len(chunk) / self.engine.sample_rate)
        self._samples += len(chunk)
        if self.job.cache_key is not None and self.engine.cache.enabled:
            self._produced.append(chunk)

    def close(self) -> None:
        """Stops generating (between two chunks) and frees the worker slot. Safe to call twice."""
        if self.from_cache or self._closed.is_set():
            return
        self._closed.set()
        engine = self.engine
        engine._finished()
        if self.completed:
            if self._samples:
                engine.metrics.rtf.observe(self._compute_seconds / (self._samples / engine.sample_rate))
            if self._produced:
                engine.cache.put(self.job.cache_key, self._produced)
        else:
            if self.failed:
                engine.metrics.errors.labels(route=f"synthesis:{self.job.mode}", status="500").inc()
            else:
                engine.metrics.cancelled.inc()
            engine.submit(self._close_iterator).add_done_callback(_log_failure)
        self._produced = []

    def _close_iterator(self) -> None:
        with self._lock:
            if self._iterator is not None:
                self._iterator.close()


def _log_failure(future: Future) -> None:
    if future.exception() is not None:
        log.error("closing a cancelled generation failed", exc_info=future.exception())
