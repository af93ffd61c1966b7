"""Runs the app under uvicorn: what server.py and fast_server.py share.

The port opens at once (/health answers), the model loads on a background thread, a one-line
banner says where to connect, and a model that fails to load stops the server with status 1.
SIGTERM or Ctrl+C: new requests get 503, streams end cleanly after their current chunk, and the
process exits (within GRACEFUL_SHUTDOWN_S even if a client stops reading).
"""
from __future__ import annotations

import signal
import sys

import uvicorn

from .app import create_app
from .logs import configure_logging
from .service import build_service
from .settings import Settings

GRACEFUL_SHUTDOWN_S = 5   # then uvicorn cancels what is left (e.g. a stream to a client not reading)


class Server(uvicorn.Server):
    """uvicorn's server, which tells the speech service first when it is asked to stop, so that
    running syntheses end at their next chunk instead of holding the shutdown until they finish."""

    def __init__(self, config: uvicorn.Config, service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame) -> None:
        self.service.begin_shutdown()
        super().handle_exit(sig, frame)


def run_server(settings: Settings, title: str = "CosyVoice server",
               graceful_stop_signal: signal.Signals | None = None) -> int:
    """Serves until stopped; returns the exit status. `graceful_stop_signal`, when given, also
    ends the server cleanly."""
    configure_logging(settings.log_level)
    service = build_service(settings)
    server = Server(uvicorn.Config(create_app(settings, service), host=settings.host, port=settings.port,
                                   access_log=False, log_level=settings.log_level,
                                   timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                                   ws_per_message_deflate=False), service)   # audio does not deflate
    failed: list[BaseException] = []

    def stop(error: BaseException) -> None:
        failed.append(error)
        server.should_exit = True

    if graceful_stop_signal is not None:
        signal.signal(graceful_stop_signal, lambda signum, frame: (service.begin_shutdown(),
                                                                   setattr(server, "should_exit", True)))
    service.start_loading(on_failure=stop)
    shown_host = "127.0.0.1" if settings.host == "0.0.0.0" else settings.host
    print(f"{title} on http://{shown_host}:{settings.port} (bound to {settings.host}, port "
          f"{settings.port}); LLM backend {settings.llm_backend}; model {settings.model_dir} loading "
          f"on {settings.device}; ready when GET /ready answers 200"
          + (f"; gRPC on {shown_host}:{settings.grpc_port}" if settings.grpc_port else ""), flush=True)
    server.run()   # a failed startup (a gRPC port in use) exits with uvicorn's status 3
    if failed:
        print(f"error: the model could not be loaded: {failed[0]}", file=sys.stderr, flush=True)
        return 1
    return 0
