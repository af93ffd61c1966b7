"""The per-request logits processor that makes a runtime without our sampler decode like SpeechLM
(CosyVoice2) or CosyVoice3LM.

Runtimes built from the HF export (TensorRT-LLM) compute logits over the whole merged vocabulary
with a bias-free lm_head. At every step this processor:

    1. takes the speech-head slice of the logits (the codes and every extra id after them) and
       adds the head's bias (CosyVoice2's lm_head.bias, which the runtime dropped; zeros for
       CosyVoice3): every id off the slice (text, prompt markers, padding) is out of reach;
    2. log-softmax over that slice (= the LLM's distribution); below `min_len` blocks the rows
       the LLM blocks (`min_len_masked_token`: EOS in CosyVoice2, SOS in CosyVoice3);
    3. draws the token with the model's own sampler (repetition-aware sampling from the yaml),
       on the CPU, from a generator seeded per request;
    4. forces it: every other logit becomes -inf, so the runtime's greedy pick is this token. A
       draw of any extra id (each one stops generation) forces EOS, the runtime's end id, so the
       request ends there whichever stop was drawn.

It keeps the tokens it has drawn, which are exactly the request's generated tokens (it forces
each one), so it needs nothing from the runtime's token history. It is pickled into the runtime's
worker process, so it holds only plain data until its first call.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch


class SpeechTokenSampler:
    def __init__(self, speech_offset: int, head_bias: torch.Tensor, speech_size: int, eos_row: int,
                 min_len_masked_rows: Sequence[int], min_len: int, sampling: Callable[..., int], seed: int):
        self.speech_offset = speech_offset
        self.head_bias = head_bias.float().cpu()    # [S + E]: rows >= speech_size are stop ids
        self.speech_size = speech_size
        self.eos_row = eos_row                      # the stop row forced when any stop is drawn
        self.min_len_masked_rows = list(min_len_masked_rows)
        self.min_len = min_len
        self.sampling = sampling
        self.seed = seed
        self.decoded: list[int] = []
        self._generator: torch.Generator | None = None
        if not speech_size <= eos_row < self.head_bias.shape[0]:
            raise ValueError(f"EOS row {eos_row} is not an extra id of a {self.head_bias.shape[0]}-row head")

    def __call__(self, req_id: int, logits: torch.Tensor, token_ids: list[list[int]],
                 stream_ptr: int | None, client_id: int | None) -> None:
        """TensorRT-LLM's LogitsProcessor signature; edits `logits` in place on the runtime's
        CUDA stream (`stream_ptr`, an int; None on its PyTorch backend). On the TensorRT engine
        `logits` is a view of the step's device buffer, [1, beam, rows] in the engine's logits
        dtype, and `token_ids` (unused here) is per beam, prompt included."""
        stream = contextlib.nullcontext() if stream_ptr is None else \
            torch.cuda.stream(torch.cuda.ExternalStream(stream_ptr))
        with stream:
            self.force_next(logits)

    def force_next(self, logits: torch.Tensor) -> int:
        """Draws the next token from `logits` [..., rows] (one row: beam width 1), leaves only
        that token allowed (EOS for any stop id), and returns the speech-head row drawn."""
        row = logits.view(-1, logits.shape[-1])[0]                            # [rows]
        head = slice(self.speech_offset, self.speech_offset + self.head_bias.shape[0])
        logp = (row[head].float().cpu() + self.head_bias).log_softmax(dim=0)  # [S + E]
        if len(self.decoded) < self.min_len:
            logp[self.min_len_masked_rows] = -float("inf")
        token = self.sampling(logp, self.decoded, generator=self.generator)
        if token < self.speech_size:
            self.decoded.append(token)
        row.fill_(-float("inf"))
        row[self.speech_offset + (token if token < self.speech_size else self.eos_row)] = 0.0
        return token

    @property
    def generator(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed)
        return self._generator
