"""A started synthesis -> an HTTP response in the asked audio format, streamed or whole.

A whole response carries exact lengths in its header (and Content-Length). A streamed one is sent
as it is made, except FLAC (see audio_encoding.streamable), which comes whole. When the server is
stopping, a stream ends cleanly after the current chunk and a whole response becomes a 503.
"""
from __future__ import annotations

import numpy as np
from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from .audio_encoding import MEDIA_TYPES, encode_whole, stream_encoder, streamable
from .errors import Overloaded
from .synthesis import StartedSynthesis

CLIENT_CLOSED_REQUEST = 499   # nginx's status for a client that left before the answer


def audio_headers(fmt: str, sample_rate: int, from_cache: bool) -> dict[str, str]:
    headers = {"X-Sample-Rate": str(sample_rate), "X-Audio-Format": fmt, "X-Channels": "1",
               "X-Cache": "hit" if from_cache else "miss"}
    if fmt == "pcm":
        headers["X-Sample-Format"] = "s16le"
    return headers


async def audio_response(request: Request, synthesis: StartedSynthesis, fmt: str, sample_rate: int,
                         stream: bool) -> Response:
    headers = audio_headers(fmt, sample_rate, synthesis.from_cache)
    if stream and streamable(fmt):
        # close() also runs as a background task: the body may be abandoned before it starts
        return StreamingResponse(encoded_chunks(request, synthesis, fmt, sample_rate),
                                 media_type=MEDIA_TYPES[fmt], headers=headers,
                                 background=BackgroundTask(synthesis.close))
    audio = await collect(request, synthesis)
    if audio is None:
        if synthesis.interrupted:
            raise Overloaded("the server is shutting down; try again shortly",
                             request.app.state.settings.retry_after_s)
        # nobody will read it, so skip the encoding; 499 as the access log counts a hang-up
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    # mp3 or opus of a long text takes seconds: off the event loop, other requests keep going
    body = await run_in_threadpool(encode_whole, fmt, audio, sample_rate)
    return Response(body, media_type=MEDIA_TYPES[fmt], headers=headers)


async def collect(request: Request, synthesis: StartedSynthesis) -> np.ndarray | None:
    """Every chunk, concatenated; None if the client left before the end (it stops there)."""
    chunks = []
    try:
        async for chunk in synthesis.chunks():
            chunks.append(chunk)
            if await request.is_disconnected():
                break
    finally:
        synthesis.close()
    if not synthesis.completed:
        return None
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)


async def encoded_chunks(request: Request, synthesis: StartedSynthesis, fmt: str, sample_rate: int):
    """The synthesis's audio encoded in `fmt`, piece by piece as it is made (a format that cannot
    be streamed comes as one piece at the end)."""
    if not streamable(fmt):
        audio = await collect(request, synthesis)
        if audio is not None:
            yield await run_in_threadpool(encode_whole, fmt, audio, sample_rate)
        return
    encoder = stream_encoder(fmt, sample_rate)
    try:
        async for chunk in synthesis.chunks():
            data = encoder.write(chunk)
            if data:
                yield data
            if await request.is_disconnected():
                return
        tail = encoder.close()
        if tail:
            yield tail
    finally:
        synthesis.close()
