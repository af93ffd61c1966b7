"""cosyvoice: our own inference runtime for the official CosyVoice2 and CosyVoice3 checkpoints.

    import cosyvoice
    tts = cosyvoice.load("pretrained_models/Fun-CosyVoice3-0.5B", device="cuda")
    for chunk in tts.cross_lingual("Hello there.", "prompt.wav", stream=True):
        ...   # float32 mono at tts.sample_rate

The public face is here: `load`, the model classes, `Voice` and the errors. The rest of the
package, by concept: `loading/` (model directory -> modules), `models/` (the neural stages),
`frontend/` (text and audio features), `inference/` (modes and the streaming schedule),
`concurrency/` (batching across requests), `backends/` (LLM runtimes), `server/`, `tools/`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .backends import BackendFactory
from .errors import InputError, ModelDirError
from .inference.model import MODEL_CLASSES, CosyVoice, CosyVoice2, CosyVoice3
from .loading.model_dir import open_model_dir
from .voice import Voice

__all__ = ["load", "CosyVoice", "CosyVoice2", "CosyVoice3", "Voice", "InputError", "ModelDirError"]


def load(model_dir: str | Path, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32, llm_backend: str | BackendFactory = "torch",
         **options) -> CosyVoice:
    """Loads an official model directory, CosyVoice2 or CosyVoice3 as its yaml says (see
    CosyVoice for the modes).

    `llm_backend`: "torch", "trtllm" or a factory (cosyvoice.backends)."""
    model = open_model_dir(model_dir)
    model_class = MODEL_CLASSES[model.generation.name]
    return model_class(model, device=device, dtype=dtype, llm_backend=llm_backend, **options)
