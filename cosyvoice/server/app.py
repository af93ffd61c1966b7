"""The app factory: middleware, error handlers and one router per API family on one speech service."""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .errors import install_error_handlers
from .middleware import AccessLog, ApiKey, BodyLimit, TextCheck
from .routers import native, openai, ops, sillytavern, stream, upstream, web, xtts
from .service import SpeechService, build_service
from .settings import Settings


def create_app(settings: Settings, service: SpeechService | None = None) -> FastAPI:
    """Without a service, one is built and the model loads in the background when the app starts
    (/health answers at once, /ready once it is loaded and warmed)."""
    if service is None:
        service = build_service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start_loading()   # no-op if the launcher started it already
        grpc_server = None
        if settings.grpc_port:   # upstream's gRPC service, on this event loop (grpc_service.py)
            from .grpc_service import start_grpc_server, stop_grpc_server
            grpc_server = await start_grpc_server(service, settings)
        yield
        if grpc_server is not None:
            await stop_grpc_server(grpc_server)
        service.shutdown()

    app = FastAPI(title="CosyVoice TTS server", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    app.state.settings = settings
    install_error_handlers(app)
    for family in (ops, web, native, upstream, xtts, sillytavern, openai, stream):
        app.include_router(family.router)

    # Added innermost first: a request meets AccessLog, then CORS, then the API key, then the
    # body limit, then the text check (which reads JSON and urlencoded bodies within the limit).
    app.add_middleware(TextCheck)
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    if settings.api_key:
        app.add_middleware(ApiKey, key=settings.api_key)
    if settings.cors_origin_list:
        # any request header: browser clients send their own (SillyTavern: Cache-Control)
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list,
                           allow_methods=["GET", "POST", "DELETE", "OPTIONS"], allow_headers=["*"],
                           expose_headers=["X-Sample-Rate", "X-Audio-Format", "X-Channels",
                                           "X-Sample-Format", "X-Cache", "X-Replica"])   # serve_ray
    app.add_middleware(AccessLog, metrics=service.metrics)
    return app
