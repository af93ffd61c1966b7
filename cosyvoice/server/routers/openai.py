"""The OpenAI speech API; errors have OpenAI's shape (see errors.py).

    POST /v1/audio/speech   {model, input, voice (a name or {"id": name}), response_format, speed,
                             instructions, stream, stream_format: "audio" (the file's bytes) or
                             "sse" (OpenAI's events)}
    GET  /v1/models (the loaded generation, e.g. "cosyvoice2", and OpenAI's TTS names)
    GET  /v1/audio/voices -> {"voices": [{"id", "name"}]}, GET /v1/audio/models -> {"models": [{"id"}]}
         (the shapes Open WebUI reads)
"""
from __future__ import annotations

import base64
import json
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from ..audio_encoding import check_format
from ..errors import ApiError
from ..responses import audio_headers, audio_response, encoded_chunks
from ..schemas import OpenAISpeechRequest
from ..service import SpeechService
from ..speech import job_for_voice
from ..synthesis import StartedSynthesis
from . import ready_service, service_of

router = APIRouter(prefix="/v1", tags=["OpenAI"])

OPENAI_MODEL_IDS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
# OpenAI's own voice names: clients often offer only these, so unless a voice of that name is
# registered they mean the default voice.
OPENAI_VOICES = {"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage",
                 "shimmer", "verse", "marin", "cedar"}
STREAM_FORMATS = ("audio", "sse")


def check_stream_format(name: str) -> str:
    if name not in STREAM_FORMATS:
        raise ApiError(400, f"unsupported stream_format '{name}'; choose one of {', '.join(STREAM_FORMATS)}")
    return name


@router.post("/audio/speech")
async def speech(body: OpenAISpeechRequest, request: Request,
                 service: SpeechService = Depends(ready_service)) -> Response:
    fmt = check_format(body.response_format)
    stream_format = check_stream_format(body.stream_format)
    voice = body.voice if isinstance(body.voice, str) else body.voice.id
    if voice in OPENAI_VOICES and voice not in {info.name for info in service.voices.list()}:
        voice = "default"
    job = job_for_voice(service, body.input, voice, instruct=body.instructions or "", speed=body.speed,
                        seed=body.seed, stream=body.stream)
    if stream_format == "sse":
        # counted before start(): from there on the synthesis holds a worker until it is closed
        usage = token_usage(service.count_text_tokens(body.input))
        synthesis = await service.start(job, gone=request.is_disconnected)
        return sse_response(request, synthesis, fmt, service.sample_rate, usage)
    synthesis = await service.start(job, gone=request.is_disconnected)
    return await audio_response(request, synthesis, fmt, service.sample_rate, body.stream)


def token_usage(input_tokens: int) -> dict[str, int]:
    """OpenAI's usage object: the input text's tokens as the model's tokenizer counts them. The
    model does not report how many speech tokens it generated, so output_tokens is 0."""
    return {"input_tokens": input_tokens, "output_tokens": 0, "total_tokens": input_tokens}


def sse_response(request: Request, synthesis: StartedSynthesis, fmt: str, sample_rate: int,
                 usage: dict[str, int]) -> StreamingResponse:
    # no-cache and no proxy buffering: each event should reach the client as soon as it is made
    headers = {**audio_headers(fmt, sample_rate, synthesis.from_cache),
               "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    # close() also runs as a background task: the body may be abandoned before it starts
    return StreamingResponse(_sse_events(request, synthesis, fmt, sample_rate, usage),
                             media_type="text/event-stream", headers=headers,
                             background=BackgroundTask(synthesis.close))


async def _sse_events(request: Request, synthesis: StartedSynthesis, fmt: str, sample_rate: int,
                      usage: dict[str, int]) -> AsyncIterator[bytes]:
    """The audio stream's pieces as `speech.audio.delta` events (base64; joined, they are the file
    stream_format "audio" sends), then one `speech.audio.done` with the usage. `encoded_chunks` is
    the audio stream's own loop, so a client that leaves cancels the synthesis the same way."""
    async for data in encoded_chunks(request, synthesis, fmt, sample_rate):
        yield sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})
    # not after a hang-up: the audio did not all go out (a failure raises before this point)
    if synthesis.completed:
        yield sse_event({"type": "speech.audio.done", "usage": usage})


def sse_event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode("utf-8")


def model_ids(service: SpeechService) -> tuple[str, ...]:
    generation = service.generation
    return ((generation.lower(),) if generation else ()) + OPENAI_MODEL_IDS


@router.get("/models")
def models(service: SpeechService = Depends(service_of)) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                        "owned_by": "cosyvoice-deploy", "generation": service.generation}
                                       for model_id in model_ids(service)]}


@router.get("/audio/models", summary="speech models, as Open WebUI reads them")
def audio_models(service: SpeechService = Depends(service_of)) -> dict:
    return {"models": [{"id": model_id} for model_id in model_ids(service)]}


@router.get("/audio/voices", summary="registered voices, as Open WebUI reads them")
def voices(service: SpeechService = Depends(service_of)) -> dict:
    return {"voices": [{"id": info.name, "name": info.name} for info in service.voices.list()]}
