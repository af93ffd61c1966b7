"""The speech service the routers use: one loaded model behind admission, the response cache and
the voice store. `build_service` makes one from the settings.

    synthesis = await service.start(job)      # 503 when full, 400 on bad input, first chunk ready
    async for chunk in synthesis.chunks():    # float32 mono at service.sample_rate
        ...
    synthesis.close()                         # idempotent; stops the model between two chunks

`begin_shutdown()` (on SIGTERM/SIGINT) makes it refuse new requests (503) and end running ones
after their current chunk.
"""
from __future__ import annotations

import threading
import time
from typing import Awaitable, Callable

from .admission import WorkerPool
from .cache import ResponseCache
from .errors import Overloaded
from .loader import ModelLoader
from .metrics import Metrics
from .modes import Job
from .settings import Settings
from .synthesis import CachedSynthesis, StartedSynthesis, Synthesis
from .voices import VoiceInfo, VoiceStore


class SpeechService:
    def __init__(self, settings: Settings, metrics: Metrics, voices: VoiceStore, loader: ModelLoader,
                 pool: WorkerPool, cache: ResponseCache):
        self.settings = settings
        self.metrics = metrics
        self.voices = voices
        self.cache = cache
        self._loader = loader
        self._pool = pool
        self._stopping = threading.Event()

    # ---- the model ---------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """loading, ready or failed."""
        return self._loader.state

    @property
    def generation(self) -> str | None:
        """The loaded model's generation ("CosyVoice2", "CosyVoice3"); None until it is loaded."""
        model = self._loader.model
        return model.generation if model is not None and self.state == "ready" else None

    @property
    def sample_rate(self) -> int:
        return self._loader.model.sample_rate

    @property
    def speaker_names(self) -> list[str]:
        """The model's built-in speakers (sft), sorted."""
        return self._loader.model.speaker_names

    def count_text_tokens(self, text: str) -> int:
        return self._loader.model.count_text_tokens(text)

    def start_loading(self, on_failure: Callable[[BaseException], None] | None = None) -> None:
        """Loads the model on a background thread, once (see ModelLoader.start)."""
        self._loader.start(on_failure)

    def check_ready(self) -> None:
        """Raises Overloaded (503) until the model is loaded and warmed, and once stopping."""
        if self._stopping.is_set():
            self.metrics.rejected.inc()
            raise Overloaded("the server is shutting down; try again shortly",
                             self.settings.retry_after_s)
        self._loader.check_ready()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def begin_shutdown(self) -> None:
        """New requests get 503 from now on, and running syntheses end after their current chunk
        (their responses end cleanly). Safe to call from a signal handler."""
        self._stopping.set()

    def shutdown(self) -> None:
        self._stopping.set()
        self._pool.shutdown()

    # ---- requests ----------------------------------------------------------------------------

    async def start(self, job: Job, gone: Callable[[], Awaitable[bool]] | None = None) -> StartedSynthesis:
        """Admits the job, waits for a worker, and computes the first chunk (so a bad input is
        still an HTTP error, not a broken stream). Raises Overloaded, InputError or ApiError, and
        ClientGone when `gone()` (e.g. request.is_disconnected) turns true while it is queued."""
        requested = time.perf_counter()
        cached = self.cache.get(job.cache_key) if job.cache_key is not None else None
        if cached is not None:
            self.metrics.cache_hits.inc()
            return CachedSynthesis(cached)
        self.check_ready()

        async def gone_or_stopping() -> bool:
            self.check_ready()                  # 503 once the server is stopping
            return gone is not None and await gone()
        slot = await self._pool.enter(gone_or_stopping)
        if self.stopping:
            slot.release()
            self.check_ready()
        synthesis = Synthesis(job, self._loader.model, self._pool, slot, self.metrics, self.cache,
                              requested, self._stopping)
        await synthesis.begin()
        return synthesis

    async def register_voice(self, name: str, prompt_text: str, audio: bytes) -> VoiceInfo:
        """Prepares and stores a voice on a worker, admitted like a synthesis."""
        self.check_ready()
        async with self._pool.slot():
            return await self._pool.call(self.voices.register, self._loader.model, name, prompt_text,
                                         audio)


def build_service(settings: Settings, model=None, voices: VoiceStore | None = None) -> SpeechService:
    """The service for these settings; `model`, when given, is used instead of loading one, and
    `voices` instead of the voice folder's store (serve_ray: the cluster's, ray_voices.py)."""
    metrics = Metrics()
    if voices is None:
        voices = VoiceStore(settings.voices_dir, settings.default_voice)
    loader = ModelLoader(settings, metrics, voices, model)
    pool = WorkerPool(settings.workers, settings.max_queue, settings.retry_after_s, metrics)
    cache = ResponseCache(int(settings.cache_mb * 1024 * 1024))
    return SpeechService(settings, metrics, voices, loader, pool, cache)
