"""One utterance from model inputs to waveform chunks: LLM tokens -> flow mel -> vocoder audio.

Streaming follows the reference schedule. The LLM's tokens are collected; each time enough have
arrived, the flow turns the tokens so far into mel with chunk-causal attention, and the vocoder
renders the new frames:

    chunk 0: first `hop + prompt_pad` tokens (+ lookahead), then hops of 2x, 4x ... up to `max_hop`
    the final call runs the flow with full attention over all tokens.

`prompt_pad` aligns the first chunk border with the flow's attention chunks, which count from the
start of the prompt tokens. Since frames of a non-final call never change when tokens are
appended, the stream carries the flow's state from one non-final call to the next
(cosyvoice.models.flow.carry: attention keys and values, convolution tails) and each call computes
only its new frames; the reference recomputes the whole prefix, with the same result up to float
rounding. The final call, whose full attention changes every frame, runs as the reference runs it.
The carried state of all streams together is bounded (`StateBudget`); a stream that does not fit
drops it and recomputes its prefix, as the reference does. How the vocoder joins chunks depends on
the generation:

    CrossFadeVocoding (CosyVoice2)  every non-final chunk holds back the last `cache_samples` of
                                    audio and cross-fades them into the next chunk, whose vocoder
                                    call also sees the previous chunk's last mel frames and source
    WholeMelVocoding (CosyVoice3)   the causal vocoder continues from its carried state (convolution
                                    tails, phase) over the new frames: the stream equals one run
                                    over the final mel
"""
from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass, fields
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..models.causal_hift import VocoderCarry
from ..models.llm import token_length_limits
from ..models.flow.carry import FlowCarry


VOCODER_CACHE_FRAMES = 8      # mel frames of the previous chunk the CosyVoice2 vocoder sees again
MAX_HOP_TOKENS = 100          # the streaming hop doubles up to this many tokens
HOP_GROWTH = 2


@dataclass
class ModelInput:
    """Everything one utterance needs. Batch 1 tensors on any device."""
    text_ids: torch.Tensor            # int [1, L] text to speak
    prompt_text_ids: torch.Tensor     # int [1, Lp] LLM prompt text (transcript or instruction)
    llm_prompt_tokens: torch.Tensor   # int [1, P_llm] speech tokens the LLM continues from
    flow_prompt_tokens: torch.Tensor  # int [1, P] speech tokens of the flow's prompt
    prompt_feat: torch.Tensor         # float [1, ratio * P, n_mels] the flow's prompt mel
    embedding: torch.Tensor           # float [1, D] speaker vector

    def to(self, device: torch.device) -> "ModelInput":
        return ModelInput(*(getattr(self, f.name).to(device) for f in fields(self)))


@dataclass(eq=False)
class StreamState:
    """Per-request streaming position (never shared between requests)."""
    hop: int
    prompt_pad: int
    offset: int = 0                       # tokens already rendered
    chunks: int = 0                       # chunks emitted
    carry: FlowCarry | None = None        # the flow's state after the last non-final call

    def next_hop(self) -> int:
        return self.hop + (self.prompt_pad if self.chunks == 0 else 0)


class StateBudget:
    """Bytes of carried flow state that all streams of a model may hold together.

    The state grows with a stream's length (CosyVoice2: about 4.6 MB per mel frame, 230 MB per
    second of audio; CosyVoice3: 3.6 MB per frame), so it is bounded: a stream whose state would
    not fit gives it up and computes its remaining non-final chunks from the start, as the
    reference does (the same audio, more work). `limit_bytes` None: no bound.
    """

    def __init__(self, limit_bytes: int | None):
        self.limit_bytes = limit_bytes
        self._held: dict[int, int] = {}
        self._lock = threading.Lock()
        self.dropped = 0                  # refusals: states given up (or a voice prompt's not kept)

    @property
    def held_bytes(self) -> int:
        return sum(self._held.values())

    def hold(self, owner: object, nbytes: int) -> bool:
        """Records that `owner` now holds `nbytes`; False (and nothing recorded) when that would
        exceed the limit."""
        with self._lock:
            others = sum(held for key, held in self._held.items() if key != id(owner))
            if self.limit_bytes is not None and others + nbytes > self.limit_bytes:
                self._held.pop(id(owner), None)
                self.dropped += 1
                return False
            self._held[id(owner)] = nbytes
            return True

    def release(self, owner: object) -> None:
        with self._lock:
            self._held.pop(id(owner), None)


