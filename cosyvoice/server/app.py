"""The app factory: middleware, error handlers and one router per API family on one engine."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .engine import Engine
from .errors import install_error_handlers
from .metrics import Metrics
from .middleware import AccessLog, ApiKey, BodyLimit
from .routers import native, openai, ops, upstream, web, xtts
from .settings import Settings
from .voices import VoiceStore

log = logging.getLogger("cosyvoice.server")


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """Without an engine, one is made and the model loads in the background when the app starts
    (/health answers at once, /ready once it is loaded and warmed)."""
    if engine is None:
        engine = Engine(settings, Metrics(), VoiceStore(settings.voices_dir, settings.default_voice))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start_loading()   # no-op if the launcher started it already
        yield
        engine.shutdown()

    app = FastAPI(title="CosyVoice2 TTS server", version="0.1.0", lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    install_error_handlers(app)
    for family in (ops, web, native, upstream, xtts, openai):
        app.include_router(family.router)

    # Added innermost first: a request meets AccessLog, then CORS, then the API key, then the limit.
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    if settings.api_key:
        app.add_middleware(ApiKey, key=settings.api_key)
    if settings.cors_origin_list:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list,
                           allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"],
                           expose_headers=["X-Sample-Rate", "X-Audio-Format", "X-Channels",
                                           "X-Sample-Format", "X-Cache"])
    app.add_middleware(AccessLog, metrics=engine.metrics)
    return app
