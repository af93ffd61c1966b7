"""The xtts-api-server API (SillyTavern, Voxta): speakers are the registered voices.

    GET /speakers_list -> ["alice", ...]
    GET /speakers      -> [{"name", "voice_id", "preview_url"}]
    POST /tts_to_audio/  JSON {text, speaker_wav, language} -> a WAV file
    GET /tts_stream?text=&speaker_wav=&language=          -> WAV, streamed
Extension: `seed` (repeatable audio) on both.
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response

from ..responses import audio_response
from ..schemas import XttsRequest
from ..service import SpeechService
from ..speech import job_for_voice
from . import ready_service, service_of

router = APIRouter(tags=["xtts-api-server"])


def voice_name(service: SpeechService, speaker_wav: str) -> str:
    """xtts clients send a speaker file name; 'alice.wav' means the voice 'alice'."""
    names = {info.name for info in service.voices.list()}
    if speaker_wav not in names and speaker_wav.lower().endswith(".wav") and speaker_wav[:-4] in names:
        return speaker_wav[:-4]
    return speaker_wav


@router.get("/speakers_list")
def speakers_list(service: SpeechService = Depends(service_of)) -> list[str]:
    return [info.name for info in service.voices.list()]


@router.get("/speakers")
def speakers(request: Request, service: SpeechService = Depends(service_of)) -> list[dict]:
    base = str(request.base_url).rstrip("/")
    return [{"name": info.name, "voice_id": info.name,
             "preview_url": f"{base}/api/voices/{info.name}/audio"} for info in service.voices.list()]


@router.post("/tts_to_audio/")
async def tts_to_audio(body: XttsRequest, request: Request,
                       service: SpeechService = Depends(ready_service)) -> Response:
    job = job_for_voice(service, body.text, voice_name(service, body.speaker_wav), seed=body.seed,
                        stream=False)
    synthesis = await service.start(job)
    return await audio_response(request, synthesis, "wav", service.sample_rate, stream=False)


@router.get("/tts_stream")
async def tts_stream(request: Request, text: str = Query(...), speaker_wav: str = Query("default"),
                     language: str = Query("auto"), seed: int | None = Query(None, description="extension"),
                     service: SpeechService = Depends(ready_service)) -> Response:
    job = job_for_voice(service, text, voice_name(service, speaker_wav), seed=seed, stream=True)
    synthesis = await service.start(job)
    return await audio_response(request, synthesis, "wav", service.sample_rate, stream=True)
