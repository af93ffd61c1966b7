"""Mel frames per second of the flow stage, summed over N requests rendering at once.

N threads each run the flow for the same request (its prompt plus `tokens` speech tokens, the
final full-attention call), started together, once with each decoder:
  batched      cosyvoice.concurrency.flow_batching.BatchedFlowDecoder: overlapping calls run as one batch
  per-request  the flow's own decoder, called from every thread at once
Rates count the new frames only (the prompt's frames are recomputed but not output).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from cosyvoice.concurrency.flow_batching import BatchedFlowDecoder
from cosyvoice.inference.synthesis import ModelInput

from .stage_timers import synchronize


def measure(flow, decoder, request: ModelInput, tokens: torch.Tensor, concurrency: int,
            device: torch.device) -> dict:
    """One level: `concurrency` simultaneous flow calls over `tokens` [1, N]."""
    start = threading.Barrier(concurrency + 1)

    def one(_index: int) -> int:
        start.wait()
        mel = flow.inference(tokens.to(device), request.flow_prompt_tokens.to(device),
                             request.prompt_feat.to(device), request.embedding.to(device),
                             streaming=False, finalize=True, decoder=decoder)
        synchronize(device)
        return int(mel.shape[2])

    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(one, index) for index in range(concurrency)]
        start.wait()
        started = time.perf_counter()
        frames = sum(future.result() for future in futures)
        wall = time.perf_counter() - started
    return {"concurrency": concurrency, "wall_s": round(wall, 3), "mel_frames_total": frames,
            "mel_frames_per_s": round(frames / wall, 1)}


def compare(flow, request: ModelInput, n_tokens: int, levels: list[int], device: torch.device,
            speech_token_size: int) -> dict:
    """Both decoders at every level (levels outer, so both see the same machine load), plus each
    one's scaling (highest level / lowest) and batched / per-request at every level."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, speech_token_size, (1, n_tokens), generator=generator, dtype=torch.int32)
    decoders = {"batched": BatchedFlowDecoder(flow.decoder, max_batch=max(levels)),
                "per-request": flow.decoder}
    for decoder in decoders.values():   # first-use costs (thread start, allocations) go here
        measure(flow, decoder, request, tokens[:, :4], 1, device)
    results: dict[str, list[dict]] = {name: [] for name in decoders}
    for level in levels:
        for name, decoder in decoders.items():
            results[name].append(measure(flow, decoder, request, tokens, level, device))
    rate = "mel_frames_per_s"
    return {"tokens_per_request": n_tokens, "levels": levels, "decoders": results,
            "scaling": {name: round(rows[-1][rate] / rows[0][rate], 2) for name, rows in results.items()},
            "batched_over_per_request": [round(b[rate] / p[rate], 2)
                                         for b, p in zip(results["batched"], results["per-request"])]}
