"""The synthesis modes, a job (one request in the runtime's terms), and the one mapping from a
job to the model call that serves it."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Hashable, Iterator

import numpy as np

from ..voice import Voice
from .voices import read_prompt


class Mode(str, Enum):
    """What the model is conditioned on (see cosyvoice.inference.model for each mode)."""
    ZERO_SHOT = "zero_shot"            # a voice with its transcript
    CROSS_LINGUAL = "cross_lingual"    # a voice's timbre only
    INSTRUCT2 = "instruct2"            # a voice's timbre and an instruction
    SFT = "sft"                        # a built-in speaker of the model

    def __str__(self) -> str:
        return self.value

    @property
    def needs_transcript(self) -> bool:
        return self is Mode.ZERO_SHOT

    @property
    def needs_instruction(self) -> bool:
        return self is Mode.INSTRUCT2

    @classmethod
    def for_voice(cls, instruct: str, transcript: str) -> "Mode":
        """A request that names no mode: an instruction means instruct2, a voice with a transcript
        zero_shot, one without cross_lingual."""
        if instruct:
            return cls.INSTRUCT2
        return cls.ZERO_SHOT if transcript else cls.CROSS_LINGUAL


@dataclass(frozen=True)
class PromptUpload:
    """Prompt audio sent with the request, prepared on the worker thread."""
    audio: bytes
    prompt_text: str


@dataclass(frozen=True)
class Job:
    """One synthesis request, in the runtime's terms."""
    mode: Mode
    text: str
    voice: Voice | PromptUpload | None = None  # for every mode but sft
    speaker: str = ""                          # sft: a built-in speaker of the model
    instruct: str = ""                         # instruct2
    speed: float = 1.0
    seed: int | None = None
    stream: bool = True                        # token-level chunks (needs speed 1.0)
    cache_key: Hashable | None = None          # None: never cached


def open_stream(model, job: Job) -> Iterator[np.ndarray]:
    """The model's chunk iterator for a job. Blocking (an uploaded prompt is decoded and prepared
    here): call it on a worker thread. The model validates its arguments (InputError, a 400)."""
    options = dict(stream=job.stream, speed=job.speed, seed=job.seed)
    if job.mode is Mode.SFT:
        return model.sft(job.text, job.speaker, **options)
    voice = job.voice
    if isinstance(voice, PromptUpload):
        samples, rate = read_prompt(voice.audio)
        voice = model.prepare_voice(samples, voice.prompt_text, sample_rate=rate)
    if job.mode is Mode.INSTRUCT2:
        return model.instruct2(job.text, job.instruct, voice=voice, **options)
    if job.mode is Mode.ZERO_SHOT:
        return model.zero_shot(job.text, voice=voice, **options)
    return model.cross_lingual(job.text, voice=voice, **options)
