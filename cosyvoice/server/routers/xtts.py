"""The xtts-api-server API (SillyTavern, Voxta): speakers are the registered voices.

    GET /speakers_list -> ["alice", ...]
    GET /speakers      -> [{"name", "voice_id", "preview_url"}]
    POST /tts_to_audio/  JSON {text, speaker_wav, language} -> a WAV file
    GET /tts_stream?text=&speaker_wav=&language=          -> WAV, streamed
Extension: `seed` (repeatable audio) on both.
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response

from ..engine import Engine
from ..responses import audio_response
from ..schemas import XttsRequest
from ..speech import job_for_voice
from . import engine_of, ready_engine

router = APIRouter(tags=["xtts-api-server"])


def voice_name(engine: Engine, speaker_wav: str) -> str:
    """xtts clients send a speaker file name; 'alice.wav' means the voice 'alice'."""
    names = {info.name for info in engine.voices.list()}
    if speaker_wav not in names and speaker_wav.lower().endswith(".wav") and speaker_wav[:-4] in names:
        return speaker_wav[:-4]
    return speaker_wav


@router.get("/speakers_list")
def speakers_list(engine: Engine = Depends(engine_of)) -> list[str]:
    return [info.name for info in engine.voices.list()]


@router.get("/speakers")
def speakers(request: Request, engine: Engine = Depends(engine_of)) -> list[dict]:
    base = str(request.base_url).rstrip("/")
    return [{"name": info.name, "voice_id": info.name,
             "preview_url": f"{base}/api/voices/{info.name}/audio"} for info in engine.voices.list()]


@router.post("/tts_to_audio/")
async def tts_to_audio(body: XttsRequest, request: Request,
                       engine: Engine = Depends(ready_engine)) -> Response:
    job = job_for_voice(engine, body.text, voice_name(engine, body.speaker_wav), seed=body.seed,
                        stream=False)
    generation = await engine.start(job)
    return await audio_response(request, generation, "wav", engine.sample_rate, stream=False)


@router.get("/tts_stream")
async def tts_stream(request: Request, text: str = Query(...), speaker_wav: str = Query("default"),
                     language: str = Query("auto"), seed: int | None = Query(None, description="extension"),
                     engine: Engine = Depends(ready_engine)) -> Response:
    job = job_for_voice(engine, text, voice_name(engine, speaker_wav), seed=seed, stream=True)
    generation = await engine.start(job)
    return await audio_response(request, generation, "wav", engine.sample_rate, stream=True)