class CrossFadeVocoding:
    """CosyVoice2's HiFT per chunk: each call sees the previous chunk's last mel frames and
    source again, and its first samples cross-fade with the previous chunk's held-back tail."""

    def __init__(self, hift, generator: torch.Generator | None, carry_state: bool = True):
        # `carry_state`: part of the vocodings' shared signature; this one has no state to carry
        # beyond its cache (each chunk's vocoder call is already incremental).
        self.hift = hift
        self.generator = generator
        self.cache_samples = VOCODER_CACHE_FRAMES * hift.samples_per_frame
        self.mel: torch.Tensor | None = None      # [1, n_mels, VOCODER_CACHE_FRAMES]
        self.source: torch.Tensor | None = None   # [1, 1, cache_samples]
        self.tail: torch.Tensor | None = None     # [1, cache_samples] held back from the last chunk
        # A symmetric Hamming window over two cache lengths: its rising half fades the new chunk
        # in, its falling half fades the previous tail out (the halves sum to about 1.08, as in
        # the reference).
        window = np.hamming(2 * self.cache_samples).astype(np.float32)
        self.fade_window = torch.from_numpy(window).to(hift.window.device)   # [2 * cache_samples]

    def render(self, mel: torch.Tensor, finalize: bool, speed: float = 1.0) -> np.ndarray:
        """mel [1, n_mels, T_new] of the new frames -> this chunk's samples."""
        if self.mel is not None:
            mel = torch.cat([self.mel, mel], dim=2)
        elif speed != 1.0:
            mel = F.interpolate(mel, size=int(mel.shape[2] / speed), mode="linear")
        if mel.shape[2] == 0:
            return np.zeros(0, dtype=np.float32)
        speech, source = self.hift.inference(mel, self.source, generator=self.generator)  # [1, S], [1, 1, S]
        if self.tail is not None:
            speech = self._cross_fade(speech, self.tail)
        if finalize:
            return speech[0].cpu().numpy()
        self.mel = mel[:, :, -VOCODER_CACHE_FRAMES:]
        self.source = source[:, :, -self.cache_samples:]
        self.tail = speech[:, -self.cache_samples:]
        return speech[0, :-self.cache_samples].cpu().numpy()

    def _cross_fade(self, speech: torch.Tensor, previous_tail: torch.Tensor) -> torch.Tensor:
        """speech [1, S]: its first samples fade in while the previous chunk's tail fades out."""
        n = previous_tail.shape[1]
        window = self.fade_window
        speech = speech.clone()
        speech[:, :n] = speech[:, :n] * window[:n] + previous_tail * window[n:]
        return speech


