"""The xtts-api-server API (SillyTavern's XTTSv2 provider, Voxta and other xtts clients): speakers
are the registered voices. Every path answers with and without a trailing slash (no redirect).

    GET  /speakers_list  -> ["alice", ...]
    GET  /speakers       -> [{"name", "voice_id", "preview_url", "lang"}]
    GET  /sample/{file}  -> a voice's prompt audio ("alice.wav" or "alice"; preview_url points here)
    GET  /languages      -> {"languages": {"English": "en", ...}} (the text decides; any code is accepted)
    POST /tts_to_audio/  JSON {text, speaker_wav, language} -> a WAV file, whole, exact lengths
    GET  /tts_stream?text=&speaker_wav=&language=            -> WAV, streamed (open-ended header)
    POST /tts_to_file    JSON {..., file_name_or_path} -> {"message", "output_path"}: written to the
                         output/ folder inside the voices folder (only the file name is used); the
                         newest OUTPUT_KEEP_FILES files are kept, older ones removed
    POST /set_tts_settings, GET /get_tts_settings: speed is applied to what follows; the XTTS
                         sampling settings are accepted, kept and listed under "ignored"
    GET  /get_models_list, POST /switch_model, GET /get_folders, POST /set_output,
    POST /set_speaker_folder: one model and folders fixed at start; naming another is a 400
Extension: `seed` (repeatable audio) on the synthesis routes.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from ..errors import ApiError
from ..responses import audio_response
from ..schemas import (XttsFileRequest, XttsFolderRequest, XttsModelRequest, XttsRequest,
                       XttsSettings)
from ..service import SpeechService
from ..speech import check_speed, job_for_voice
from ..voices import check_name
from . import ready_service, service_of

router = APIRouter(tags=["xtts-api-server"])

# xtts-api-server's defaults; SillyTavern sets them all at start
DEFAULT_TTS_SETTINGS = {"temperature": 0.75, "length_penalty": 1.0, "repetition_penalty": 5.0,
                        "top_k": 50, "top_p": 0.85, "speed": 1.0, "enable_text_splitting": True,
                        "stream_chunk_size": 100}
APPLIED_SETTINGS = ("speed",)
LANGUAGES = {"Auto": "auto", "Chinese": "zh-cn", "English": "en", "Japanese": "ja", "Korean": "ko",
             "Cantonese": "yue"}
OUTPUT_FOLDER = "output"   # inside the voices folder
OUTPUT_KEEP_FILES = 1000   # clients name the files: without a bound they could fill the disk


def route(method: str, path: str, **options):
    """Registers a function under `path` and its other slash form (the second one hidden from the
    docs): clients call both, and a redirect loses a browser's CORS preflight."""
    other = path[:-1] if path.endswith("/") else path + "/"

    def register(function):
        router.add_api_route(path, function, methods=[method], **options)
        router.add_api_route(other, function, methods=[method], include_in_schema=False, **options)
        return function
    return register


def voice_name(service: SpeechService, speaker_wav: str) -> str:
    """xtts clients send a speaker file name; 'alice.wav' means the voice 'alice'."""
    names = {info.name for info in service.voices.list()}
    if speaker_wav not in names and speaker_wav.lower().endswith(".wav") and speaker_wav[:-4] in names:
        return speaker_wav[:-4]
    return speaker_wav


def tts_settings(request: Request) -> dict:
    """The settings set by /set_tts_settings (one set per server, as in xtts-api-server)."""
    state = request.app.state
    settings = getattr(state, "xtts_settings", None)
    if settings is None:
        settings = state.xtts_settings = dict(DEFAULT_TTS_SETTINGS)
    return settings


def guess_language(text: str) -> str:
    """An xtts language code for a transcript, for display ('auto' when it says nothing)."""
    for pattern, code in ((r"[\u3040-\u30ff]", "ja"), (r"[\uac00-\ud7a3]", "ko"),
                          (r"[\u4e00-\u9fff]", "zh-cn"), (r"[A-Za-z]", "en")):
        if re.search(pattern, text):
            return code
    return "auto"


def output_folder(service: SpeechService) -> Path:
    return service.settings.voices_dir / OUTPUT_FOLDER


def remove_oldest(folder: Path, keep: int) -> None:
    """Removes the least recently written .wav files of `folder` beyond the newest `keep`."""
    files = []
    for path in folder.glob("*.wav"):
        try:
            files.append((path.stat().st_mtime_ns, path))
        except FileNotFoundError:   # removed meanwhile by a concurrent request
            continue
    for _, path in sorted(files, reverse=True)[keep:]:
        path.unlink(missing_ok=True)


# ---- speakers -------------------------------------------------------------------------------------

@route("GET", "/speakers_list")
def speakers_list(service: SpeechService = Depends(service_of)) -> list[str]:
    return [info.name for info in service.voices.list()]


