"""A prepared voice: everything the model needs from one prompt, computed once and reusable.

Saved with `torch.save` as a plain dict of tensors and strings, and loaded with
`weights_only=True`, so a voice file cannot run code.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError

FORMAT = "cosyvoice-deploy voice v1"


@dataclass(frozen=True)
class Voice:
    prompt_text: str                # normalised transcript of the prompt audio ("" if none)
    prompt_text_ids: torch.Tensor   # int32 [1, Lp]
    speech_tokens: torch.Tensor     # int32 [1, P]
    embedding: torch.Tensor         # float32 [1, D]
    speech_feat: torch.Tensor       # float32 [1, ratio * P, n_mels]
    # The model generation that computed the features ("CosyVoice2", "CosyVoice3"): speech
    # tokenizers and prompt mels differ between generations, so a voice serves only its own.
    generation: str = "CosyVoice2"

    def save(self, path: str | Path) -> None:
        torch.save({"format": FORMAT, "prompt_text": self.prompt_text,
                    "prompt_text_ids": self.prompt_text_ids, "speech_tokens": self.speech_tokens,
                    "embedding": self.embedding, "speech_feat": self.speech_feat,
                    "generation": self.generation}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> "Voice":
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError) as exc:
            raise InputError(f"{path} is not a readable voice file ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError(f"{path} is not a voice file of this runtime ({FORMAT})")
        # Files written before generations existed hold CosyVoice2 features.
        return cls(data["prompt_text"], data["prompt_text_ids"], data["speech_tokens"],
                   data["embedding"], data["speech_feat"], data.get("generation", "CosyVoice2"))
