"""Runs the app under uvicorn: what server.py and fast_server.py share.

The port opens at once (/health answers), the model loads on a background thread, a one-line
banner says where to connect, and a model that fails to load stops the server with status 1.
"""
from __future__ import annotations

import signal
import sys

import uvicorn

from .app import create_app
from .logs import configure_logging
from .service import build_service
from .settings import Settings


def run_server(settings: Settings, title: str = "CosyVoice server",
               graceful_stop_signal: signal.Signals | None = None) -> int:
    """Serves until stopped; returns the exit status. `graceful_stop_signal`, when given, also
    ends the server cleanly."""
    configure_logging(settings.log_level)
    service = build_service(settings)
    server = uvicorn.Server(uvicorn.Config(create_app(settings, service), host=settings.host,
                                           port=settings.port, access_log=False,
                                           log_level=settings.log_level))
    failed: list[BaseException] = []

    def stop(error: BaseException) -> None:
        failed.append(error)
        server.should_exit = True

    if graceful_stop_signal is not None:
        signal.signal(graceful_stop_signal, lambda signum, frame: setattr(server, "should_exit", True))
    service.start_loading(on_failure=stop)
    shown_host = "127.0.0.1" if settings.host == "0.0.0.0" else settings.host
    print(f"{title} on http://{shown_host}:{settings.port} (bound to {settings.host}, port "
          f"{settings.port}); LLM backend {settings.llm_backend}; model {settings.model_dir} loading "
          f"on {settings.device}; ready when GET /ready answers 200", flush=True)
    server.run()
    if failed:
        print(f"error: the model could not be loaded: {failed[0]}", file=sys.stderr, flush=True)
        return 1
    return 0
