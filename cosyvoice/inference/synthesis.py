"""One utterance from model inputs to waveform chunks: LLM tokens -> flow mel -> vocoder audio.

Streaming follows the reference schedule. The LLM's tokens are collected; each time enough have
arrived, the flow turns all tokens so far into mel (it recomputes the prefix, with chunk-causal
attention, so earlier frames do not change), and the vocoder renders the new frames:

    chunk 0: first `hop + prompt_pad` tokens (+ lookahead), then hops of 2x, 4x ... up to `max_hop`
    the final call runs the flow with full attention over all tokens.

`prompt_pad` aligns the first chunk border with the flow's attention chunks, which count from the
start of the prompt tokens. How the vocoder joins chunks depends on the generation:

    CrossFadeVocoding (CosyVoice2)  every non-final chunk holds back the last `cache_samples` of
                                    audio and cross-fades them into the next chunk, whose vocoder
                                    call also sees the previous chunk's last mel frames and source
    WholeMelVocoding (CosyVoice3)   the causal vocoder runs over the whole mel so far and the new
                                    samples are emitted: the stream equals one run over the final mel
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F


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


@dataclass
class StreamState:
    """Per-request streaming position (never shared between requests)."""
    hop: int
    prompt_pad: int
    offset: int = 0                       # tokens already rendered
    chunks: int = 0                       # chunks emitted

    def next_hop(self) -> int:
        return self.hop + (self.prompt_pad if self.chunks == 0 else 0)


class CrossFadeVocoding:
    """CosyVoice2's HiFT per chunk: each call sees the previous chunk's last mel frames and
    source again, and its first samples cross-fade with the previous chunk's held-back tail."""

    def __init__(self, hift, generator: torch.Generator | None):
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
    """CosyVoice3's causal HiFT: each call runs over the whole mel so far and the samples not
    yet emitted are returned. Its non-final output is an exact prefix of a final run, so the
    stream equals one vocoder run over the final mel. With speed != 1 (whole utterances only)
    the output is stretched, as in the reference."""

    def __init__(self, hift, generator: torch.Generator | None = None):
        self.hift = hift
        self.mel: torch.Tensor | None = None     # [1, n_mels, T] everything so far
        self.emitted = 0                          # samples returned so far

    def render(self, mel: torch.Tensor, finalize: bool, speed: float = 1.0) -> np.ndarray:
        self.mel = mel if self.mel is None else torch.cat([self.mel, mel], dim=2)
        whole = self.mel
        if speed != 1.0:
            whole = F.interpolate(whole, size=int(whole.shape[2] / speed), mode="linear")
        if whole.shape[2] == 0:
            return np.zeros(0, dtype=np.float32)
        speech, _ = self.hift.inference(whole, finalize=finalize)            # [1, S]
        new = speech[0, self.emitted:]
        self.emitted += new.shape[0]
        return new.cpu().numpy()


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
                 max_silent_run: int = 0):
        """`flow_decoder` runs the flow's decoder (default: `flow.decoder` itself; a
        `BatchedFlowDecoder` batches it across concurrent requests). `vocoding` is how the
        vocoder joins chunks; `silent_tokens` runs longer than `max_silent_run` are dropped
        before the flow (CosyVoice3)."""
        self.llm, self.flow, self.hift = llm, flow, hift
        self.flow_decoder = flow_decoder
        self.token_hop = token_hop
        self.vocoding = vocoding
        self.silent_tokens = silent_tokens
        self.max_silent_run = max_silent_run
        self.mel_ratio = flow.token_mel_ratio
        self.lookahead = flow.pre_lookahead_len

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

        `speed` (> 0) stretches the mel in time and applies only with stream=False.
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
        vocoder = self.vocoding(self.hift, generator)
        if not stream:
            tokens = list(tokens_in)
            if generator is not None:   # the vocoder goes on where the LLM stopped, as with one generator
                generator.set_state(llm_generator.get_state())
            yield vocoder.render(self._mel(request, tokens, 0, finalize=True), finalize=True, speed=speed)
            return

        n_prompt = request.flow_prompt_tokens.shape[1]
        state = StreamState(hop=self.token_hop,
                            prompt_pad=math.ceil(n_prompt / self.token_hop) * self.token_hop - n_prompt)
        tokens: list[int] = []
        for token in tokens_in:
            tokens.append(token)
            hop = state.next_hop()
            if len(tokens) - state.offset < hop + self.lookahead:
                continue
            mel = self._mel(request, tokens[:state.offset + hop + self.lookahead], state.offset, finalize=False)
            state.offset += hop
            state.chunks += 1
            state.hop = min(MAX_HOP_TOKENS, state.hop * HOP_GROWTH)
            chunk = vocoder.render(mel, finalize=False)
            if chunk.size:
                yield chunk
        chunk = vocoder.render(self._mel(request, tokens, state.offset, finalize=True), finalize=True)
        if chunk.size:
            yield chunk

    def _mel(self, request: ModelInput, tokens: list[int], token_offset: int, finalize: bool) -> torch.Tensor:
        """The flow over `tokens`, keeping the frames from `token_offset` on: [1, n_mels, T_new].

        A non-final call runs the flow with chunk attention and holds the last `lookahead` tokens
        back as right context; the final call uses full attention over every token.
        """
        token_tensor = torch.tensor([tokens], dtype=torch.int32, device=self.device)
        mel = self.flow.inference(token_tensor, request.flow_prompt_tokens, request.prompt_feat,
                                  request.embedding, streaming=not finalize, finalize=finalize,
                                  decoder=self.flow_decoder)
        return mel[:, :, token_offset * self.mel_ratio:]
