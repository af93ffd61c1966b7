"""SillyTavern's "CosyVoice (Unofficial)" TTS provider: it calls the API of CosyVoice_For_Windows,
at the server's root, and lists voices with GET /speakers (routers/xtts.py, same shape).

    POST /  JSON {text, speaker, streaming: 0|1}  -> WAV: whole, with exact lengths; with
                                                     streaming 1, sent as it is made
    GET  /?text=&speaker=&streaming=              -> the same (GET / without text is the web page)
`speed` may be given as a query parameter (as there) or in the JSON body.
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from ..responses import audio_response
from ..schemas import CosyVoiceForkRequest
from ..service import SpeechService
from ..speech import job_for_voice
from . import ready_service

router = APIRouter(tags=["SillyTavern CosyVoice provider"])


def parse(fields: dict) -> CosyVoiceForkRequest:
    try:
        return CosyVoiceForkRequest(**fields)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None


async def speak(request: Request, service: SpeechService, body: CosyVoiceForkRequest) -> Response:
    speed = 1.0 if body.speed is None else body.speed
    job = job_for_voice(service, body.text, body.speaker or None, speed=speed, stream=body.streaming)
    synthesis = await service.start(job, gone=request.is_disconnected)
    return await audio_response(request, synthesis, "wav", service.sample_rate, stream=body.streaming)


@router.post("/", summary="speech as a WAV file (SillyTavern's CosyVoice provider)")
async def speak_json(body: CosyVoiceForkRequest, request: Request,
                     service: SpeechService = Depends(ready_service)) -> Response:
    if body.speed is None and "speed" in request.query_params:
        body = parse({**body.model_dump(), "speed": request.query_params["speed"]})
    return await speak(request, service, body)


async def speak_query(request: Request) -> Response:
    """GET /?text=...: called by the web page's route when the query holds `text`."""
    return await speak(request, ready_service(request), parse(dict(request.query_params)))
