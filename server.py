"""Starts the CosyVoice HTTP server (CosyVoice2 or CosyVoice3 models) on the PyTorch runtime.

    python server.py --model-dir pretrained_models/CosyVoice2-0.5B [--host 127.0.0.1] [--port 6006]
                     [--device cuda|cpu] [--voices-dir DIR] [--api-key KEY] ...   (--help: all flags)

The port opens at once (/health answers); the model loads in the background and /ready turns 200
once it is loaded and warmed. If loading fails, the server stops with exit status 1.
"""
from __future__ import annotations

import sys

from cosyvoice.server import Settings
from cosyvoice.server.launch import run_server


def main(argv: list[str] | None = None) -> int:
    return run_server(Settings.from_args(argv))


if __name__ == "__main__":
    sys.exit(main())
