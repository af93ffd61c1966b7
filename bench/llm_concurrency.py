"""Speech tokens per second of the LLM stage, summed over N requests running at once.

N threads each call `backend.generate` for the same request with a forced token count, started
together. Two rates, both summed over the requests:
  tokens_per_s         every token / wall time, prefills included (what a server sustains)
  decode_tokens_per_s  tokens made while all N requests were decoding (from the last request's
                       first token to the first request's last token) / that window: the
                       steady-state decode rate, without the prefills
With one-request-at-a-time decoding these stay near the concurrency-1 rate; with continuous
batching they should grow with N.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from cosyvoice.inference.synthesis import ModelInput

from .stage_timers import ForcedLength
from .stats import summary

WARMUP_TOKENS = 2


def measure(backend, request: ModelInput, forced: ForcedLength, concurrency: int,
            device: torch.device, seed: int = 0) -> dict:
    """One level: `concurrency` simultaneous requests of `forced.tokens` tokens each."""
    start = threading.Barrier(concurrency + 1)
    started = 0.0

    def one(index: int) -> list[float]:
        generator = torch.Generator(device).manual_seed(seed + index)
        start.wait()
        return [time.perf_counter() - started
                for _ in backend.generate(request.text_ids, request.prompt_text_ids,
                                          request.llm_prompt_tokens, sampling=forced, generator=generator)]

    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(one, index) for index in range(concurrency)]
        started = time.perf_counter()
        start.wait()
        arrivals = [future.result() for future in futures]   # re-raises a failed request's error
    counts = [len(times) for times in arrivals]
    forced.check(counts)
    wall = max(times[-1] for times in arrivals)
    return {"concurrency": concurrency, "wall_s": round(wall, 3), "tokens_total": sum(counts),
            "tokens_per_s": round(sum(counts) / wall, 2),
            "decode_tokens_per_s": steady_decode_rate(arrivals),
            "first_token_ms": summary([times[0] * 1000 for times in arrivals], 1)}


def steady_decode_rate(arrivals: list[list[float]]) -> float | None:
    """Tokens per second, summed, while every request was decoding; None if they never overlapped."""
    begin = max(times[0] for times in arrivals)
    end = min(times[-1] for times in arrivals)
    if end <= begin:
        return None
    made = sum(1 for times in arrivals for t in times if begin < t <= end)
    return round(made / (end - begin), 2)


def compare(backends: dict, request: ModelInput, forced: ForcedLength, levels: list[int],
            device: torch.device) -> dict:
    """Every backend at every level (levels outer, so backends are compared under the same machine
    load), plus each backend's scaling (highest level / lowest) of both rates."""
    warm_up = ForcedLength(forced.sample, WARMUP_TOKENS, forced.speech_token_size)
    for backend in backends.values():   # first-use costs (the batched KV cache allocation) go here
        measure(backend, request, warm_up, 1, device)
    results: dict[str, list[dict]] = {name: [] for name in backends}
    for level in levels:
        for name, backend in backends.items():
            results[name].append(measure(backend, request, forced, level, device))
    return {"tokens_per_request": forced.tokens, "levels": levels, "backends": results,
            "scaling": {name: _ratio(rows, "tokens_per_s") for name, rows in results.items()},
            "decode_scaling": {name: _ratio(rows, "decode_tokens_per_s") for name, rows in results.items()}}


def _ratio(rows: list[dict], key: str) -> float | None:
    low, high = rows[0][key], rows[-1][key]
    return round(high / low, 2) if low and high else None