@route("GET", "/speakers")
def speakers(service: SpeechService = Depends(service_of)) -> list[dict]:
    """preview_url starts with the configured public URL (or this server's own address, or is
    relative), never with the request's Host header."""
    base = service.settings.link_base
    return [{"name": info.name, "voice_id": info.name, "lang": guess_language(info.prompt_text),
             "preview_url": f"{base}/sample/{quote(info.name, safe='')}.wav"}
            for info in service.voices.list()]


@router.get("/sample/{file_name:path}")
def sample(file_name: str, service: SpeechService = Depends(service_of)) -> FileResponse:
    return FileResponse(service.voices.audio_path(check_name(voice_name(service, file_name))))


@route("GET", "/languages")
def languages() -> dict:
    return {"languages": LANGUAGES}


# ---- speech ---------------------------------------------------------------------------------------

async def speak(request: Request, service: SpeechService, text: str, speaker_wav: str,
                seed: int | None, stream: bool) -> Response:
    speed = float(tts_settings(request)["speed"])
    job = job_for_voice(service, text, voice_name(service, speaker_wav), speed=speed, seed=seed,
                        stream=stream)
    synthesis = await service.start(job, gone=request.is_disconnected)
    return await audio_response(request, synthesis, "wav", service.sample_rate, stream=stream)


@route("POST", "/tts_to_audio/")
async def tts_to_audio(body: XttsRequest, request: Request,
                       service: SpeechService = Depends(ready_service)) -> Response:
    return await speak(request, service, body.text, body.speaker_wav, body.seed, stream=False)


@route("GET", "/tts_stream")
async def tts_stream(request: Request, text: str = Query(...), speaker_wav: str = Query(...),
                     language: str = Query("auto"), seed: int | None = Query(None, description="extension"),
                     service: SpeechService = Depends(ready_service)) -> Response:
    return await speak(request, service, text, speaker_wav, seed, stream=True)


@route("POST", "/tts_to_file", response_model=None)
async def tts_to_file(body: XttsFileRequest, request: Request,
                      service: SpeechService = Depends(ready_service)) -> Response | dict:
    name = Path(body.file_name_or_path.replace("\\", "/")).name
    if not name.lower().endswith(".wav"):
        name += ".wav"
    check_name(name)
    response = await speak(request, service, body.text, body.speaker_wav, body.seed, stream=False)
    if response.status_code != 200:
        return response
    path = output_folder(service) / name

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{name}.tmp")
        temporary.write_bytes(response.body)
        temporary.replace(path)
        remove_oldest(path.parent, keep=OUTPUT_KEEP_FILES)
    await run_in_threadpool(write)
    return {"message": "The audio was successfully made and stored.", "output_path": str(path)}


# ---- settings, models, folders --------------------------------------------------------------------

@route("POST", "/set_tts_settings")
def set_tts_settings(body: XttsSettings, request: Request) -> dict:
    given = body.model_dump(exclude_none=True)
    if "speed" in given:
        check_speed(given["speed"])
    tts_settings(request).update(given)
    return {"message": "Settings successfully applied", "ignored": ignored_settings()}


@route("GET", "/get_tts_settings")
def get_tts_settings(request: Request) -> dict:
    return {**tts_settings(request), "ignored": ignored_settings()}


def ignored_settings() -> list[str]:
    return [name for name in DEFAULT_TTS_SETTINGS if name not in APPLIED_SETTINGS]


@route("GET", "/get_models_list")
def get_models_list(service: SpeechService = Depends(service_of)) -> list[str]:
    return [service.settings.model_dir.name]


@route("POST", "/switch_model")
def switch_model(body: XttsModelRequest, service: SpeechService = Depends(service_of)) -> dict:
    loaded = service.settings.model_dir.name
    generation = (service.generation or "").lower()
    if body.model_name not in (loaded, generation):
        raise ApiError(400, f"this server serves one model, {loaded}; to use another, restart it "
                            "with --model-dir")
    return {"message": f"Model {body.model_name} is loaded"}


@route("GET", "/get_folders")
def get_folders(service: SpeechService = Depends(service_of)) -> dict:
    return {"speaker_folder": str(service.settings.voices_dir), "output_folder": str(output_folder(service)),
            "model_folder": str(service.settings.model_dir.parent)}


@route("POST", "/set_output")
def set_output(body: XttsFolderRequest, service: SpeechService = Depends(service_of)) -> dict:
    return keep_folder("output_folder", body.output_folder, output_folder(service), "Output")


@route("POST", "/set_speaker_folder")
def set_speaker_folder(body: XttsFolderRequest, service: SpeechService = Depends(service_of)) -> dict:
    return keep_folder("speaker_folder", body.speaker_folder, service.settings.voices_dir, "Speaker")


def keep_folder(field_name: str, asked: str | None, current: Path, what: str) -> dict:
    """Folders are fixed at start (a request must not make the server write elsewhere): naming
    the current one is fine, another is a 400."""
    if asked is None:
        raise ApiError(422, f"{field_name} is required")
    if Path(asked).expanduser().resolve() != current.resolve():
        raise ApiError(400, f"the {what.lower()} folder of this server is fixed at {current}; start "
                            "it with another --voices-dir to move it")
    return {"message": f"{what} folder set to {asked}"}
