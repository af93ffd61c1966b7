"""The OpenAI speech API; errors have OpenAI's shape (see errors.py).

    POST /v1/audio/speech   {model, input, voice, response_format, speed, instructions, stream,
                             stream_format}
    GET  /v1/models, GET /v1/audio/voices

`stream_format` "audio" (the default) answers with the audio file's bytes. "sse" answers with
server-sent events, as OpenAI documents them: one `speech.audio.delta` event per encoded piece,
its bytes in base64 (the pieces concatenated are the file the "audio" format would send), then one
`speech.audio.done` event with the usage. Usage: `input_tokens` counts the input text with the
model's text tokenizer; the pipeline does not report how many speech tokens the LLM generated, so
`output_tokens` is 0 and `total_tokens` equals `input_tokens`.
"""
from __future__ import annotations

import base64
import json
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import Field
from starlette.background import BackgroundTask

from ..audio_encoding import check_format
from ..engine import Engine, Generation
from ..errors import ApiError
from ..responses import encoded_chunks, audio_headers, audio_response
from ..schemas import SpeechRequest
from ..speech import job_for_voice
from . import engine_of, ready_engine

router = APIRouter(prefix="/v1", tags=["OpenAI"])

MODEL_IDS = ("cosyvoice2", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")
# OpenAI's own voice names: clients often offer only these, so unless a voice of that name is
# registered they mean the default voice.
OPENAI_VOICES = {"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage",
                 "shimmer", "verse"}
STREAM_FORMATS = ("audio", "sse")


class OpenAISpeechRequest(SpeechRequest):
    # a plain string, checked by check_stream_format, so a bad value gets a sentence listing
    # the accepted ones
    stream_format: str = Field("audio", description="'audio' (the audio bytes) or 'sse' (server-sent "
                                                    "events carrying base64 audio; with stream false "
                                                    "the audio comes as one event)")


def check_stream_format(name: str) -> str:
    if name not in STREAM_FORMATS:
        raise ApiError(400, f"unsupported stream_format '{name}'; choose one of {', '.join(STREAM_FORMATS)}")
    return name


@router.post("/audio/speech")
async def speech(body: OpenAISpeechRequest, request: Request,
                 engine: Engine = Depends(ready_engine)) -> Response:
    fmt = check_format(body.response_format)
    stream_format = check_stream_format(body.stream_format)
    voice = body.voice
    if voice in OPENAI_VOICES and voice not in {info.name for info in engine.voices.list()}:
        voice = "default"
    job = job_for_voice(engine, body.input, voice, instruct=body.instructions or "", speed=body.speed,
                        seed=body.seed, stream=body.stream)
    if stream_format == "sse":
        # counted before start(): from there on the generation holds a worker until it is closed
        usage = token_usage(engine.tts.tokenizer.count(body.input))
        return sse_response(request, await engine.start(job), fmt, engine.sample_rate, usage)
    generation = await engine.start(job)
    return await audio_response(request, generation, fmt, engine.sample_rate, body.stream)


def token_usage(input_tokens: int) -> dict[str, int]:
    """OpenAI's usage object; see the module docstring for why output_tokens is 0."""
    return {"input_tokens": input_tokens, "output_tokens": 0, "total_tokens": input_tokens}


def sse_response(request: Request, generation: Generation, fmt: str, sample_rate: int,
                 usage: dict[str, int]) -> StreamingResponse:
    # no-cache and no proxy buffering: each event should reach the client as soon as it is made
    headers = {**audio_headers(fmt, sample_rate, generation.from_cache),
               "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    # close() also runs as a background task: the body may be abandoned before it starts
    return StreamingResponse(_sse_events(request, generation, fmt, sample_rate, usage),
                             media_type="text/event-stream", headers=headers,
                             background=BackgroundTask(generation.close))


async def _sse_events(request: Request, generation: Generation, fmt: str, sample_rate: int,
                      usage: dict[str, int]) -> AsyncIterator[bytes]:
    """The audio stream's pieces as delta events, then the done event. `encoded_chunks` is the audio
    stream's own loop, so a client that leaves cancels the synthesis the same way."""
    async for data in encoded_chunks(request, generation, fmt, sample_rate):
        yield sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})
    # not after a hang-up: the audio did not all go out (a failure raises before this point)
    if generation.completed:
        yield sse_event({"type": "speech.audio.done", "usage": usage})


def sse_event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode("utf-8")


@router.get("/models")
def models() -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                        "owned_by": "cosyvoice-deploy"} for model_id in MODEL_IDS]}


@router.get("/audio/voices")
def voices(engine: Engine = Depends(engine_of)) -> dict:
    return {"voices": [info.name for info in engine.voices.list()]}
