"""Scheduling and batching of the flow decoder across concurrent requests.

The flow decoder (conditional flow matching: ten estimator passes over the request and its
unconditioned copy) is most of the flow's cost, and one request's pass over a few hundred mel
frames leaves a GPU mostly idle. So concurrent requests' decoder calls are run as one batch:

    callers (synthesis threads)          worker thread (owns the decoder)
    decode(mu, mask, spks, cond) ──►     takes the waiting calls (up to max_batch) in order:
          ... blocks ...                 streaming chunks first, then the rest as they came;
                                         right-pads them to the longest, integrates once,
    ◄── that call's own frames           hands each caller its own frames back

Streaming chunks go first because a listener is waiting for them: a new stream's first audio, or
the next piece of one already playing. A final call waits behind them; among final calls, and
among chunks, the earlier caller goes first, so no request waits behind later ones. On a CPU
(max_batch 1) the worker runs one call at a time: the decoder is compute-bound there, so calls
running side by side on their own threads gave no more frames per second, and those threads took
the CPU time the LLM's scheduler thread needed to reach the streams' first chunks.

A call that finds nothing else waiting runs alone and unpadded, exactly as the plain decoder.
In a batch, padding never reaches a real frame (causal convolutions, attention masked per row),
so each request's mel equals its solo run up to float rounding. Streaming chunks (chunk
attention) and final calls (full attention) share a batch; each row keeps its own mask. A
streaming chunk that carries its request's state from the earlier chunks (a `DecoderCarry`)
brings only its new frames; in a batch with one, every row attends to its own held keys
(padded to the longest) and its new ones.
"""
from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..models.flow.carry import DecoderCarry


@dataclass(eq=False)   # compared by identity (it holds tensors)
class _Call:
    """One caller's decoder call; `priority` orders the waiting calls, lowest first."""
    mu: Tensor          # [1, 80, T]
    spks: Tensor        # [1, 80]
    cond: Tensor        # [1, 80, T]
    n_timesteps: int
    streaming: bool
    carry: DecoderCarry | None = None
    order: int = 0      # when it came, among all calls
    done: threading.Event = field(default_factory=threading.Event)
    result: Tensor | BaseException | None = None   # mel [1, 80, T], or the error to raise

    @property
    def priority(self) -> tuple[int, int]:
        return (0 if self.streaming else 1), self.order


class BatchedFlowDecoder:
    """Called like the flow's decoder, from many threads; runs the calls in priority order and
    batches the ones that overlap (up to max_batch; 1: one call at a time)."""

    def __init__(self, decoder: nn.Module, max_batch: int = 8):
        self.decoder = decoder
        self.max_batch = max_batch
        self._waiting: queue.PriorityQueue[tuple[tuple[int, int], _Call]] = queue.PriorityQueue()
        self._arrivals = itertools.count()             # one next() is atomic under the GIL
        self.batch_sizes = [0] * (max_batch + 1)     # [n]: decoder runs that served n calls
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def __call__(self, mu: Tensor, mask: Tensor, spks: Tensor, cond: Tensor, n_timesteps: int = 10,
                 streaming: bool = False, carry: DecoderCarry | None = None) -> Tensor:
        """mu, cond [1, 80, T]; mask [1, 1, T] (all ones); spks [1, 80] -> mel [1, 80, T] float32."""
        call = _Call(mu, spks, cond, n_timesteps, streaming, carry, order=next(self._arrivals))
        self._ensure_running()
        self._waiting.put((call.priority, call))
        call.done.wait()
        if isinstance(call.result, BaseException):
            raise call.result
        return call.result

    def _ensure_running(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="flow-batcher", daemon=True)
                self._thread.start()

    # ---- worker thread -----------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                waiting = [self._waiting.get()[1]]
                while len(waiting) < self.max_batch:
                    try:
                        waiting.append(self._waiting.get_nowait()[1])
                    except queue.Empty:
                        break
                by_steps: dict[int, list[_Call]] = {}    # one integration grid per batch
                for call in waiting:
                    by_steps.setdefault(call.n_timesteps, []).append(call)
                for batch in by_steps.values():
                    self._serve(batch)

    def _serve(self, batch: list[_Call]) -> None:
        self.batch_sizes[len(batch)] += 1
        try:
            mels = self._decode(batch)
        except Exception as error:   # each caller re-raises it; the worker carries on
            mels = [error] * len(batch)
        for call, mel in zip(batch, mels):
            call.result = mel
            call.done.set()

    def _decode(self, batch: list[_Call]) -> list[Tensor]:
        if len(batch) == 1:
            call = batch[0]
            mask = torch.ones_like(call.mu[:, :1])
            carried = {} if call.carry is None else {"carry": call.carry}
            return [self.decoder(call.mu, mask, call.spks, call.cond, n_timesteps=call.n_timesteps,
                                 streaming=call.streaming, **carried)]
        lengths = [call.mu.shape[2] for call in batch]
        mu, cond = self._pad([c.mu for c in batch]), self._pad([c.cond for c in batch])   # [B, 80, T]
        frame = torch.arange(mu.shape[2], device=mu.device)
        mask = (frame[None, :] < torch.tensor(lengths, device=mu.device)[:, None])[:, None].to(mu.dtype)
        spks = torch.cat([c.spks for c in batch])                                          # [B, 80]
        streaming = torch.tensor([c.streaming for c in batch], device=mu.device)           # [B]
        carries = [c.carry for c in batch]
        carried = {"carry": carries} if any(c is not None for c in carries) else {}
        mel = self.decoder(mu, mask, spks, cond, n_timesteps=batch[0].n_timesteps,
                           streaming=streaming, **carried)                                 # [B, 80, T]
        return [mel[row:row + 1, :, :length] for row, length in enumerate(lengths)]

    @staticmethod
    def _pad(rows: list[Tensor]) -> Tensor:
        """[1, C, T_i] each -> [B, C, max T_i], zero on the right."""
        longest = max(row.shape[2] for row in rows)
        return torch.cat([nn.functional.pad(row, (0, longest - row.shape[2])) for row in rows])
