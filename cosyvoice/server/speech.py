"""Request parameters -> a Job: text checks, voice choice, mode choice, cache key. Every API
family ends here, so every family checks text, speed and voices the same way."""
from __future__ import annotations

import re

from .errors import ApiError
from .modes import Job, Mode, PromptUpload
from .service import SpeechService
from .voices import prompt_digest

MIN_SPEED, MAX_SPEED = 0.25, 4.0
MAX_SEED = 2**63 - 1
# Control characters other than tab and newlines mean binary junk, not text to speak.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffe\uffff]")
SURROGATES = re.compile("[\ud800-\udfff]")   # from JSON escapes; no UTF-8 text holds them


def check_text(text: str | None, max_chars: int, what: str = "text") -> str:
    if text is None or not text.strip():
        raise ApiError(400, f"the {what} is empty")
    if len(text) > max_chars:
        raise ApiError(400, f"the {what} has {len(text)} characters; the limit is {max_chars}")
    if CONTROL_CHARACTERS.search(text):
        raise ApiError(400, f"the {what} contains control characters; send plain UTF-8 text")
    if SURROGATES.search(text):
        raise ApiError(400, f"the {what} is not valid Unicode (lone UTF-16 surrogates); send UTF-8 text")
    if not any(character.isalnum() for character in text):
        raise ApiError(400, f"the {what} has nothing to speak (only punctuation or symbols)")
    return text


def check_speed(speed: float) -> float:
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise ApiError(400, f"speed must be between {MIN_SPEED} and {MAX_SPEED}, not {speed}")
    return speed


def check_seed(seed: int | None) -> int | None:
    # torch's manual_seed overflows past 64 bits, a 500 from a worker; the non-negative int64
    # range means the same seed however a runtime reads 64 bits (signed or not)
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ApiError(400, f"seed must be between 0 and {MAX_SEED}, not {seed}")
    return seed


def job_for_voice(service: SpeechService, text: str, voice_name: str | None, *, instruct: str = "",
                  mode: Mode | None = None, speed: float = 1.0, seed: int | None = None,
                  stream: bool = True) -> Job:
    """A job speaking `text` in a stored voice, or as a built-in speaker of the model (sft).
    Without an explicit mode, Mode.for_voice chooses."""
    settings = service.settings
    text = check_text(text, settings.max_text_chars)
    speed = check_speed(speed)
    if instruct:
        check_text(instruct, settings.max_text_chars, "instruction")
    stored_names = {info.name for info in service.voices.list()}
    builtin = service.speaker_names
    if voice_name and voice_name != "default" and voice_name not in stored_names \
            and voice_name not in builtin:
        known = ", ".join(sorted(stored_names) + builtin) or "none registered"
        raise ApiError(400, f"unknown voice '{voice_name}'; available: {known}")
    if voice_name and voice_name in builtin and voice_name not in stored_names:
        if instruct or mode is not None:
            raise ApiError(400, f"'{voice_name}' is a built-in speaker; it supports plain (sft) speech only")
        return _job(Mode.SFT, text, None, f"speaker:{voice_name}", speed, seed, stream, speaker=voice_name)
    stored = service.voices.resolve(voice_name)
    if mode is None:
        mode = Mode.for_voice(instruct, stored.info.prompt_text)
    return _job(mode, text, stored.voice, f"voice:{stored.info.name}:{stored.info.revision}",
                speed, seed, stream, instruct=instruct)


def job_for_upload(service: SpeechService, mode: Mode, text: str, audio: bytes, prompt_text: str = "", *,
                   instruct: str = "", speed: float = 1.0, seed: int | None = None,
                   stream: bool = True) -> Job:
    """A job whose voice is prompt audio sent with the request."""
    settings = service.settings
    text = check_text(text, settings.max_text_chars)
    speed = check_speed(speed)
    if not audio:
        raise ApiError(400, "the prompt audio upload is empty")
    if mode.needs_transcript:
        check_text(prompt_text, settings.max_text_chars, "prompt text (transcript of the prompt audio)")
    if mode.needs_instruction:
        check_text(instruct, settings.max_text_chars, "instruction")
    digest = prompt_digest(audio, prompt_text)
    return _job(mode, text, PromptUpload(audio, prompt_text), f"upload:{digest}", speed, seed,
                stream, instruct=instruct)


def _job(mode: Mode, text: str, voice, voice_key: str, speed: float, seed: int | None,
         stream: bool, speaker: str = "", instruct: str = "") -> Job:
    seed = check_seed(seed)
    model_stream = stream and speed == 1.0    # the runtime changes speed on whole utterances only
    key = (mode.value, text, voice_key, instruct, speed, seed, model_stream)
    return Job(mode, text, voice, speaker=speaker, instruct=instruct, speed=speed, seed=seed,
               stream=model_stream, cache_key=key)
