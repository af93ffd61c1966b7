"""The upstream CosyVoice runtime API: raw s16le PCM at the model's rate, streamed.

Each endpoint answers GET and POST, with query parameters and/or form fields (urlencoded or
multipart, `prompt_wav` as a file) in the body: upstream's own client.py sends its form in the
body of a GET. Where upstream takes `prompt_wav`, a registered voice may be named in `spk_id`
instead; `spk_id` of /inference_sft is a built-in speaker or a registered voice. Extensions:
`speed`, `seed`.

    /inference_sft            tts_text, spk_id
    /inference_zero_shot      tts_text, prompt_text, prompt_wav
    /inference_cross_lingual  tts_text, prompt_wav
    /inference_instruct       tts_text, spk_id, instruct_text   (CosyVoice2: instruct2 in the voice)
    /inference_instruct2      tts_text, instruct_text, prompt_wav
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from ..errors import ApiError
from ..modes import Job, Mode
from ..responses import audio_response
from ..schemas import UpstreamParams
from ..service import SpeechService
from ..speech import job_for_upload, job_for_voice
from . import ready_service

router = APIRouter(tags=["upstream CosyVoice"])


FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


async def read_params(request: Request) -> tuple[UpstreamParams, bytes | None]:
    """Query parameters and form fields (whatever the method; form fields win), validated; and the
    prompt_wav upload if any."""
    fields, upload = dict(request.query_params), None
    content_type = request.headers.get("content-type", "")
    if content_type and not content_type.startswith(FORM_TYPES) and request.method == "POST":
        raise ApiError(415, f"send form fields (multipart/form-data or urlencoded), not {content_type}")
    if content_type.startswith(FORM_TYPES):
        form = await request.form()
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key == "prompt_wav":
                    upload = await value.read()
            else:
                fields[key] = value
    try:
        return UpstreamParams(**fields), upload
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None


async def respond(request: Request, service: SpeechService, job: Job) -> Response:
    synthesis = await service.start(job, gone=request.is_disconnected)
    return await audio_response(request, synthesis, "pcm", service.sample_rate, stream=True)


def prompt_job(service: SpeechService, mode: Mode, params: UpstreamParams, upload: bytes | None) -> Job:
    """A job on the uploaded prompt_wav, or on the registered voice named in spk_id."""
    if upload is not None:
        return job_for_upload(service, mode, params.tts_text, upload, params.prompt_text,
                              instruct=params.instruct_text, speed=params.speed, seed=params.seed)
    if not params.spk_id:
        raise ApiError(400, f"{mode.value} needs prompt audio: upload prompt_wav (POST multipart) "
                            "or name a registered voice in spk_id")
    return job_for_voice(service, params.tts_text, params.spk_id, mode=mode,
                         instruct=params.instruct_text, speed=params.speed, seed=params.seed)


@router.api_route("/inference_sft", methods=["GET", "POST"])
async def inference_sft(request: Request, service: SpeechService = Depends(ready_service)) -> Response:
    params, _ = await read_params(request)
    if not params.spk_id:
        raise ApiError(400, "spk_id is required: a built-in speaker or a registered voice")
    job = job_for_voice(service, params.tts_text, params.spk_id, speed=params.speed, seed=params.seed)
    return await respond(request, service, job)


@router.api_route("/inference_zero_shot", methods=["GET", "POST"])
async def inference_zero_shot(request: Request, service: SpeechService = Depends(ready_service)) -> Response:
    params, upload = await read_params(request)
    return await respond(request, service, prompt_job(service, Mode.ZERO_SHOT, params, upload))


@router.api_route("/inference_cross_lingual", methods=["GET", "POST"])
async def inference_cross_lingual(request: Request, service: SpeechService = Depends(ready_service)) -> Response:
    params, upload = await read_params(request)
    return await respond(request, service, prompt_job(service, Mode.CROSS_LINGUAL, params, upload))


@router.api_route("/inference_instruct", methods=["GET", "POST"])
async def inference_instruct(request: Request, service: SpeechService = Depends(ready_service)) -> Response:
    params, _ = await read_params(request)
    if not params.spk_id:
        raise ApiError(400, "spk_id is required: a registered voice to speak in")
    if not params.instruct_text.strip():
        raise ApiError(400, "instruct_text is required")
    return await respond(request, service, prompt_job(service, Mode.INSTRUCT2, params, None))


@router.api_route("/inference_instruct2", methods=["GET", "POST"])
async def inference_instruct2(request: Request, service: SpeechService = Depends(ready_service)) -> Response:
    params, upload = await read_params(request)
    return await respond(request, service, prompt_job(service, Mode.INSTRUCT2, params, upload))
