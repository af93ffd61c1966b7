"""Sends benchmark requests and measures each streamed response.

A response counts as audio when it is 200; its body is taken as raw 16-bit mono PCM, so audio
seconds = bytes / (2 * sample rate). The sample rate is --sample-rate, else the response's
X-Sample-Rate header (our server sends it). Anything else (4xx/5xx, a transport failure, a cut
stream) is an error, counted by status and kept with a short sample of its message.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import httpx

from .endpoints import Endpoint, request_options
from .stats import summary

BYTES_PER_SAMPLE = 2      # s16le mono
ERROR_SAMPLES = 3         # error messages kept per level


class BenchSetupError(RuntimeError):
    """The benchmark cannot measure this target as configured (no sample rate, say)."""


@dataclass(frozen=True)
class Outcome:
    status: str                  # "200", "503", or "transport:ReadTimeout"
    total_s: float
    first_byte_s: float | None = None
    audio_s: float = 0.0
    detail: str = ""             # error message sample

    @property
    def ok(self) -> bool:
        return self.status == "200"


async def send(client: httpx.AsyncClient, endpoint: Endpoint, values: dict, uploads: dict[str, bytes],
               sample_rate: int | None) -> Outcome:
    """One request, timed from sending to the last byte."""
    started = time.perf_counter()
    first_byte, received = None, 0
    try:
        async with client.stream(endpoint.method, endpoint.path,
                                 **request_options(endpoint, values, uploads)) as response:
            if response.status_code != 200:
                body = await response.aread()
                return Outcome(str(response.status_code), time.perf_counter() - started,
                               detail=body[:300].decode("utf-8", errors="replace"))
            rate = sample_rate or _header_rate(response)
            async for data in response.aiter_raw():
                if data and first_byte is None:
                    first_byte = time.perf_counter() - started
                received += len(data)
    except httpx.TransportError as error:   # a failed request is a measured error, not a crash
        return Outcome(f"transport:{type(error).__name__}", time.perf_counter() - started,
                       detail=str(error)[:300])
    return Outcome("200", time.perf_counter() - started, first_byte,
                   received / (BYTES_PER_SAMPLE * rate))


def _header_rate(response: httpx.Response) -> int:
    header = response.headers.get("X-Sample-Rate")
    if header is None:
        raise BenchSetupError("the server sends no X-Sample-Rate header: pass --sample-rate")
    return int(header)


async def run_level(concurrency: int, requests: int | None, duration_s: float | None,
                    make_values: Callable[[], dict],
                    send_one: Callable[[dict], Awaitable[Outcome]]) -> dict:
    """`concurrency` clients send back to back until `requests` are sent, or until `duration_s`
    has passed (requests under way then finish and count). Returns the level's summary."""
    outcomes: list[Outcome] = []
    taken = itertools.count()
    started = time.perf_counter()

    def more() -> bool:
        if duration_s is not None:
            return time.perf_counter() - started < duration_s
        return next(taken) < requests

    async def client_loop() -> None:
        while more():
            outcomes.append(await send_one(make_values()))

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return summarize(concurrency, outcomes, time.perf_counter() - started)


def summarize(concurrency: int, outcomes: list[Outcome], wall_s: float) -> dict:
    ok = [o for o in outcomes if o.ok]
    audio = [o for o in ok if o.audio_s > 0]
    errors: dict[str, int] = {}
    for outcome in outcomes:
        if not outcome.ok:
            errors[outcome.status] = errors.get(outcome.status, 0) + 1
    audio_total = sum(o.audio_s for o in ok)
    return {
        "concurrency": concurrency,
        "requests": len(outcomes),
        "ok": len(ok),
        "errors": errors,
        "error_samples": [f"{o.status}: {o.detail}" for o in outcomes if not o.ok][:ERROR_SAMPLES],
        "wall_s": round(wall_s, 3),
        "audio_s_total": round(audio_total, 3),
        "throughput_audio_s_per_s": round(audio_total / wall_s, 4),
        "requests_per_s": round(len(ok) / wall_s, 4),
        "first_chunk_ms": summary([o.first_byte_s * 1000 for o in ok if o.first_byte_s is not None], 1),
        "total_ms": summary([o.total_s * 1000 for o in ok], 1),
        "audio_s": summary([o.audio_s for o in ok]),
        "rtf": summary([o.total_s / o.audio_s for o in audio], 4),
    }
