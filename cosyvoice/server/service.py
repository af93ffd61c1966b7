"""The speech service the routers use: one loaded model behind admission, the response cache and
the voice store. `build_service` makes one from the settings.

    synthesis = await service.start(job)      # 503 when full, 400 on bad input, first chunk ready
    async for chunk in synthesis.chunks():    # float32 mono at service.sample_rate
        ...
    synthesis.close()                         # idempotent; stops the model between two chunks
"""
from __future__ import annotations

import time
from typing import Callable

from .admission import WorkerPool
from .cache import ResponseCache
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
        """Raises Overloaded (503) until the model is loaded and warmed."""
        self._loader.check_ready()

    def shutdown(self) -> None:
        self._pool.shutdown()

    # ---- requests ----------------------------------------------------------------------------

    async def start(self, job: Job) -> StartedSynthesis:
        """Admits the job, waits for a worker, and computes the first chunk (so a bad input is
        still an HTTP error, not a broken stream). Raises Overloaded, InputError or ApiError."""
        requested = time.perf_counter()
        cached = self.cache.get(job.cache_key) if job.cache_key is not None else None
        if cached is not None:
            self.metrics.cache_hits.inc()
            return CachedSynthesis(cached)
        self.check_ready()
        slot = await self._pool.enter()
        synthesis = Synthesis(job, self._loader.model, self._pool, slot, self.metrics, self.cache,
                              requested)
        await synthesis.begin()
        return synthesis

    async def register_voice(self, name: str, prompt_text: str, audio: bytes) -> VoiceInfo:
        """Prepares and stores a voice on a worker, admitted like a synthesis."""
        self.check_ready()
        async with self._pool.slot():
            return await self._pool.call(self.voices.register, self._loader.model, name, prompt_text,
                                         audio)


def build_service(settings: Settings, model=None) -> SpeechService:
    """The service for these settings; `model`, when given, is used instead of loading one."""
    metrics = Metrics()
    voices = VoiceStore(settings.voices_dir, settings.default_voice)
    loader = ModelLoader(settings, metrics, voices, model)
    pool = WorkerPool(settings.workers, settings.max_queue, settings.retry_after_s, metrics)
    cache = ResponseCache(int(settings.cache_mb * 1024 * 1024))
    return SpeechService(settings, metrics, voices, loader, pool, cache)
