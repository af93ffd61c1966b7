"""WebSocket /v1/audio/speech/stream: text in as it is written, audio out as it is made.

    client -> server (JSON text messages)
      {"type": "start", "voice": "alice", "format": "pcm", "sample_rate": 24000, "mode": null,
       "instructions": null, "speed": 1.0, "seed": null, "api_key": null}      first, once
      {"type": "text", "text": "Hello th"}            append text, any size of piece
      {"type": "flush", "text": ""}                   cut what is buffered now, mid-sentence or not
      {"type": "end", "text": ""}                     no more text: speak the rest, then finish
      {"type": "cancel"}                              stop now, mid-word; the session finishes
    server -> client
      {"type": "session.started", "sample_rate", "format", "voice", "mode", "generation"}
      {"type": "segment.started", "index", "text", "start_s"}   before the segment's audio
      binary frames: the audio, one stream in the chosen format across all segments
      {"type": "segment.done", "index", "end_s", "first_chunk_ms"}
      {"type": "session.done", "segments", "audio_s", "first_audio_ms", "total_ms", "cancelled"}
      {"type": "error", "status", "message"[, "retry_after_s"]}   then the socket closes

The session closes with 1000 after session.done, with 4000 + the HTTP status an error would have
over HTTP (4400 bad message or option, 4401 API key, 4503 busy or loading), or 1011 on a server
fault. The text is cut into segments as cosyvoice.server.text_stream describes, none longer than
--max-text-chars; each segment is admitted like one HTTP request (a worker is held only while a
segment is being generated). A session may speak any amount of text, but no more than
BACKLOG_SEGMENTS × --max-text-chars characters may wait uncut (a client far ahead of the speech).
Closing the socket cancels the session. The API key, when the server has one, comes as an
`Authorization: Bearer` or `X-API-Key` header, or for browsers (which cannot set WebSocket
headers) as `api_key` in the start message.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from contextlib import aclosing
from dataclasses import replace

import numpy as np
import soxr
from fastapi import APIRouter, WebSocket
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected

from ...errors import InputError
from ..audio_encoding import check_format, check_rate, stream_encoder
from ..calls import api_key_error, record_call
from ..errors import ApiError, Overloaded
from ..modes import Job, Mode
from ..schemas import StreamMessage, StreamStart
from ..service import SpeechService
from ..speech import MAX_SEED, CONTROL_CHARACTERS, check_speed, job_for_voice
from ..synthesis import StartedSynthesis
from ..text_stream import TextCutter, count_words

log = logging.getLogger("cosyvoice.server")
router = APIRouter(tags=["streaming"])

PATH = "/v1/audio/speech/stream"
START_TIMEOUT_S = 30            # for the start message
BACKLOG_SEGMENTS = 16           # text not yet cut into segments: at most this many longest requests
MIN_RATE, MAX_RATE = 8000, 48000
CLOSE_NORMAL, CLOSE_SERVER_FAULT, CLOSE_ERROR_BASE = 1000, 1011, 4000
CLIENT_GONE = 499               # nginx's status for a client that left, as the HTTP access log has it
PROBE_TEXT = "probe"            # checks the voice options when the session starts (nothing is spoken)
LONE_SURROGATE = re.compile("[\ud800-\udfff]")   # valid as a JSON escape, but not as text


class AudioOut:
    """float32 chunks at the model's rate -> bytes of the session's format at its rate."""

    def __init__(self, fmt: str, model_rate: int, rate: int):
        self.rate = rate
        self.samples = 0
        self._resampler = soxr.ResampleStream(model_rate, rate, 1, dtype="float32") \
            if rate != model_rate else None
        self._encoder = stream_encoder(fmt, rate)

    @property
    def seconds(self) -> float:
        return round(self.samples / self.rate, 3)

    def write(self, chunk: np.ndarray) -> bytes:
        if self._resampler is not None:
            chunk = self._resampler.resample_chunk(chunk)
        self.samples += len(chunk)
        return self._encoder.write(chunk) if len(chunk) else b""

    def close(self) -> bytes:
        tail = b""
        if self._resampler is not None:
            last = self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
            self.samples += len(last)
            tail = self._encoder.write(last) if len(last) else b""
        return tail + self._encoder.close()


class StreamSession:
    """One WebSocket session. Two tasks: `_read_messages` takes the client's messages into the
    text cutter and flags, `_speak` cuts segments and streams their audio; only `_speak` (and
    run) sends."""

    def __init__(self, websocket: WebSocket, service: SpeechService):
        self.ws = websocket
        self.service = service
        self.settings = service.settings
        self.cutter = TextCutter(max_chars=service.settings.max_text_chars)
        self.template: Job | None = None       # the start options as a job; segments replace its text
        self.audio: AudioOut | None = None
        self.text_chars = 0
        self.segments = 0
        self.cancelled = False
        self.gone = False                       # the client closed the socket
        self.failure: ApiError | None = None    # a bad message, seen by the reader
        self.current: StartedSynthesis | None = None
        self.started = time.perf_counter()
        self.first_text_at: float | None = None
        self.first_audio_at: float | None = None
        self.audio_bytes = 0
        self._wake = asyncio.Event()

    # ---- the session -------------------------------------------------------------------------

    async def run(self) -> None:
        status, outcome = 200, "complete"
        try:
            await self.ws.accept()
            start = await self._open()
            await self._send_event({"type": "session.started", "sample_rate": self.audio.rate,
                                    "format": start.format, "voice": self._voice_name(start),
                                    "mode": self.template.mode.value,
                                    "generation": self.service.generation})
            await self._converse()
            if self.gone:
                status, outcome = CLIENT_GONE, "client closed the socket"
            else:
                await self._finish()
                outcome = "cancelled" if self.cancelled else "complete"
        except (ApiError, InputError) as error:
            status = error.status if isinstance(error, ApiError) else 400
            outcome = "error"
            await self._fail(status, error)
        except (WebSocketDisconnect, WebSocketDisconnected, OSError):
            status, outcome = CLIENT_GONE, "client closed the socket"
        except Exception as error:
            log.exception("streaming session failed")
            status, outcome = 500, f"aborted ({type(error).__name__})"
            await self._fail(500, ApiError(500, f"internal error ({type(error).__name__}); see the "
                                                "server log"))
        finally:
            self._stop_current()
            self._record(status, outcome)

    async def _open(self) -> StreamStart:
        """Checks the key, readiness and the start message; builds the segment template."""
        headers = self.ws.headers
        header_problem = api_key_error(self.settings.api_key, headers.get("authorization", ""),
                                       headers.get("x-api-key", ""))
        has_header_key = bool(headers.get("authorization") or headers.get("x-api-key"))
        if header_problem and has_header_key:
            raise ApiError(401, header_problem)
        self.service.check_ready()
        try:
            message = await asyncio.wait_for(self.ws.receive(), START_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ApiError(408, f"no start message within {START_TIMEOUT_S} s") from None
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        data = self._json_of(message)
        if not isinstance(data, dict) or data.get("type") != "start":
            kind = f"type '{data.get('type')}'" if isinstance(data, dict) else type(data).__name__
            raise ApiError(400, 'the first message must be {"type": "start", ...} with the session\'s '
                                f"options; got {kind}")
        try:
            start = StreamStart.model_validate(data)
        except ValidationError as error:
            raise ApiError(400, "bad start message: " + describe(error)) from None
        if header_problem:
            problem = api_key_error(self.settings.api_key, x_api_key=start.api_key or "")
            if problem:
                raise ApiError(401, problem)
        self.template = self._template(start)
        rate = start.sample_rate or self.service.sample_rate
        if not MIN_RATE <= rate <= MAX_RATE:
            raise ApiError(400, f"sample_rate must be between {MIN_RATE} and {MAX_RATE} Hz, not {rate}")
        check_rate(check_format(start.format), rate)
        self.audio = AudioOut(start.format, self.service.sample_rate, rate)
        return start

    def _template(self, start: StreamStart) -> Job:
        """The start options as a job (voice resolved once, for the whole session)."""
        mode = None
        if start.mode is not None:
            try:
                mode = Mode(start.mode)
            except ValueError:
                raise ApiError(400, f"unknown mode '{start.mode}'; choose one of "
                                    f"{', '.join(m.value for m in Mode)}") from None
        builtin = start.voice in self.service.speaker_names and \
            start.voice not in {info.name for info in self.service.voices.list()}
        if mode is Mode.SFT:
            if not builtin:
                raise ApiError(400, "sft speaks as a built-in speaker of the model; name one as the voice "
                                    f"(available: {', '.join(self.service.speaker_names) or 'none'})")
            mode = None
        instruct = start.instructions or ""
        if mode is Mode.INSTRUCT2 and not instruct.strip():
            raise ApiError(400, "instruct2 needs instructions")
        check_speed(start.speed)
        job = job_for_voice(self.service, PROBE_TEXT, start.voice, instruct=instruct, mode=mode,
                            speed=start.speed, seed=start.seed, stream=True)
        if job.mode is Mode.ZERO_SHOT and job.voice.prompt_text_ids.shape[1] == 0:
            raise ApiError(400, f"zero_shot needs a voice with a transcript; '{start.voice}' has none "
                                "(use cross_lingual)")
        return replace(job, cache_key=None)   # live segments are not cached (see README)

    def _voice_name(self, start: StreamStart) -> str:
        if self.template.mode is Mode.SFT:
            return self.template.speaker
        return self.service.voices.resolve(start.voice).info.name

    async def _converse(self) -> None:
        reader = asyncio.create_task(self._read_messages())
        try:
            await self._speak()
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        if self.failure is not None:
            raise self.failure

    async def _finish(self) -> None:
        if not self.cancelled:
            tail = self.audio.close()
            if tail:
                await self._send_audio(tail)
        first_audio_ms = None
        if self.first_audio_at is not None and self.first_text_at is not None:
            first_audio_ms = round((self.first_audio_at - self.first_text_at) * 1000, 1)
        await self._send_event({"type": "session.done", "segments": self.segments,
                                "audio_s": self.audio.seconds, "first_audio_ms": first_audio_ms,
                                "total_ms": round((time.perf_counter() - self.started) * 1000, 1),
                                "cancelled": self.cancelled})
        await self.ws.close(CLOSE_NORMAL)

    async def _fail(self, status: int, error: Exception) -> None:
        """Tells the client what went wrong and closes with 4000 + status (1011 for a fault)."""
        event = {"type": "error", "status": status, "message": getattr(error, "message", str(error))}
        retry_after = getattr(error, "headers", {}).get("Retry-After")
        if retry_after:
            event["retry_after_s"] = int(retry_after)
        try:
            await self._send_event(event)
            await self.ws.close(CLOSE_SERVER_FAULT if status >= 500 and status != 503
                                else CLOSE_ERROR_BASE + status)
        except (WebSocketDisconnect, WebSocketDisconnected, RuntimeError, OSError):
            pass   # the client is gone already

    # ---- reading -----------------------------------------------------------------------------

    async def _read_messages(self) -> None:
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    self.gone = True
                    self._stop_current()
                    return
                self._handle(self._json_of(message))
                self._wake.set()
        except ApiError as error:
            self.failure = error
            self._stop_current()
        except (WebSocketDisconnect, WebSocketDisconnected):
            self.gone = True
            self._stop_current()
        except Exception as error:   # a bug: end the session as a server fault
            log.exception("reading a streaming session's messages failed")
            self.failure = ApiError(500, f"internal error ({type(error).__name__}); see the server log")
            self._stop_current()
        finally:
            self._wake.set()

    def _handle(self, data) -> None:
        if isinstance(data, dict) and data.get("type") == "start":
            raise ApiError(400, "the session has started already; send text, flush, end or cancel")
        try:
            message = StreamMessage.model_validate(data)
        except ValidationError as error:
            raise ApiError(400, "bad message: " + describe(error)) from None
        if message.type == "cancel":
            self.cancelled = True
            self._stop_current()
            return
        if self.cutter.ended:
            raise ApiError(400, f"'{message.type}' after end: the session takes no more text")
        if message.text:
            self._append(message.text)
        if message.type == "flush":
            self.cutter.flush()
        elif message.type == "end":
            self.cutter.end()

    def _append(self, text: str) -> None:
        if CONTROL_CHARACTERS.search(text):
            raise ApiError(400, "the text contains control characters; send plain UTF-8 text")
        if LONE_SURROGATE.search(text):
            raise ApiError(400, "the text is not valid Unicode (it holds a lone UTF-16 surrogate such "
                                "as \\ud800); send text that can be encoded as UTF-8")
        waiting = len(self.cutter.pending) + len(text)
        limit = self.settings.max_text_chars * BACKLOG_SEGMENTS
        if waiting > limit:
            raise ApiError(400, f"{waiting} characters of the session's text are waiting to be spoken; "
                                f"at most {limit} may wait ({BACKLOG_SEGMENTS} × max_text_chars): send "
                                "text about as fast as it is spoken")
        self.text_chars += len(text)
        self.cutter.feed(text)
        if self.first_text_at is None and count_words(text) > 0:
            self.first_text_at = time.perf_counter()

    @staticmethod
    def _json_of(message) -> object:
        if message.get("text") is None:
            raise ApiError(400, "binary frames are not accepted; send JSON text messages")
        try:
            return json.loads(message["text"])
        except ValueError as error:
            raise ApiError(400, f"a message is not valid JSON ({error})") from None

    # ---- speaking ----------------------------------------------------------------------------

    async def _speak(self) -> None:
        while True:
            self._wake.clear()
            if self.failure is not None or self.cancelled or self.gone:
                return
            segment = self.cutter.take()
            if segment is None:
                if self.cutter.ended:
                    return
                await self._wake.wait()
                continue
            if count_words(segment) > 0:   # punctuation alone: nothing to say
                await self._speak_segment(segment)

    async def _speak_segment(self, text: str) -> None:
        index = self.segments
        self.segments += 1
        seed = self.template.seed
        job = replace(self.template, text=text,
                      seed=None if seed is None else (seed + index) % (MAX_SEED + 1))
        cut_at = time.perf_counter()
        try:
            synthesis = await self.service.start(job, self._left)
        except ApiError as error:
            if error.status == CLIENT_GONE:   # cancelled, or the client left, while queued
                return
            raise
        self.current = synthesis
        first_chunk_ms = round((time.perf_counter() - cut_at) * 1000, 1)
        try:
            if self._stopping:
                return
            await self._send_event({"type": "segment.started", "index": index, "text": text,
                                    "start_s": self.audio.seconds})
            async with aclosing(synthesis.chunks()) as chunks:
                async for chunk in chunks:
                    if self._stopping:
                        return
                    data = self.audio.write(chunk)
                    if data:
                        await self._send_audio(data)
            if getattr(synthesis, "interrupted", False):   # the server is stopping
                raise Overloaded("the server is shutting down; try again shortly",
                                 self.settings.retry_after_s)
            if not self._stopping:
                await self._send_event({"type": "segment.done", "index": index,
                                        "end_s": self.audio.seconds, "first_chunk_ms": first_chunk_ms})
        finally:
            synthesis.close()
            self.current = None

    async def _left(self) -> bool:
        """Whether a segment waiting for a worker is no longer wanted."""
        return self._stopping

    @property
    def _stopping(self) -> bool:
        return self.cancelled or self.gone or self.failure is not None

    def _stop_current(self) -> None:
        """Stops the segment being generated (within one chunk), from either task."""
        if self.current is not None:
            self.current.close()

    # ---- sending -----------------------------------------------------------------------------

    async def _send_event(self, event: dict) -> None:
        text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        # a lone surrogate echoed from the client (a voice name) is sent as its JSON escape
        await self.ws.send_text(text.encode("utf-8", "backslashreplace").decode("utf-8"))

    async def _send_audio(self, data: bytes) -> None:
        await self.ws.send_bytes(data)
        self.audio_bytes += len(data)
        if self.first_audio_at is None:
            self.first_audio_at = time.perf_counter()
            if self.first_text_at is not None:
                self.service.metrics.stream_first_audio.observe(self.first_audio_at - self.first_text_at)

    def _record(self, status: int, outcome: str) -> None:
        client = self.ws.client
        record_call(self.service.metrics, "WEBSOCKET", PATH, status, status >= 400 and status != CLIENT_GONE,
                    self.started, f"{client.host}:{client.port}" if client else None, outcome,
                    bytes=self.audio_bytes, segments=self.segments, text_chars=self.text_chars)


def describe(error: ValidationError) -> str:
    """pydantic's errors as one sentence naming each field."""
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item.get("loc", ())) or "message"
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "; ".join(parts)


@router.websocket(PATH)
async def speech_stream(websocket: WebSocket) -> None:
    await StreamSession(websocket, websocket.app.state.service).run()
