"""The native API (compatible with the server this project replaces) and the voices API.

    POST /tts                form text, speaker -> raw s16le PCM, streamed
    GET  /api/speakers       {"speakers": [names]} (the replaced server's shape), and "details":
                             [{name, voice_id, kind}] for registered voices and built-in speakers
    GET  /api/voices         registered voices;  POST (multipart name, prompt_text, audio) adds one
    DELETE /api/voices/{name}, GET /api/voices/{name}/audio
"""
from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, Response

from ..audio_encoding import check_format
from ..errors import ApiError
from ..responses import audio_response
from ..schemas import SpeakerOut, SpeakersOut, VoiceOut
from ..service import SpeechService
from ..speech import job_for_voice
from ..voices import VoiceInfo, check_name
from . import ready_service, service_of

router = APIRouter(tags=["native"])


@router.post("/tts", summary="speak text in a voice; streams raw s16le PCM by default")
async def tts(request: Request,
              text: str = Form(..., description="text to speak"),
              speaker: str = Form("", description="a registered voice or built-in speaker; empty: default"),
              instruct: str = Form("", description="how to speak (instruct2)"),
              speed: float = Form(1.0),
              seed: int | None = Form(None),
              format: str = Form("pcm", description="pcm, wav, mp3, opus, flac or aac"),
              stream: bool = Form(True),
              service: SpeechService = Depends(ready_service)) -> Response:
    check_format(format)
    job = job_for_voice(service, text, speaker or None, instruct=instruct, speed=speed, seed=seed,
                        stream=stream)
    synthesis = await service.start(job, gone=request.is_disconnected)
    return await audio_response(request, synthesis, format, service.sample_rate, stream)


@router.get("/api/speakers", response_model=SpeakersOut, summary="voices and built-in speakers")
def speakers(service: SpeechService = Depends(ready_service)) -> SpeakersOut:
    voices = [SpeakerOut(name=info.name, voice_id=info.name, kind="voice") for info in service.voices.list()]
    builtin = [SpeakerOut(name=name, voice_id=name, kind="builtin") for name in service.speaker_names]
    details = voices + builtin
    return SpeakersOut(speakers=[speaker.name for speaker in details], details=details)


def voice_audio_path(name: str) -> str:
    """The path of a voice's prompt audio, the name percent-encoded ('x#y' -> /api/voices/x%23y/audio)."""
    return f"/api/voices/{quote(name, safe='')}/audio"


def voice_out(info: VoiceInfo) -> VoiceOut:
    return VoiceOut(name=info.name, prompt_text=info.prompt_text, created=info.created,
                    source=info.source, audio_url=voice_audio_path(info.name))


@router.get("/api/voices", response_model=list[VoiceOut], summary="registered voices")
def list_voices(service: SpeechService = Depends(service_of)) -> list[VoiceOut]:
    return [voice_out(info) for info in service.voices.list()]


@router.post("/api/voices", response_model=VoiceOut, status_code=201, summary="register a voice")
async def register_voice(name: str = Form(..., description="no path separators, brackets or leading '.'"),
                         prompt_text: str = Form("", description="transcript of the audio "
                                                                 "(needed for zero_shot)"),
                         audio: UploadFile = File(..., description="3 to 30 s of clear speech"),
                         service: SpeechService = Depends(ready_service)) -> VoiceOut:
    check_name(name)
    if any(info.name == name for info in service.voices.list()):
        raise ApiError(409, f"a voice named '{name}' exists; delete it first")
    if len(prompt_text) > service.settings.max_text_chars:
        raise ApiError(400, f"the prompt text is longer than {service.settings.max_text_chars} characters")
    data = await audio.read()
    if not data:
        raise ApiError(400, "the audio upload is empty")
    return voice_out(await service.register_voice(name, prompt_text, data))


@router.delete("/api/voices/{name}", summary="delete a voice (and its imported file)")
def delete_voice(name: str, service: SpeechService = Depends(service_of)) -> dict:
    service.voices.delete(check_name(name))
    return {"deleted": name}


@router.get("/api/voices/{name}/audio", summary="the prompt audio of a voice")
def voice_audio(name: str, service: SpeechService = Depends(service_of)) -> FileResponse:
    return FileResponse(service.voices.audio_path(check_name(name)))
