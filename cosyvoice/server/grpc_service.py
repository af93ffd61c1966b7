"""Upstream CosyVoice's gRPC service, `cosyvoice.CosyVoice/Inference` (cosyvoice.proto beside
this file), served beside HTTP on the same speech service: the same voices, admission, limits,
API key and metrics. `server.py --grpc-port N` turns it on; the app's lifespan starts it on
uvicorn's event loop (the admission it shares is used from that loop only).

    sft_request            spk_id: a built-in speaker or a registered voice
    zero_shot_request      prompt_audio (int16 PCM, 16 kHz) + prompt_text
    cross_lingual_request  prompt_audio
    instruct_request       spk_id: a registered voice; instruct_text (instruct2)

Audio goes back as int16 PCM at the model's rate, one message per chunk as it is made; the rate
is also sent as `x-sample-rate` initial metadata. With an API key configured, calls send it as
`authorization: Bearer KEY` or `x-api-key: KEY` metadata. Errors are status codes with a sentence:
INVALID_ARGUMENT (bad input), NOT_FOUND (unknown spk_id), FAILED_PRECONDITION (a voice of the
other model generation), UNAUTHENTICATED, RESOURCE_EXHAUSTED (queue full, or a message over the
upload limit; retry-after metadata says when to try again), UNAVAILABLE (model still loading, or
the server stopping).
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc import aio

from ..errors import InputError
from . import cosyvoice_pb2, cosyvoice_pb2_grpc
from .audio_encoding import to_s16le, wav_header
from .calls import api_key_error, record_call
from .errors import ApiError, Overloaded
from .modes import Job, Mode
from .service import SpeechService
from .settings import Settings
from .speech import job_for_upload, job_for_voice

log = logging.getLogger("cosyvoice.server")

ROUTE = "/cosyvoice.CosyVoice/Inference"
PROMPT_RATE = 16000          # upstream's clients send prompt audio at 16 kHz
STOP_GRACE_S = 2.0
STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.FAILED_PRECONDITION,
                413: grpc.StatusCode.RESOURCE_EXHAUSTED, 422: grpc.StatusCode.INVALID_ARGUMENT,
                499: grpc.StatusCode.CANCELLED}


class CallError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, retry_after: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


class CosyVoiceServicer(cosyvoice_pb2_grpc.CosyVoiceServicer):
    def __init__(self, service: SpeechService):
        self.service = service

    async def Inference(self, request, context: aio.ServicerContext):
        started = time.perf_counter()
        code, outcome, audio_bytes = grpc.StatusCode.OK, "complete", 0
        synthesis = None
        peer = context.peer()   # now: the context must not be touched once the call is cancelled
        kind = request.WhichOneof("RequestPayload")
        try:
            self._check_key(context)
            job = self._job(request)
            synthesis = await self._start(job)
            await context.send_initial_metadata((("x-sample-rate", str(self.service.sample_rate)),))
            async for chunk in synthesis.chunks():
                data = to_s16le(chunk)
                audio_bytes += len(data)
                yield cosyvoice_pb2.Response(tts_audio=data)
            if getattr(synthesis, "interrupted", False):   # cut short: the server is stopping
                raise CallError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; the audio "
                                "is incomplete", str(self.service.settings.retry_after_s))
        except CallError as error:
            code, outcome = error.code, "error"
            metadata = (("retry-after", error.retry_after),) if error.retry_after else ()
            await context.abort(error.code, error.message, trailing_metadata=metadata)
        except (asyncio.CancelledError, GeneratorExit):   # the client cancelled or left
            code, outcome = grpc.StatusCode.CANCELLED, "client cancelled"
            raise
        except Exception as error:
            log.exception("gRPC synthesis failed")
            code, outcome = grpc.StatusCode.INTERNAL, f"aborted ({type(error).__name__})"
            await context.abort(code, f"internal error ({type(error).__name__}); see the server log")
        finally:
            if synthesis is not None:
                synthesis.close()
            record_call(self.service.metrics, "GRPC", ROUTE, code.name,
                        code not in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED), started,
                        peer, outcome, bytes=audio_bytes, kind=kind)

    # ---- steps -------------------------------------------------------------------------------

    def _check_key(self, context) -> None:
        metadata = {key.lower(): value for key, value in (context.invocation_metadata() or ())}
        problem = api_key_error(self.service.settings.api_key, _text(metadata.get("authorization")),
                                _text(metadata.get("x-api-key")))
        if problem:
            raise CallError(grpc.StatusCode.UNAUTHENTICATED, problem)

    def _job(self, request) -> Job:
        """The request as a job; every refusal is a CallError with its status code."""
        service = self.service
        if service.stopping:
            raise CallError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; try again shortly",
                            str(service.settings.retry_after_s))
        if service.state != "ready":
            message = "the model failed to load; see the server log" if service.state == "failed" \
                else "the model is still loading; try again shortly"
            raise CallError(grpc.StatusCode.UNAVAILABLE, message, str(service.settings.retry_after_s))
        kind = request.WhichOneof("RequestPayload")
        try:
            if kind == "sft_request":
                body = request.sft_request
                return job_for_voice(service, body.tts_text, self._speaker(body.spk_id))
            if kind == "zero_shot_request":
                body = request.zero_shot_request
                return job_for_upload(service, Mode.ZERO_SHOT, body.tts_text,
                                      self._prompt_wav(body.prompt_audio), body.prompt_text)
            if kind == "cross_lingual_request":
                body = request.cross_lingual_request
                return job_for_upload(service, Mode.CROSS_LINGUAL, body.tts_text,
                                      self._prompt_wav(body.prompt_audio))
            if kind == "instruct_request":
                body = request.instruct_request
                if not body.instruct_text.strip():
                    raise ApiError(400, "instruct_text is required")
                name = self._speaker(body.spk_id)
                if name in service.speaker_names and not self._is_registered(name):
                    raise ApiError(400, f"'{name}' is a built-in speaker; instruct needs a registered voice")
                return job_for_voice(service, body.tts_text, name, mode=Mode.INSTRUCT2,
                                     instruct=body.instruct_text)
        except ApiError as error:
            raise _call_error(error) from None
        raise CallError(grpc.StatusCode.INVALID_ARGUMENT, "the request sets none of sft_request, "
                        "zero_shot_request, cross_lingual_request, instruct_request")

    def _speaker(self, spk_id: str) -> str:
        if not spk_id:
            raise ApiError(400, "spk_id is required: a built-in speaker or a registered voice")
        if not self._is_registered(spk_id) and spk_id not in self.service.speaker_names:
            known = sorted(info.name for info in self.service.voices.list()) + self.service.speaker_names
            raise CallError(grpc.StatusCode.NOT_FOUND, f"unknown spk_id '{spk_id}'; available: "
                                                       f"{', '.join(known) or 'none registered'}")
        return spk_id

    def _is_registered(self, name: str) -> bool:
        return any(info.name == name for info in self.service.voices.list())

    @staticmethod
    def _prompt_wav(pcm: bytes) -> bytes:
        """Upstream's raw int16 16 kHz prompt as WAV bytes (what the upload path reads)."""
        if not pcm:
            raise ApiError(400, "prompt_audio is empty: send int16 PCM at 16 kHz")
        if len(pcm) % 2:
            raise ApiError(400, f"prompt_audio has {len(pcm)} bytes, not a whole number of int16 samples")
        return wav_header(PROMPT_RATE, len(pcm)) + pcm

    async def _start(self, job: Job):
        try:
            return await self.service.start(job)
        except (ApiError, InputError) as error:
            raise _call_error(error) from None