class WholeMelVocoding:
    """CosyVoice3's causal HiFT: the stream equals one vocoder run over the whole final mel.

    The reference runs the vocoder over the whole mel so far for every chunk and emits the
    samples not yet emitted (a non-final run's output is a prefix of any longer run's). Here the
    vocoder continues from its carried state instead (CausalHiFTGenerator.stream), computing only
    the new samples. `mel` keeps the whole mel so far. With speed != 1 (whole utterances only) the
    output is stretched, as in the reference."""

    def __init__(self, hift, generator: torch.Generator | None = None, carry_state: bool = True):
        self.hift = hift
        self.mel: torch.Tensor | None = None     # [1, n_mels, T] everything so far
        self.emitted = 0                          # samples returned so far
        self.carry = VocoderCarry() if carry_state and hasattr(hift, "stream") else None

    def render(self, mel: torch.Tensor, finalize: bool, speed: float = 1.0) -> np.ndarray:
        self.mel = mel if self.mel is None else torch.cat([self.mel, mel], dim=2)
        if speed == 1.0 and self.carry is not None:
            new = self.hift.stream(mel, finalize, self.carry)[0]
            self.emitted += new.shape[0]
            return new.cpu().numpy()
        whole = self.mel
        if speed != 1.0:
            whole = F.interpolate(whole, size=int(whole.shape[2] / speed), mode="linear")
        if whole.shape[2] == 0:
            return np.zeros(0, dtype=np.float32)
        speech, _ = self.hift.inference(whole, finalize=finalize)            # [1, S]
        new = speech[0, self.emitted:]
        self.emitted += new.shape[0]
        return new.cpu().numpy()


class VoicePrefixCache:
    """The flow state of voice prompts, shared by the streams that speak with them.

    A stream's first non-final flow call covers the prompt's tokens too, and the prompt's complete
    attention chunks (up to the last chunk border at least `lookahead` tokens before the prompt's
    end, so their look-ahead is prompt tokens) depend on the prompt alone: its tokens, mel and
    speaker vector. Their state is computed once per prompt and copied into each stream, whose
    first call then computes only its generated tokens' frames. The `max_voices` most recently
    used prompts are kept; their bytes count against the StateBudget (a prompt that does not fit
    is not kept).
    """

    def __init__(self, max_voices: int = 2):
        self.max_voices = max_voices
        self._entries: dict[str, FlowCarry] = {}    # in order of use, oldest first
        self._lock = threading.Lock()
        self._computing: dict[str, threading.Lock] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(request: "ModelInput", tokens_read: int) -> str:
        """What the prompt's state depends on: its first `tokens_read` tokens, mel, speaker vector."""
        digest = hashlib.sha1()
        for tensor in (request.flow_prompt_tokens[:, :tokens_read], request.prompt_feat, request.embedding):
            data = tensor.detach().to("cpu").contiguous()
            digest.update(str((data.dtype, tuple(data.shape))).encode())
            digest.update(data.numpy().tobytes())
        return digest.hexdigest()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(entry.nbytes for entry in self._entries.values())

    def clear(self, budget: StateBudget) -> None:
        with self._lock:
            self._entries.clear()
        budget.release(self)

    def carry_for(self, key: str, compute: Callable[[], FlowCarry], budget: StateBudget) -> FlowCarry:
        """A copy of the prompt's state (computed with `compute` the first time)."""
        with self._lock:
            found = self._entries.pop(key, None)
            if found is not None:
                self._entries[key] = found     # most recently used last
                self.hits += 1
                return found.copy()
            computing = self._computing.setdefault(key, threading.Lock())
        with computing:                         # one computation per prompt; the others wait for it
            with self._lock:
                found = self._entries.get(key)
            if found is not None:
                self.hits += 1
                return found.copy()
            self.misses += 1
            try:
                carry = compute()
            finally:
                with self._lock:
                    self._computing.pop(key, None)
            with self._lock:
                self._entries[key] = carry
                while len(self._entries) > self.max_voices:
                    self._entries.pop(next(iter(self._entries)))
                kept = sum(entry.nbytes for entry in self._entries.values())
                if not budget.hold(self, kept):
                    self._entries.pop(key)
                    budget.hold(self, kept - carry.nbytes)
            return carry.copy()


def drop_long_silences(tokens: Iterable[int], silent_tokens: frozenset[int], max_run: int) -> Iterator[int]:
    """Passes tokens on, dropping silent ones once more than `max_run` come in a row (CosyVoice3
    does this between its LLM and flow, so long pauses do not reach the audio; the LLM itself
    has seen every token)."""
    run = 0
    for token in tokens:
        run = run + 1 if token in silent_tokens else 0
        if run <= max_run:
            yield token


