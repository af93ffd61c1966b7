"""LLM backends: what turns text ids (and a voice prompt) into speech tokens.

The synthesizer needs one method of its LLM, `generate`, which the PyTorch `SpeechLM` already
has; `torch` wraps it in continuous batching (cosyvoice.concurrency.llm_scheduler) so concurrent requests share
each decode step, `torch-serial` runs it per request, and `trtllm` runs the same model on
TensorRT-LLM from its HF export (`hf_export`). A backend is chosen by name or given as a factory:

    cosyvoice.load(model_dir, device="cuda", llm_backend="torch")      # batched SpeechLM (default)
    cosyvoice.load(model_dir, device="cuda", llm_backend="trtllm")     # TensorRT-LLM, default limits
    cosyvoice.load(model_dir, device="cuda", llm_backend=TrtLlmFactory(limits=...))
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch

from ..loading.model_dir import ModelDir, load_stage

BACKEND_NAMES = ("torch", "torch-serial", "trtllm")


class LLMBackend(Protocol):
    def generate(self, text_ids: torch.Tensor, prompt_text_ids: torch.Tensor,
                 prompt_speech_tokens: torch.Tensor, *, sampling: Callable[..., int] | None = None,
                 generator: torch.Generator | None = None) -> Iterator[int]:
        """Speech tokens (0 <= token < speech_token_size) one by one, until a stop token or the
        length limit. text_ids [1, L] and prompt_text_ids [1, Lp] are Qwen ids, tokenised
        separately; prompt_speech_tokens [1, P] may be empty. `sampling(logp [V], decoded_tokens,
        generator=...) -> token` replaces the model's sampler; `generator` seeds the draws."""
        ...


# (model directory, device, dtype) -> a loaded backend
BackendFactory = Callable[[ModelDir, torch.device, torch.dtype], LLMBackend]


def serial_torch_backend(model_dir: ModelDir, device: torch.device, dtype: torch.dtype) -> LLMBackend:
    """The PyTorch SpeechLM of the model directory, one request at a time per caller."""
    return load_stage(model_dir, "llm", device, dtype)


def torch_backend(model_dir: ModelDir, device: torch.device, dtype: torch.dtype, max_batch: int = 8) -> LLMBackend:
    """The PyTorch SpeechLM with continuous batching across up to `max_batch` concurrent requests."""
    from ..concurrency.llm_scheduler import BatchedLLM
    return BatchedLLM(load_stage(model_dir, "llm", device, dtype), max_batch=max_batch)


def backend_factory(spec: str | BackendFactory) -> BackendFactory:
    """A factory from a backend name, or the factory given."""
    if callable(spec):
        return spec
    if spec == "torch":
        return torch_backend
    if spec == "torch-serial":
        return serial_torch_backend
    if spec == "trtllm":
        from .trtllm import TrtLlmFactory
        return TrtLlmFactory()
    raise ValueError(f"unknown LLM backend {spec!r}; expected one of {', '.join(BACKEND_NAMES)} "
                     "or a factory (model_dir, device, dtype) -> backend")