def _call_error(error: ApiError | InputError) -> CallError:
    if isinstance(error, Overloaded):
        return CallError(grpc.StatusCode.RESOURCE_EXHAUSTED, error.message,
                         error.headers.get("Retry-After"))
    if isinstance(error, InputError):
        return CallError(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    return CallError(STATUS_CODES.get(error.status, grpc.StatusCode.INVALID_ARGUMENT), error.message)


def _text(value) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_grpc_server(service: SpeechService, settings: Settings) -> aio.Server:
    """Starts the gRPC server on the running event loop; raises if the port cannot be bound."""
    limit = settings.max_upload_bytes + 64 * 1024   # the prompt audio and the text around it
    server = aio.server(options=[("grpc.max_receive_message_length", limit),
                                 ("grpc.so_reuseport", 0)])
    cosyvoice_pb2_grpc.add_CosyVoiceServicer_to_server(CosyVoiceServicer(service), server)
    address = grpc_address(settings.host, settings.grpc_port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as error:
        raise RuntimeError(f"the gRPC port {address} cannot be bound ({error})") from None
    if not bound:
        raise RuntimeError(f"the gRPC port {address} cannot be bound (in use?)")
    await server.start()
    log.info("gRPC service cosyvoice.CosyVoice on %s", address)
    return server


async def stop_grpc_server(server: aio.Server) -> None:
    await server.stop(STOP_GRACE_S)
