"""Continuous batching of the speech LLM across concurrent requests.

One scheduler thread owns the model. Each loop iteration it admits waiting requests into free
cache slots (their prompts prefilled together in one padded pass), then advances every active
request by one token in a single batched forward pass. Requests join and leave between steps, so a new request never waits for
the others to finish, and N concurrent streams cost about one forward pass per token instead of N.

Each request keeps its own sampler, generator and limits, so its tokens are the ones
`SpeechLM.generate` gives for the same seed (up to float rounding in batched matrix products).
`BatchedLLM.generate` has the same signature as `SpeechLM.generate`, so the synthesis code does
not know which one it runs. On a GPU the decode step runs on static shapes recorded as CUDA
graphs (cosyvoice.concurrency.decode_graphs), whose padding rows write into the cache's one spare slot.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .decode_graphs import DecodeStep, StaticDecodeStep, eager_decode_step
from ..errors import InputError
from ..models.llm import MAX_TOKEN_TEXT_RATIO, MIN_TOKEN_TEXT_RATIO, SpeechLM, token_length_limits
from ..models.qwen_slots import SlotKVCache, forward_slots

log = logging.getLogger("cosyvoice.concurrency.llm_scheduler")

_END = object()  # queued after a request's last token


@dataclass(eq=False)   # compared by identity (it holds tensors)
class _Request:
    prompt: torch.Tensor                 # [1, T, H] input embeddings
    min_len: int
    max_len: int
    sample: Callable[..., int]
    generator: torch.Generator | None
    tokens: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)   # ints, then _END or an error
    cancelled: threading.Event = field(default_factory=threading.Event)
    decoded: list[int] = field(default_factory=list)
    slot: int = -1
    position: int = 0                    # where the next input goes in the cache
    next_input: torch.Tensor | None = None   # [H] embedding of the last sampled token


class BatchedLLM:
    """Serves `generate` calls from many threads with one batched decode loop."""

    def __init__(self, llm: SpeechLM, max_batch: int = 8, max_len: int = 4096,
                 static_decode: bool | None = None):
        """`static_decode`: run decode steps on static shapes, recorded as CUDA graphs on a GPU
        (cosyvoice.concurrency.decode_graphs); default: on a GPU only."""
        self.llm = llm
        self.body = llm.body
        self.max_batch = max_batch
        self.max_len = max_len
        self.static_decode = static_decode
        self._cache: SlotKVCache | None = None       # allocated by the scheduler thread on first use
        self._decode: DecodeStep | None = None       # likewise
        self._waiting: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._active: list[_Request] = []
        self._free_slots = list(range(max_batch))
        self.step_sizes = [0] * (max_batch + 1)      # [n]: decode steps that advanced n requests
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def generate(self, text_ids: torch.Tensor, prompt_text_ids: torch.Tensor,
                 prompt_speech_tokens: torch.Tensor, *, sampling: Callable[..., int] | None = None,
                 generator: torch.Generator | None = None,
                 min_token_text_ratio: float = MIN_TOKEN_TEXT_RATIO,
                 max_token_text_ratio: float = MAX_TOKEN_TEXT_RATIO) -> Iterator[int]:
        """Yields speech tokens as the scheduler produces them (see SpeechLM.generate)."""
        min_len, max_len = token_length_limits(text_ids.shape[1], min_token_text_ratio, max_token_text_ratio)
        with torch.inference_mode():
            prompt = self.llm.prompt_embeddings(text_ids, prompt_text_ids, prompt_speech_tokens)
        room = self.max_len - prompt.shape[1]          # cache positions left for generated tokens
        if room <= min_len:
            raise InputError(f"the voice prompt and text need more than {self.max_len} LLM positions: "
                             "use a shorter prompt or text")
        request = _Request(prompt, min_len, min(max_len, room),
                           sampling or self.llm.sampling, generator)
        self._ensure_running()
        self._waiting.put(request)
        return self._drain(request)

    @staticmethod
    def _drain(request: _Request) -> Iterator[int]:
        try:
            while True:
                item = request.tokens.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            request.cancelled.set()   # the consumer stopped early (or finished): free the slot

    def _ensure_running(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llm-batcher", daemon=True)
                self._thread.start()

    # ---- scheduler thread --------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            try:
                device = self.llm.speech_embedding.weight.device
                if device.type == "cuda":   # a new thread starts on GPU 0; streams and graphs follow it
                    torch.cuda.set_device(device)
                self._cache = SlotKVCache(self.body, self.max_batch + 1, self.max_len)   # + a scratch slot
                self._decode = self._decode_step()
            except Exception as error:   # out of memory, say: every request, now and later, gets it
                while True:
                    self._waiting.get().tokens.put(error)
            while True:
                self._admit(block=not self._active)
                self._drop_cancelled()
                if self._active:
                    self._guarded(self._active, self._step)

    def _decode_step(self) -> DecodeStep:
        device = self._cache.keys.device
        static = self.static_decode if self.static_decode is not None else device.type == "cuda"
        eager = eager_decode_step(self.body, self.llm.head_log_probs, self._cache)
        if not static:
            return eager
        step = StaticDecodeStep(self.body, self.llm.head_log_probs, self._cache, scratch_slot=self.max_batch,
                                max_batch=self.max_batch, hidden_size=self.body.config.hidden_size)
        if device.type == "cuda":
            try:
                step.record()
            except RuntimeError as error:   # eager decoding gives the same tokens, only slower
                log.warning("recording the decode step as CUDA graphs failed (%s); decoding eagerly", error)
                return eager
            log.info("decode step recorded as CUDA graphs for batches up to %d", self.max_batch)
        return step

    def _admit(self, block: bool) -> None:
        """Moves waiting requests into free slots and prefills them together (waits for one
        when nothing is active)."""
        admitted = []
        while self._free_slots:
            try:
                request = self._waiting.get(block=block)
            except queue.Empty:
                break
            block = False
            if request.cancelled.is_set():
                continue
            request.slot = self._free_slots.pop()
            self._active.append(request)
            admitted.append(request)
        if admitted:
            self._guarded(admitted, self._prefill)

    def _prefill(self, batch: list[_Request]) -> None:
        """Runs prompts of different lengths in one pass, right-padded to the longest.

        A shorter prompt's padding writes junk into its own slot past its prompt; decoding
        overwrites each of those positions just before the first query that could see it.
        """
        lengths = [r.prompt.shape[1] for r in batch]
        device = self._cache.keys.device
        inputs = torch.zeros(len(batch), max(lengths), batch[0].prompt.shape[2],
                             device=device, dtype=batch[0].prompt.dtype)             # [B, T, H]
        for row, request in enumerate(batch):
            inputs[row, :lengths[row]] = request.prompt[0]
        positions = torch.arange(max(lengths), device=device)[None].expand(len(batch), -1)
        slots = torch.tensor([r.slot for r in batch], device=device)
        hidden = forward_slots(self.body, inputs, positions, slots, self._cache, max(lengths))   # [B, T, H]
        last = hidden[torch.arange(len(batch), device=device), torch.tensor(lengths, device=device) - 1]
        for request, length, logp in zip(batch, lengths, self.llm.head_log_probs(last)):
            request.position = length
            self._take_token(request, logp)

    def _step(self, batch: list[_Request]) -> None:
        device = self._cache.keys.device
        inputs = torch.stack([r.next_input for r in batch])[:, None]                      # [B, 1, H]
        positions = torch.tensor([[r.position] for r in batch], device=device)            # [B, 1]
        slots = torch.tensor([r.slot for r in batch], device=device)
        logp = self._decode(inputs, positions, slots, max(r.position for r in batch) + 1)   # [B, V]
        self.step_sizes[len(batch)] += 1
        for request, row in zip(list(batch), logp):
            request.position += 1
            self._take_token(request, row)

    def _take_token(self, request: _Request, logp: torch.Tensor) -> None:
        """Samples the request's next token from logp [V]; emits it or ends the request."""
        if len(request.decoded) < request.min_len:
            logp[self.llm.min_len_masked_token] = -float("inf")
        token = request.sample(logp, request.decoded, generator=request.generator)
        if self.llm.is_stop_token(token):
            self._finish(request, _END)
            return
        request.decoded.append(token)
        request.tokens.put(token)
        if len(request.decoded) >= request.max_len:
            self._finish(request, _END)
            return
        request.next_input = self.llm.speech_embedding.weight[token]

    def _finish(self, request: _Request, last_item) -> None:
        request.tokens.put(last_item)
        self._active.remove(request)
        self._free_slots.append(request.slot)

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._active if r.cancelled.is_set()]:
            self._finish(request, _END)

    def _guarded(self, batch: list[_Request], work: Callable[[list[_Request]], None]) -> None:
        """Runs `work`; if it fails (out of memory, say), the requests in `batch` get the error
        and leave, and the scheduler carries on with the others."""
        try:
            work(batch)
        except Exception as exc:  # delivered to the callers of generate(), not swallowed
            for request in [r for r in batch if r in self._active]:
                self._finish(request, exc)
