"""The OpenAI speech API; errors have OpenAI's shape (see errors.py).

    POST /v1/audio/speech   {model, input, voice, response_format, speed, instructions, stream}
    GET  /v1/models, GET /v1/audio/voices
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from ..audio_encoding import check_format
from ..engine import Engine
from ..responses import audio_response
from ..schemas import SpeechRequest
from ..speech import job_for_voice
from . import engine_of, ready_engine

router = APIRouter(prefix="/v1", tags=["OpenAI"])

MODEL_IDS = ("cosyvoice2", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")
# OpenAI's own voice names: clients often offer only these, so unless a voice of that name is
# registered they mean the default voice.
OPENAI_VOICES = {"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage",
                 "shimmer", "verse"}


@router.post("/audio/speech")
async def speech(body: SpeechRequest, request: Request, engine: Engine = Depends(ready_engine)) -> Response:
    fmt = check_format(body.response_format)
    voice = body.voice
    if voice in OPENAI_VOICES and voice not in {info.name for info in engine.voices.list()}:
        voice = "default"
    job = job_for_voice(engine, body.input, voice, instruct=body.instructions or "", speed=body.speed,
                        seed=body.seed, stream=body.stream)
    generation = await engine.start(job)
    return await audio_response(request, generation, fmt, engine.sample_rate, body.stream)


@router.get("/models")
def models() -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                        "owned_by": "cosyvoice-deploy"} for model_id in MODEL_IDS]}


@router.get("/audio/voices")
def voices(engine: Engine = Depends(engine_of)) -> dict:
    return {"voices": [info.name for info in engine.voices.list()]}
