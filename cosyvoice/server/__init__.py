"""The HTTP server: one FastAPI app serving the native, upstream, xtts and OpenAI APIs on one
speech service (the loaded model of either generation behind admission, cache and voice store).

    from cosyvoice.server import Settings, create_app
    app = create_app(Settings.from_args(["--model-dir", "pretrained_models/CosyVoice2-0.5B"]))
"""
from .app import create_app
from .service import SpeechService, build_service
from .settings import Settings

__all__ = ["create_app", "build_service", "SpeechService", "Settings"]
