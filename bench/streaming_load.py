"""Streaming synthesis under concurrency, in-process: what a server's clients would see, without HTTP.

`concurrency` client threads each run streaming syntheses back to back through one loaded model
(its batched LLM and flow batcher shared, as in the server), every request exactly `tokens` speech
tokens long (bench.stage_timers.ForcedLength). Per level:
  first_chunk_ms   call to first audio chunk, per request (p50, p95, ...)
  total_ms         call to last chunk
  x_realtime       audio seconds made per wall second, summed over the clients (the aggregate
                   speed; aggregate_rtf is its inverse)
HTTP, encoding and the text frontend are left out (bench.load measures a running server).
"""
from __future__ import annotations

import math
import resource
import threading
import time

import numpy as np
import torch

from cosyvoice.concurrency.llm_scheduler import BatchedLLM
from cosyvoice.inference.synthesis import ModelInput

from .stage_timers import ForcedLength
from .stats import summary

PERCENTILES = (50, 95)


def percentiles(values: list[float], digits: int = 2) -> dict:
    """{"n", "mean", "min", "max", "p50", "p95"}; statistics None without values."""
    return summary(values, digits, PERCENTILES)


def speech_lm(tts):
    """The SpeechLM of a loaded model, also when a BatchedLLM wraps it."""
    llm = tts.synthesizer.llm
    return llm.llm if isinstance(llm, BatchedLLM) else llm


def measure_level(tts, request: ModelInput, tokens: int, concurrency: int, requests_per_client: int,
                  seed: int = 0) -> dict:
    """`concurrency` clients, each `requests_per_client` streaming requests back to back."""
    llm = speech_lm(tts)
    forced = ForcedLength(llm.sampling, tokens, llm.speech_token_size)
    start = threading.Barrier(concurrency + 1)
    results: list[list[dict]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            start.wait()
            for round_ in range(requests_per_client):
                generator = torch.Generator(tts.device).manual_seed(seed + index * requests_per_client + round_)
                sent = time.perf_counter()
                first, samples, chunks, bad = None, 0, 0, 0
                for chunk in tts.synthesizer.synthesize(request, stream=True, generator=generator,
                                                        sampling=forced):
                    if first is None:
                        first = time.perf_counter() - sent
                    samples += len(chunk)
                    chunks += 1
                    bad += int(not np.isfinite(chunk).all())
                total = time.perf_counter() - sent
                audio_s = samples / tts.sample_rate
                results[index].append({"first_chunk_s": first, "total_s": total, "audio_s": audio_s,
                                       "chunks": chunks, "nonfinite_chunks": bad})
        except BaseException as error:   # re-raised by the caller
            errors.append(error)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    if errors:
        raise errors[0]
    done = [r for rows in results for r in rows]
    audio_total = sum(r["audio_s"] for r in done)
    return {"concurrency": concurrency, "requests": len(done), "tokens_per_request": tokens,
            "wall_s": round(wall, 3), "audio_s_total": round(audio_total, 3),
            "x_realtime": round(audio_total / wall, 2) if wall > 0 else None,
            "aggregate_rtf": round(wall / audio_total, 4) if audio_total > 0 else None,
            "first_chunk_ms": percentiles([r["first_chunk_s"] * 1000 for r in done if r["first_chunk_s"] is not None]),
            "total_ms": percentiles([r["total_s"] * 1000 for r in done]),
            "rtf_per_request": percentiles([r["total_s"] / r["audio_s"] for r in done if r["audio_s"] > 0], 4),
            "chunks_per_request": percentiles([r["chunks"] for r in done], 1),
            "nonfinite_chunks": sum(r["nonfinite_chunks"] for r in done)}


def sweep(tts, request: ModelInput, tokens: int, levels: list[int], min_requests: int, seed: int = 0,
          deadline: float | None = None) -> list[dict]:
    """Every level with at least `min_requests` requests (each client sends ceil(min / level));
    levels not started by `deadline` (time.monotonic()) are left out."""
    rows = []
    for level in levels:
        if deadline is not None and time.monotonic() > deadline:
            break
        rows.append(measure_level(tts, request, tokens, level, max(1, math.ceil(min_requests / level)), seed))
    return rows


def memory(device: torch.device) -> dict:
    """Memory now and at its peak since the last reset_peak, in GiB. GPU: the caching allocator's
    counters of this process (tensors: allocated; held from the driver: reserved) and the device's
    use by every process (in_use)."""
    if device.type == "cuda":
        gib = 2 ** 30
        free, total = torch.cuda.mem_get_info(device)
        return {"allocated_gib": round(torch.cuda.memory_allocated(device) / gib, 3),
                "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / gib, 3),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / gib, 3),
                "in_use_gib": round((total - free) / gib, 3), "total_gib": round(total / gib, 2)}
    # CPU: the process's peak resident set (never reset), for the dry run's report only
    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 3)}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
