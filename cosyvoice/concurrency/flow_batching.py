"""Scheduling and batching of the flow decoder across concurrent requests.

The flow decoder (conditional flow matching: ten estimator passes over the request and its
unconditioned copy) is most of the flow's cost, and one request's pass over a few hundred mel
frames leaves a GPU mostly idle. So concurrent requests' decoder calls are run as one batch:

    callers (synthesis threads)          worker thread (owns the decoder)
    decode(mu, mask, spks, cond) ──►     takes the waiting calls (up to max_batch) in order:
          ... blocks ...                 streaming chunks first, then the rest as they came;
                                         right-pads them to the longest, integrates them
    ◄── that call's own frames           step by step, hands each caller its own frames back

Streaming chunks go first because a listener is waiting for them: a new stream's first audio, or
the next piece of one already playing. The decoder runs one Euler step at a time
(CausalConditionalCFM.steps), so a chunk that arrives while final calls are part-way through
their integration starts after the current step, and the final calls go on once it is done.
Final calls do not overtake each other: among them, and among chunks, the earlier caller goes
first, so no request waits behind later ones. On a CPU (max_batch 1) the worker runs one call at
a time: the decoder is compute-bound there, so calls running side by side on their own threads
gave no more frames per second, and those threads took the CPU time the LLM's scheduler thread
needed to reach the streams' first chunks.

A call that finds nothing else waiting runs alone and unpadded, exactly as the plain decoder.
In a batch, padding never reaches a real frame (causal convolutions, attention masked per row),
so each request's mel equals its solo run up to float rounding. Streaming chunks (chunk
attention) and final calls (full attention) share a batch; each row keeps its own mask. A
streaming chunk that carries its request's state from the earlier chunks (a `DecoderCarry`)
brings only its new frames; in a batch with one, every row attends to its own held keys
(padded to the longest) and its new ones.
"""
from __future__ import annotations

import heapq
import itertools
import threading
from dataclasses import dataclass, field
from typing import Generator

import torch
from torch import Tensor, nn

from ..models.flow.carry import DecoderCarry
from ..models.flow.cfm import run_to_end


@dataclass(eq=False)   # compared by identity (it holds tensors)
class FlowCall:
    """One caller's decoder call (what BatchedFlowDecoder queues); `priority` orders the waiting
    calls, lowest first."""
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


@dataclass(eq=False)
class _Batch:
    """Calls being integrated together; `steps` advances them one Euler step per next()."""
    calls: list[FlowCall]
    steps: Generator[None, None, list[Tensor]]
    urgency: int        # 0: it holds a streaming chunk; 1: final calls only


