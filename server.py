"""Starts the CosyVoice2 HTTP server on the PyTorch runtime.

    python server.py --model-dir pretrained_models/CosyVoice2-0.5B [--host 127.0.0.1] [--port 6006]
                     [--device cuda|cpu] [--voices-dir DIR] [--api-key KEY] ...   (--help: all flags)

The port opens at once (/health answers); the model loads in the background and /ready turns 200
once it is loaded and warmed. If loading fails, the server stops with exit status 1.
"""
from __future__ import annotations

import sys

import uvicorn

from cosyvoice.server import Settings, create_app
from cosyvoice.server.engine import Engine
from cosyvoice.server.logs import configure_logging
from cosyvoice.server.metrics import Metrics
from cosyvoice.server.voices import VoiceStore


def main(argv: list[str] | None = None) -> int:
    settings = Settings.from_args(argv)
    configure_logging(settings.log_level)
    engine = Engine(settings, Metrics(), VoiceStore(settings.voices_dir, settings.default_voice))
    app = create_app(settings, engine)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                           access_log=False, log_level=settings.log_level))
    failed = []

    def stop(error: BaseException) -> None:
        failed.append(error)
        server.should_exit = True

    engine.start_loading(on_failure=stop)
    shown_host = "127.0.0.1" if settings.host == "0.0.0.0" else settings.host
    print(f"CosyVoice2 server on http://{shown_host}:{settings.port} (bound to {settings.host}, "
          f"port {settings.port}); model {settings.model_dir} loading on {settings.device}; "
          f"ready when GET /ready answers 200", flush=True)
    server.run()
    if failed:
        print(f"error: the model could not be loaded: {failed[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
