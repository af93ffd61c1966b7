"""cosyvoice: our own inference runtime for the official CosyVoice2 checkpoints.

    import cosyvoice
    tts = cosyvoice.load("pretrained_models/CosyVoice2-0.5B", device="cuda")
    for chunk in tts.cross_lingual("Hello there.", "prompt.wav", stream=True):
        ...   # float32 mono at tts.sample_rate
"""
from __future__ import annotations

from pathlib import Path

import torch

from .backends import BackendFactory
from .errors import InputError
from .loading.model_dir import ModelDirError
from .inference.model import CosyVoice2
from .voice import Voice

__all__ = ["load", "CosyVoice2", "Voice", "InputError", "ModelDirError"]


def load(model_dir: str | Path, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32, llm_backend: str | BackendFactory = "torch",
         **options) -> CosyVoice2:
    """Loads an official CosyVoice2 model directory (see CosyVoice2 for the modes).

    `llm_backend`: "torch", "trtllm" or a factory (cosyvoice.backends)."""
    return CosyVoice2(model_dir, device=device, dtype=dtype, llm_backend=llm_backend, **options)