def _fork(generator: torch.Generator | None) -> torch.Generator | None:
    """A new generator in the same state (None stays None: both then use torch's global one)."""
    if generator is None:
        return None
    fork = torch.Generator(generator.device)
    fork.set_state(generator.get_state())
    return fork


class Synthesizer:
    """Runs the three stages for one utterance; stateless, so one instance serves all threads."""

    def __init__(self, llm, flow, hift, token_hop: int, flow_decoder: Callable[..., torch.Tensor] | None = None,
                 vocoding: type = CrossFadeVocoding, silent_tokens: frozenset[int] = frozenset(),
                 max_silent_run: int = 0, state_budget: StateBudget | None = None,
                 carry_state: bool = True):
        """`flow_decoder` runs the flow's decoder (default: `flow.decoder` itself; a
        `BatchedFlowDecoder` batches it across concurrent requests). `vocoding` is how the
        vocoder joins chunks; `silent_tokens` runs longer than `max_silent_run` are dropped
        before the flow (CosyVoice3). `state_budget` bounds the flow state streams carry
        (default: unbounded); `carry_state=False` recomputes every chunk's prefix (and CosyVoice3
        re-vocodes the whole mel) instead, as the reference does."""
        self.llm, self.flow, self.hift = llm, flow, hift
        self.flow_decoder = flow_decoder
        self.token_hop = token_hop
        self.vocoding = vocoding
        self.silent_tokens = silent_tokens
        self.max_silent_run = max_silent_run
        self.mel_ratio = flow.token_mel_ratio
        self.lookahead = flow.pre_lookahead_len
        self.state_budget = state_budget or StateBudget(None)
        self.carry_state = carry_state
        self.voice_prefixes = VoicePrefixCache()

    @property
    def device(self) -> torch.device:
        return self.flow.input_embedding.weight.device

    def tokens(self, request: ModelInput, generator: torch.Generator | None = None,
               sampling: Callable[..., int] | None = None) -> Iterator[int]:
        return self.llm.generate(request.text_ids, request.prompt_text_ids, request.llm_prompt_tokens,
                                 sampling=sampling, generator=generator)

    def synthesize(self, request: ModelInput, stream: bool = False, speed: float = 1.0,
                   generator: torch.Generator | None = None,
                   sampling: Callable[..., int] | None = None,
                   source_tokens: list[int] | None = None) -> Iterator[np.ndarray]:
        """Yields float32 mono chunks. `source_tokens` replaces the LLM (voice conversion path).

        `speed` (> 0) stretches the mel in time and applies only with stream=False. An utterance
        whose LLM stops before its first speech token (random or badly prompted weights can) has
        no audio: nothing is yielded (the vocoders cannot run on an empty mel).
        """
        # The LLM draws from its own copy of the generator: a batched LLM samples on its scheduler
        # thread while this thread draws the vocoder's noise, and sharing one generator would
        # make their order, and so a seeded result, depend on timing.
        llm_generator = _fork(generator)
        request = request.to(self.device)   # once, not per chunk (voices are kept on the CPU)
        if source_tokens is not None:
            tokens_in = iter(source_tokens)
        else:
            tokens_in = self.tokens(request, llm_generator, sampling)
            if self.silent_tokens:
                tokens_in = drop_long_silences(tokens_in, self.silent_tokens, self.max_silent_run)
        vocoder = self.vocoding(self.hift, generator, carry_state=self.carry_state)
        if not stream:
            tokens = list(tokens_in)
            if not tokens:
                return
            if generator is not None:   # the vocoder goes on where the LLM stopped, as with one generator
                generator.set_state(llm_generator.get_state())
            yield vocoder.render(self._mel(request, tokens, 0, finalize=True), finalize=True, speed=speed)
            return

        n_prompt = request.flow_prompt_tokens.shape[1]
        state = StreamState(hop=self.token_hop,
                            prompt_pad=math.ceil(n_prompt / self.token_hop) * self.token_hop - n_prompt)
        if self.carry_state and getattr(self.flow, "carry_chunk_tokens", 0) > 0:
            state.carry = FlowCarry()
        # At most this many tokens can come (the LLM's length limit), so once another non-final
        # chunk cannot fit in them, the carried state will not be read again and goes at once.
        most_tokens = len(source_tokens) if source_tokens is not None else \
            token_length_limits(request.text_ids.shape[1])[1]
        try:
            tokens: list[int] = []
            for token in tokens_in:
                tokens.append(token)
                hop = state.next_hop()
                if len(tokens) - state.offset < hop + self.lookahead:
                    continue
                mel = self._mel(request, tokens[:state.offset + hop + self.lookahead], state.offset,
                                finalize=False, state=state)
                state.offset += hop
                state.chunks += 1
                state.hop = min(MAX_HOP_TOKENS, state.hop * HOP_GROWTH)
                if max(most_tokens, len(tokens)) - state.offset < state.next_hop() + self.lookahead:
                    state.carry = None
                    self.state_budget.release(state)
                chunk = vocoder.render(mel, finalize=False)
                if chunk.size:
                    yield chunk
            # The final call needs no carried state: free it before the largest flow call.
            state.carry = None
            self.state_budget.release(state)
            if not tokens:
                return
            chunk = vocoder.render(self._mel(request, tokens, state.offset, finalize=True), finalize=True)
            if chunk.size:
                yield chunk
        finally:
            state.carry = None
            self.state_budget.release(state)

    def _mel(self, request: ModelInput, tokens: list[int], token_offset: int, finalize: bool,
             state: StreamState | None = None) -> torch.Tensor:
        """The flow over `tokens`, keeping the frames from `token_offset` on: [1, n_mels, T_new].

        A non-final call runs the flow with chunk attention and holds the last `lookahead` tokens
        back as right context, continuing from the stream's carried state when it has one; the
        final call uses full attention over every token.
        """
        token_tensor = torch.tensor([tokens], dtype=torch.int32, device=self.device)
        if not finalize and state is not None and state.carry is not None and state.carry.tokens == 0:
            state.carry = self._prompt_state(request)
        carry = None if finalize or state is None else state.carry
        first = 0 if carry is None else max(0, carry.decoder.frames - request.prompt_feat.shape[1])
        extra = {} if carry is None else {"carry": carry}
        mel = self.flow.inference(token_tensor, request.flow_prompt_tokens, request.prompt_feat,
                                  request.embedding, streaming=not finalize, finalize=finalize,
                                  decoder=self.flow_decoder, **extra)
        if carry is not None and not self.state_budget.hold(state, carry.nbytes):
            state.carry = None   # over the budget: later chunks recompute their prefix
        return mel[:, :, token_offset * self.mel_ratio - first:]

    def _prompt_state(self, request: ModelInput) -> FlowCarry:
        """A stream's starting flow state: the voice prompt's complete chunks, from the cache."""
        chunk = self.flow.carry_chunk_tokens
        prompt_tokens = request.flow_prompt_tokens.shape[1]
        prefix = (prompt_tokens - self.lookahead) // chunk * chunk if prompt_tokens > self.lookahead else 0
        if prefix <= 0:
            return FlowCarry()

        def compute() -> FlowCarry:
            carry = FlowCarry()
            no_tokens = request.flow_prompt_tokens[:, :0]
            self.flow.inference(no_tokens, request.flow_prompt_tokens[:, :prefix + self.lookahead],
                                request.prompt_feat[:, :prefix * self.mel_ratio], request.embedding,
                                streaming=True, finalize=False, decoder=self.flow_decoder, carry=carry)
            return carry

        key = VoicePrefixCache.key(request, prefix + self.lookahead)
        return self.voice_prefixes.carry_for(key, compute, self.state_budget)
