"""The speech language models: a Qwen2 body that reads text and writes speech tokens.

Input sequence for one utterance (all embeddings, width H):

    [SOS] + qwen_embed(prompt_text_ids + text_ids) + [TASK_ID] + speech_embed(prompt_speech_tokens)

The Qwen body's final (normed) hidden state goes through `llm_decoder`, a linear head over the
speech vocabulary: `speech_token_size` codes followed by stop ids. Qwen's own `lm_head` is never
used; it exists only so the official `llm.pt` (which stores it) loads with strict key matching.

    generation   class          SOS / TASK_ID                     ids after the codes    head bias
    CosyVoice2   SpeechLM       rows 0 / 1 of `llm_embedding`     3 (EOS first)          yes
    CosyVoice3   CosyVoice3LM   rows 6561 / 6563 of speech_embed  200 (all stop)         no
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

SOS_ROW, TASK_ID_ROW = 0, 1      # rows of CosyVoice2's llm_embedding
MIN_TOKEN_TEXT_RATIO, MAX_TOKEN_TEXT_RATIO = 2, 20   # speech tokens per text token (spec 4.2)


def token_length_limits(n_text_tokens: int, min_ratio: float = MIN_TOKEN_TEXT_RATIO,
                        max_ratio: float = MAX_TOKEN_TEXT_RATIO) -> tuple[int, int]:
    """(min, max) speech tokens for a text of `n_text_tokens` tokens (the prompt text does not
    count): the one definition every LLM backend uses."""
    return int(n_text_tokens * min_ratio), int(n_text_tokens * max_ratio)


class QwenBody(nn.Module):
    """A `transformers` Qwen2ForCausalLM built from a config.

    Keeping the ForCausalLM wrapper gives the checkpoint's key layout (`model.model.*`,
    `model.lm_head.weight`); inference calls only `self.model.model`, the transformer body.
    `random_init=False` skips drawing random weights (18 s for Qwen2-0.5B on two CPU cores) and
    leaves the parameters uninitialised: only for a caller that loads a full checkpoint next.
    """

    def __init__(self, pretrain_path: str, qwen_config: dict | None = None, random_init: bool = True):
        super().__init__()
        if qwen_config is not None:
            config = Qwen2Config(**qwen_config)
        else:
            config = Qwen2Config.from_pretrained(pretrain_path)
        config.use_cache = True
        if random_init:
            self.model = Qwen2ForCausalLM(config)
            return
        with torch.device("meta"):
            model = Qwen2ForCausalLM(config)
        model.to_empty(device="cpu")
        model.tie_weights()   # to_empty unties them: keep one copy of the shared embedding/head matrix
        # The rotary frequencies are computed, not loaded: build them for real.
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
        self.model = model

    @property
    def config(self) -> Qwen2Config:
        return self.model.config

    @property
    def body(self) -> nn.Module:
        """The transformer body (embeddings, layers, final norm) without any head."""
        return self.model.model

    def forward(self, inputs_embeds: torch.Tensor, cache=None):
        """inputs_embeds [B, T, H] (+ an optional KV cache) -> (hidden [B, T, H] after the final
        norm, the updated cache)."""
        out = self.model.model(inputs_embeds=inputs_embeds, past_key_values=cache, use_cache=True)
        return out.last_hidden_state, out.past_key_values


class SpeechLM(nn.Module):
    """Qwen2-based speech-token LM of CosyVoice2 (the yaml's `Qwen2LM`)."""

    n_extra_tokens = 3   # ids after the speech codes: EOS, a second stop id, FILL (bistream)

    def __init__(self, llm_input_size: int, llm_output_size: int, speech_token_size: int,
                 llm: QwenBody, sampling: Callable[..., int]):
        super().__init__()
        self.speech_token_size = speech_token_size
        self.llm_embedding = nn.Embedding(2, llm_input_size)
        self.llm = llm
        self.llm_decoder = nn.Linear(llm_output_size, speech_token_size + self.n_extra_tokens)
        self.speech_embedding = nn.Embedding(speech_token_size + self.n_extra_tokens, llm_input_size)
        self.sampling = sampling

    @property
    def body(self) -> nn.Module:
        """The Qwen transformer body, for callers that run it on their own KV cache."""
        return self.llm.body

    @property
    def vocab_size(self) -> int:
        """Rows of the head: speech codes, then the extra (stop and control) ids."""
        return self.speech_token_size + self.n_extra_tokens

    @property
    def min_len_masked_token(self) -> int:
        """The id masked while a request is below its minimum length. In CosyVoice2 this is EOS.
        CosyVoice3's reference masks the same index, which there is SOS: see CosyVoice3LM."""
        return self.speech_token_size

    @property
    def eos_token(self) -> int:
        return self.speech_token_size

    def is_stop_token(self, token: int) -> bool:
        return token >= self.speech_token_size

    def special_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(SOS, TASK_ID) embeddings, each [1, 1, H]."""
        rows = self.llm_embedding.weight
        return rows[SOS_ROW].reshape(1, 1, -1), rows[TASK_ID_ROW].reshape(1, 1, -1)


    def prompt_embeddings(self, text_ids: torch.Tensor, prompt_text_ids: torch.Tensor,
                          prompt_speech_tokens: torch.Tensor) -> torch.Tensor:
        """Builds the LLM input sequence.

        text_ids [1, L] and prompt_text_ids [1, Lp] (Qwen ids, tokenised separately),
        prompt_speech_tokens [1, P] (may be empty) -> embeddings [1, 1 + Lp + L + 1 + P, H].
        """
        device = self.speech_embedding.weight.device
        text = torch.cat([prompt_text_ids, text_ids], dim=1).to(device=device, dtype=torch.long)
        text_embeds = self.body.embed_tokens(text)                                 # [1, Lp+L, H]
        sos, task_id = self.special_embeddings()
        speech = self.speech_embedding(prompt_speech_tokens.to(device=device, dtype=torch.long))
        return torch.cat([sos, text_embeds, task_id, speech], dim=1)

    def head_log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> log-probabilities over the speech vocabulary [..., V], float32."""
        return self.llm_decoder(hidden).float().log_softmax(dim=-1)

    @torch.inference_mode()
    def log_probs(self, prompt_embeds: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: the distribution of each next token after the prompt and after
        each token of `continuation`.

        prompt_embeds [1, T, H], continuation [n] speech tokens -> [n + 1, V]; row 0 is the
        first decode step, row i the step after feeding continuation[i - 1].
        """
        tokens = continuation.to(prompt_embeds.device, torch.long).reshape(1, -1)
        inputs = torch.cat([prompt_embeds, self.speech_embedding(tokens)], dim=1)
        hidden, _ = self.llm(inputs)                                  # [1, T + n, H]
        return self.head_log_probs(hidden[0, prompt_embeds.shape[1] - 1:])

    @torch.inference_mode()
    def generate(self, text_ids: torch.Tensor, prompt_text_ids: torch.Tensor,
                 prompt_speech_tokens: torch.Tensor, *, sampling: Callable[..., int] | None = None,
                 generator: torch.Generator | None = None,
                 min_token_text_ratio: float = MIN_TOKEN_TEXT_RATIO,
                 max_token_text_ratio: float = MAX_TOKEN_TEXT_RATIO) -> Iterator[int]:
        """Yields speech tokens one by one until a stop token or the length limit.

        The limits count only the text to speak (`text_ids`, not the prompt text): at least
        `min_token_text_ratio` and at most `max_token_text_ratio` tokens per text token. Only
        `min_len_masked_token` is blocked before the minimum; the other stop ids may end
        generation early. `sampling(logp [V], decoded_tokens, generator=...) -> token` defaults
        to the yaml's.
        """
        sample = sampling or self.sampling
        min_len, max_len = token_length_limits(text_ids.shape[1], min_token_text_ratio, max_token_text_ratio)
        inputs = self.prompt_embeddings(text_ids, prompt_text_ids, prompt_speech_tokens)
        cache = None
        decoded: list[int] = []
        for step in range(max_len):
            hidden, cache = self.llm(inputs, cache)
            logp = self.head_log_probs(hidden[0, -1])                  # [V]
            if step < min_len:
                logp[self.min_len_masked_token] = -float("inf")
            token = sample(logp, decoded, generator=generator)
            if self.is_stop_token(token):
                return
            decoded.append(token)
            yield token
            inputs = self.speech_embedding.weight[token].reshape(1, 1, -1)


class CosyVoice3LM(SpeechLM):
    """The speech LM of CosyVoice3 (the yaml's `CosyVoice3LM`).

    Same body and loop as CosyVoice2; what differs is where the specials live and the head:
    SOS, EOS, TASK_ID and FILL are rows 6561..6564 of `speech_embedding` (no `llm_embedding`),
    the head has no bias, and every one of the 200 ids after the codes stops generation. Its
    text must hold <|endofprompt|>, which cosyvoice.inference.prompts sees to.
    """

    n_extra_tokens = 200
    SOS, EOS, TASK_ID, FILL = 0, 1, 2, 3   # offsets from speech_token_size

    def __init__(self, llm_input_size: int, llm_output_size: int, speech_token_size: int,
                 llm: QwenBody, sampling: Callable[..., int]):
        nn.Module.__init__(self)
        self.speech_token_size = speech_token_size
        self.llm = llm
        self.llm_decoder = nn.Linear(llm_output_size, speech_token_size + self.n_extra_tokens, bias=False)
        self.speech_embedding = nn.Embedding(speech_token_size + self.n_extra_tokens, llm_input_size)
        self.sampling = sampling

    @property
    def eos_token(self) -> int:
        return self.speech_token_size + self.EOS

    # The reference masks index speech_token_size below the minimum length, which in CosyVoice3
    # is SOS, not EOS: EOS and the other stop ids stay allowed, so generation may end before the
    # minimum. We match it (parity with the official runtime); min_len_masked_token says so.

    def special_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.speech_embedding.weight
        sos, task_id = self.speech_token_size + self.SOS, self.speech_token_size + self.TASK_ID
        return rows[sos].reshape(1, 1, -1), rows[task_id].reshape(1, 1, -1)
