"""One utterance from model inputs to waveform chunks: LLM tokens -> flow mel -> HiFT audio.

Streaming follows the reference schedule. The LLM's tokens are collected; each time enough have
arrived, the flow turns all tokens so far into mel (it recomputes the prefix, with chunk-causal
attention, so earlier frames do not change), and the vocoder renders the new frames:

    chunk 0: first `hop + prompt_pad` tokens (+ lookahead), then hops of 2x, 4x ... up to `max_hop`
    every non-final chunk holds back the last `cache_samples` of audio and cross-fades them into
    the next chunk, whose vocoder call also sees the previous chunk's last mel frames and source;
    the final call runs the flow with full attention over all tokens.

`prompt_pad` aligns the first chunk border with the flow's attention chunks, which count from the
start of the prompt tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F


VOCODER_CACHE_FRAMES = 8      # mel frames of the previous chunk the vocoder sees again
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
class VocoderCache:
    """What a streaming vocoder call leaves for the next one."""
    mel: torch.Tensor      # [1, n_mels, VOCODER_CACHE_FRAMES]
    source: torch.Tensor   # [1, 1, cache_samples]
    speech: torch.Tensor   # [1, cache_samples], the held-back tail of the previous chunk


@dataclass
class StreamState:
    """Per-request streaming position (never shared between requests)."""
    hop: int
    prompt_pad: int
    offset: int = 0                       # tokens already rendered
    cache: VocoderCache | None = None
    chunks: int = 0                       # chunks emitted

    def next_hop(self) -> int:
        return self.hop + (self.prompt_pad if self.chunks == 0 else 0)


def _fork(generator: torch.Generator | None) -> torch.Generator | None:
    """A new generator in the same state (None stays None: both then use torch's global one)."""
    if generator is None:
        return None
    fork = torch.Generator(generator.device)
    fork.set_state(generator.get_state())
    return fork


class Synthesizer:
    """Runs the three stages for one utterance; stateless, so one instance serves all threads."""

    def __init__(self, llm, flow, hift, token_hop: int, flow_decoder: Callable[..., torch.Tensor] | None = None):
        """`flow_decoder` runs the flow's decoder (default: `flow.decoder` itself; a
        `BatchedFlowDecoder` batches it across concurrent requests)."""
        self.llm, self.flow, self.hift = llm, flow, hift
        self.flow_decoder = flow_decoder
        self.token_hop = token_hop
        self.mel_ratio = flow.token_mel_ratio
        self.lookahead = flow.pre_lookahead_len
        self.cache_samples = VOCODER_CACHE_FRAMES * hift.samples_per_frame
        # Symmetric Hamming window over two cache lengths: rising half fades the new chunk in,
        # falling half fades the previous tail out (the halves sum to about 1.08, as in the reference).
        self.fade_window = torch.from_numpy(np.hamming(2 * self.cache_samples).astype(np.float32)).to(self.device)

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
        tokens_in = iter(source_tokens) if source_tokens is not None else \
            self.tokens(request, llm_generator, sampling)
        if not stream:
            tokens = list(tokens_in)
            if generator is not None:   # the vocoder goes on where the LLM stopped, as with one generator
                generator.set_state(llm_generator.get_state())
            yield self._render(request, tokens, 0, None, finalize=True, speed=speed, generator=generator)[0]
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
            chunk, state.cache = self._render(request, tokens[:state.offset + hop + self.lookahead],
                                              state.offset, state.cache, finalize=False,
                                              generator=generator)
            state.offset += hop
            state.chunks += 1
            state.hop = min(MAX_HOP_TOKENS, state.hop * HOP_GROWTH)
            yield chunk
        chunk, _ = self._render(request, tokens, state.offset, state.cache, finalize=True,
                                generator=generator)
        if chunk.size:
            yield chunk

    def _render(self, request: ModelInput, tokens: list[int], token_offset: int,
                cache: VocoderCache | None, finalize: bool, speed: float = 1.0,
                generator: torch.Generator | None = None) -> tuple[np.ndarray, VocoderCache | None]:
        """Flow + vocoder over `tokens`, keeping the audio from `token_offset` on.

        A non-final call runs the flow with chunk attention and holds the last `lookahead` tokens
        back as right context; the final call uses full attention over every token.
        """
        token_tensor = torch.tensor([tokens], dtype=torch.int32, device=self.device)
        mel = self.flow.inference(token_tensor, request.flow_prompt_tokens, request.prompt_feat,
                                  request.embedding, streaming=not finalize, finalize=finalize, decoder=self.flow_decoder)
        mel = mel[:, :, token_offset * self.mel_ratio:]          # [1, n_mels, T_new]
        cache_source = None
        if cache is not None:
            mel = torch.cat([cache.mel, mel], dim=2)
            cache_source = cache.source
        elif speed != 1.0:
            mel = F.interpolate(mel, size=int(mel.shape[2] / speed), mode="linear")
        if mel.shape[2] == 0:
            return np.zeros(0, dtype=np.float32), None
        speech, source = self.hift.inference(mel, cache_source, generator=generator)  # [1, S], [1, 1, S]
        if cache is not None:
            speech = self._cross_fade(speech, cache.speech)
        if finalize:
            return speech[0].cpu().numpy(), None
        next_cache = VocoderCache(mel[:, :, -VOCODER_CACHE_FRAMES:], source[:, :, -self.cache_samples:],
                                  speech[:, -self.cache_samples:])
        return speech[0, :-self.cache_samples].cpu().numpy(), next_cache

    def _cross_fade(self, speech: torch.Tensor, previous_tail: torch.Tensor) -> torch.Tensor:
        """speech [1, S]: its first samples fade in while the previous chunk's tail fades out."""
        n = previous_tail.shape[1]
        window = self.fade_window                            # [2 * cache_samples]
        speech = speech.clone()
        speech[:, :n] = speech[:, :n] * window[:n] + previous_tail * window[n:]
        return speech