class BatchedFlowDecoder:
    """Called like the flow's decoder, from many threads; runs the calls in priority order and
    batches the ones that overlap (up to max_batch; 1: one call at a time)."""

    def __init__(self, decoder: nn.Module, max_batch: int = 8):
        self.decoder = decoder
        self.max_batch = max_batch
        self._waiting: list[tuple[tuple[int, int], FlowCall]] = []   # a heap: most urgent first
        self._arrived = threading.Condition()                      # guards _waiting
        self._arrivals = itertools.count()
        self.batch_sizes = [0] * (max_batch + 1)     # [n]: decoder runs that served n calls
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def __call__(self, mu: Tensor, mask: Tensor, spks: Tensor, cond: Tensor, n_timesteps: int = 10,
                 streaming: bool = False, carry: DecoderCarry | None = None) -> Tensor:
        """mu, cond [1, 80, T]; mask [1, 1, T] (all ones); spks [1, 80] -> mel [1, 80, T] float32."""
        self._ensure_running()
        with self._arrived:
            call = FlowCall(mu, spks, cond, n_timesteps, streaming, carry, order=next(self._arrivals))
            heapq.heappush(self._waiting, (call.priority, call))
            self._arrived.notify()
        call.done.wait()
        if isinstance(call.result, BaseException):
            raise call.result
        return call.result

    @property
    def waiting(self) -> int:
        """Calls not yet started."""
        with self._arrived:
            return len(self._waiting)

    def _ensure_running(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="flow-batcher", daemon=True)
                self._thread.start()

    # ---- worker thread -----------------------------------------------------------------------

    def _run(self) -> None:
        """Advances the most urgent started batch by one Euler step at a time, starting a batch of
        waiting calls when nothing runs or when they are more urgent than everything running."""
        running: list[_Batch] = []
        with torch.inference_mode():
            while True:
                calls = self._take(urgency_below=min((b.urgency for b in running), default=None))
                if calls:
                    running.append(self._start(calls))
                batch = min(running, key=lambda b: b.urgency)
                try:
                    next(batch.steps)
                    continue
                except StopIteration as done:
                    results = done.value
                except Exception as error:   # each caller re-raises it; the worker carries on
                    results = [error] * len(batch.calls)
                running.remove(batch)
                for call, result in zip(batch.calls, results):
                    call.result = result
                    call.done.set()

    def _take(self, urgency_below: int | None) -> list[FlowCall]:
        """The waiting calls to start as one batch, most urgent first (up to max_batch, one
        integration grid): any when nothing runs (waiting for one), else only calls more urgent
        than every running batch (streaming chunks while final calls run), else none."""
        with self._arrived:
            while urgency_below is None and not self._waiting:
                self._arrived.wait()
            calls: list[FlowCall] = []
            passed_over = []
            while self._waiting and len(calls) < self.max_batch:
                call = self._waiting[0][1]
                if urgency_below is not None and call.priority[0] >= urgency_below:
                    break
                heapq.heappop(self._waiting)
                if calls and call.n_timesteps != calls[0].n_timesteps:
                    passed_over.append(call)
                else:
                    calls.append(call)
            for call in passed_over:
                heapq.heappush(self._waiting, (call.priority, call))
            return calls

    def _start(self, calls: list[FlowCall]) -> _Batch:
        self.batch_sizes[len(calls)] += 1
        return _Batch(calls, self._integration(calls), urgency=min(c.priority[0] for c in calls))

    def decode_batch(self, batch: list[FlowCall]) -> list[Tensor]:
        """Runs `batch` as one padded batch on the calling thread, whole (the worker does the
        same step by step); for checks that compare a batch with solo runs."""
        return run_to_end(self._integration(batch))

    def _integration(self, batch: list[FlowCall]) -> Generator[None, None, list[Tensor]]:
        """The decoder run over `batch`, one Euler step per next(); returns each call's mel."""
        if len(batch) == 1:
            call = batch[0]
            mask = torch.ones_like(call.mu[:, :1])
            carried = {} if call.carry is None else {"carry": call.carry}
            mel = yield from self._steps(call.mu, mask, call.spks, call.cond, n_timesteps=call.n_timesteps,
                                         streaming=call.streaming, **carried)
            return [mel]
        lengths = [call.mu.shape[2] for call in batch]
        mu, cond = self._pad([c.mu for c in batch]), self._pad([c.cond for c in batch])   # [B, 80, T]
        frame = torch.arange(mu.shape[2], device=mu.device)
        mask = (frame[None, :] < torch.tensor(lengths, device=mu.device)[:, None])[:, None].to(mu.dtype)
        spks = torch.cat([c.spks for c in batch])                                          # [B, 80]
        streaming = torch.tensor([c.streaming for c in batch], device=mu.device)           # [B]
        carries = [c.carry for c in batch]
        carried = {"carry": carries} if any(c is not None for c in carries) else {}
        mel = yield from self._steps(mu, mask, spks, cond, n_timesteps=batch[0].n_timesteps,
                                     streaming=streaming, **carried)                       # [B, 80, T]
        return [mel[row:row + 1, :, :length] for row, length in enumerate(lengths)]

    def _steps(self, *args, **kwargs) -> Generator[None, None, Tensor]:
        """The decoder's step-by-step run (CausalConditionalCFM.steps); a decoder without one
        (a plain function standing in for it) runs whole, as one step."""
        steps = getattr(self.decoder, "steps", None)
        if steps is not None:
            return (yield from steps(*args, **kwargs))
        return self.decoder(*args, **kwargs)

    @staticmethod
    def _pad(rows: list[Tensor]) -> Tensor:
        """[1, C, T_i] each -> [B, C, max T_i], zero on the right."""
        longest = max(row.shape[2] for row in rows)
        return torch.cat([nn.functional.pad(row, (0, longest - row.shape[2])) for row in rows])
