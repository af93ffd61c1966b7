"""The batched LLM decode step on static shapes, replayed as CUDA graphs on a GPU.

Eager decoding on a GPU is bound by kernel launches: one token of the 24-layer Qwen body is
several hundred small kernels, each waiting on Python. A CUDA graph records them once and
replays them with one launch. A graph needs fixed shapes and fixed addresses, so the step reads
and writes static buffers (one set per batch bucket) and is recorded once per bucket pair:

    batch   padded up to the next bucket (1, 2, 4, 8, ...); padding rows write into the cache's
            scratch slot, which no request owns or reads
    span    attention reads the first 256, 512, 1024, ... cache positions (the next bucket
            above the longest request), masked per row, instead of exactly as many as in use

Prefills keep their variable shapes and run eagerly. On a CPU (and in the tests) the same
static step runs without graphs, so everything but the recording itself is checked there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..models.qwen_slots import SlotKVCache, forward_slots

FIRST_SPAN = 256   # cache positions: about a 5 s prompt and a short sentence

# (inputs [B, 1, H], positions [B, 1], slots [B], length) -> log-probabilities [B, V]
DecodeStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def eager_decode_step(body: nn.Module, log_probs: Callable, cache: SlotKVCache) -> DecodeStep:
    """The step as plain PyTorch, over just the `length` cache positions in use."""
    def step(inputs, positions, slots, length):
        return log_probs(forward_slots(body, inputs, positions, slots, cache, length)[:, 0])
    return step


def doubling_buckets(first: int, last: int) -> list[int]:
    """first, 2 * first, 4 * first, ... up to and including last."""
    buckets = [min(first, last)]
    while buckets[-1] < last:
        buckets.append(min(2 * buckets[-1], last))
    return buckets


def batch_buckets(max_batch: int) -> list[int]:
    return doubling_buckets(1, max_batch)


def span_buckets(max_len: int) -> list[int]:
    return doubling_buckets(FIRST_SPAN, max_len)


@dataclass
class _Buffers:
    inputs: torch.Tensor      # [b, 1, H]
    positions: torch.Tensor   # [b, 1] long
    slots: torch.Tensor       # [b] long


class StaticDecodeStep:
    """A DecodeStep on static buffers; `record()` turns each bucket into a CUDA graph."""

    def __init__(self, body: nn.Module, log_probs: Callable, cache: SlotKVCache, scratch_slot: int,
                 max_batch: int, hidden_size: int):
        self.body, self.log_probs, self.cache = body, log_probs, cache
        self.scratch_slot = scratch_slot
        device, dtype = cache.keys.device, cache.keys.dtype
        self._buffers = {
            size: _Buffers(torch.zeros(size, 1, hidden_size, device=device, dtype=dtype),
                           torch.zeros(size, 1, device=device, dtype=torch.long),
                           torch.full((size,), scratch_slot, device=device, dtype=torch.long))
            for size in batch_buckets(max_batch)}
        self._spans = span_buckets(cache.max_len)
        self._outputs: dict[tuple[int, int], torch.Tensor] = {}   # (batch, span) -> [b, V] of the last run
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}

    def __call__(self, inputs: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 length: int) -> torch.Tensor:
        """As a DecodeStep: `length` (cache positions in use) picks the span bucket."""
        rows = inputs.shape[0]
        size = next(size for size in self._buffers if size >= rows)
        span = next(span for span in self._spans if span >= length)
        buffers = self._buffers[size]
        buffers.inputs[:rows].copy_(inputs)
        buffers.positions[:rows].copy_(positions)
        buffers.slots[:rows].copy_(slots)
        buffers.inputs[rows:].zero_()                  # padding rows: position 0 of the scratch slot
        buffers.positions[rows:].zero_()
        buffers.slots[rows:].fill_(self.scratch_slot)
        graph = self._graphs.get((size, span))
        if graph is not None:
            graph.replay()
        else:
            self._run(size, span)
        return self._outputs[size, span][:rows]        # read before the next step overwrites it

    def _run(self, size: int, span: int) -> None:
        buffers = self._buffers[size]
        hidden = forward_slots(self.body, buffers.inputs, buffers.positions, buffers.slots, self.cache, span)
        self._outputs[size, span] = self.log_probs(hidden[:, 0])

    def record(self) -> None:
        """Records one CUDA graph per (batch, span) bucket, largest first, sharing one memory
        pool. The buffers then hold padding only, so recording touches nothing but the scratch slot."""
        buckets = sorted(((size, span) for size in self._buffers for span in self._spans), reverse=True)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):                  # warm-up off the capture, as CUDA graphs need
            for size, span in buckets:
                self._run(size, span)
        torch.cuda.current_stream().wait_stream(side)
        pool = None
        # The outer context puts this thread back on its own stream even when a capture fails
        # (torch.cuda.graph does not restore it then), so an eager fallback runs in order.
        with torch.cuda.stream(torch.cuda.current_stream()):
            for size, span in buckets:
                graph = torch.cuda.CUDAGraph()
                # thread_local: other threads (the flow, other requests' frontends) may keep
                # using the GPU while this thread records
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    self._run(size, span)
                pool = graph.pool()
                self._graphs[size, span] = graph
