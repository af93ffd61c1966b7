"""Instruments for the in-process profiler: a sampler that forces the number of speech tokens,
and a wrapper that times every `inference` call of a model stage.

Random weights almost never draw a stop token, so a run would go on to the length limit;
`ForcedLength` draws with the model's own sampler among speech tokens only and stops after
exactly N tokens, so the work per run is fixed and comparable.
"""
from __future__ import annotations

import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Waits for queued GPU work, so a timer read afterwards covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ForcedLength:
    """A sampling function (logp [V], decoded, generator=) -> token that never stops before
    `tokens` tokens and always stops there."""

    def __init__(self, sample: Callable[..., int], tokens: int, speech_token_size: int):
        self.sample = sample
        self.tokens = tokens
        self.speech_token_size = speech_token_size   # ids from here on are stop tokens (EOS first)

    def __call__(self, logp: torch.Tensor, decoded: list[int],
                 generator: torch.Generator | None = None) -> int:
        if len(decoded) >= self.tokens:
            return self.speech_token_size
        speech_only = logp.clone()
        speech_only[self.speech_token_size:] = -float("inf")
        return self.sample(speech_only, decoded, generator=generator)

    def check(self, counts: list[int]) -> None:
        """Raises unless every run made exactly `tokens` tokens: the LLM stops at 20 tokens per
        text token whatever the sampler draws, so fewer means the text is too short."""
        if any(count != self.tokens for count in counts):
            raise RuntimeError(f"expected {self.tokens} tokens per request, got {counts}: the "
                               "text is too short for --tokens (the LLM stops at 20 tokens per "
                               "text token); pass a longer --text")


class TimedStage:
    """Stands in for a flow or vocoder module: every `inference` (and, for a vocoder that streams,
    `stream`) call is timed (with the GPU synchronised) and recorded as {size_name: size, "ms": ...};
    other attributes pass through. `size_of(*args, **kwargs)` is read before the call."""

    def __init__(self, stage, device: torch.device, size_name: str, size_of: Callable[..., int]):
        self._stage = stage
        self._device = device
        self._size_name = size_name
        self._size_of = size_of
        self.calls: list[dict] = []

    def inference(self, *args, **kwargs):
        return self._timed(self._stage.inference, args, kwargs)

    def __getattr__(self, name: str):
        if name == "stream" and hasattr(self._stage, "stream"):
            return lambda *args, **kwargs: self._timed(self._stage.stream, args, kwargs)
        return getattr(self._stage, name)

    def _timed(self, call, args, kwargs):
        size = self._size_of(*args, **kwargs)
        synchronize(self._device)
        started = time.perf_counter()
        result = call(*args, **kwargs)
        synchronize(self._device)
        self.calls.append({self._size_name: size, "ms": round((time.perf_counter() - started) * 1000, 2)})
        return result


def flow_tokens(token: torch.Tensor, *_args, **_kwargs) -> int:
    """Speech tokens a flow call is given (all tokens so far)."""
    return int(token.shape[1])


def vocoder_frames(mel: torch.Tensor, *_args, **_kwargs) -> int:
    """Mel frames a vocoder call is given (CosyVoice2: new frames plus the cached overlap;
    CosyVoice3: the whole mel so far, or the new frames when it streams)."""
    return int(mel.shape[2])
