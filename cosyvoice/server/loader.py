"""Model loading for the server: chooses the LLM backend from the settings, loads the model on a
background thread (or takes one given), opens the voice store, warms up, and tracks the state
(loading -> ready | failed) that /ready reports and requests are admitted on."""
from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Callable

import numpy as np

from .errors import Overloaded
from .metrics import Metrics
from .settings import Settings
from .voices import VoiceStore

log = logging.getLogger("cosyvoice.server")

WARMUP_TEXT = "Hello."


def llm_backend(settings: Settings):
    """What cosyvoice.load takes as `llm_backend` for these settings: the batched PyTorch LLM with
    a slot per worker, or TensorRT-LLM with engines sized for the workers and the text limit."""
    if settings.llm_backend == "trtllm":
        from ..backends.engine_cache import BuildLimits
        from ..backends.trtllm import TrtLlmFactory

        return TrtLlmFactory(limits=BuildLimits.for_server(settings.workers, settings.max_text_chars),
                             cache_dir=settings.trtllm_cache, dtype=settings.trtllm_dtype,
                             kv_cache_fraction=settings.trtllm_kv_fraction)
    from ..backends import torch_backend   # imports torch: only once loading starts

    return functools.partial(torch_backend, max_batch=settings.workers)


class ModelLoader:
    def __init__(self, settings: Settings, metrics: Metrics, voices: VoiceStore, model=None):
        """`model`: an already loaded model (else load() loads the settings' model directory)."""
        self.settings = settings
        self.metrics = metrics
        self.voices = voices
        self.model = model
        self.state = "loading"            # loading -> ready | failed
        self._thread: threading.Thread | None = None

    def load(self) -> None:
        """Loads the model (unless given), opens the voice store and warms up. Blocking."""
        try:
            if self.model is None:
                self.model = self._load_model()
            self.metrics.watch_batches(*self.model.batch_counts)
            self.voices.open(self.model)
            self._warm_up()
        except BaseException:
            self.state = "failed"
            raise
        self.state = "ready"
        self.metrics.ready.set(1)
        log.info("%s model ready (sample rate %d Hz)", self.model.generation, self.model.sample_rate)

    def start(self, on_failure: Callable[[BaseException], None] | None = None) -> None:
        """load() on a background thread, once; a failure is logged, shown by /ready and passed
        to `on_failure`."""
        if self._thread is not None:
            return

        def run() -> None:
            try:
                self.load()
            except Exception as error:
                log.exception("the model could not be loaded")
                if on_failure is not None:
                    on_failure(error)
        self._thread = threading.Thread(target=run, name="model-loader", daemon=True)
        self._thread.start()

    def check_ready(self) -> None:
        """Raises Overloaded (503 with Retry-After) until the model is loaded and warmed."""
        if self.state != "ready":
            self.metrics.rejected.inc()
            message = "the model failed to load; see the server log" if self.state == "failed" \
                else "the model is still loading; try again shortly"
            raise Overloaded(message, self.settings.retry_after_s)

    def _load_model(self):
        import torch

        import cosyvoice

        settings = self.settings
        dtype = settings.torch_dtype()
        log.info("loading model from %s on %s (%s)", settings.model_dir, settings.device, dtype)
        return cosyvoice.load(settings.model_dir, device=settings.device, dtype=getattr(torch, dtype),
                              llm_backend=llm_backend(settings))

    def _warm_up(self) -> None:
        """Runs every stage once (prompt features, LLM, flow, vocoder) up to the first chunk, on a
        synthetic prompt, so no voice is needed."""
        started = time.perf_counter()
        noise = np.random.default_rng(0).standard_normal(16000 * 2).astype(np.float32) * 0.1
        voice = self.model.prepare_voice(noise, "", sample_rate=16000)
        chunks = self.model.cross_lingual(WARMUP_TEXT, voice=voice, stream=True, seed=0)
        next(chunks)
        chunks.close()
        log.info("warm-up took %.2f s", time.perf_counter() - started)
