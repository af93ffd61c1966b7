"""The CosyVoice2 speech language model: a Qwen2 body that reads text and writes speech tokens.

Input sequence for one utterance (all embeddings, width H):

    [SOS] + qwen_embed(prompt_text_ids + text_ids) + [TASK_ID] + speech_embed(prompt_speech_tokens)

SOS and TASK_ID are the two rows of `llm_embedding`, not vocabulary ids. The Qwen body's final
(normed) hidden state goes through `llm_decoder`, a linear head over the speech vocabulary:
`speech_token_size` codes followed by three stop ids (EOS first). Qwen's own `lm_head` is never
used; it exists only so the official `llm.pt` (which stores it) loads with strict key matching.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

SOS_ROW, TASK_ID_ROW = 0, 1
N_STOP_TOKENS = 3  # EOS, a second stop id, and the FILL id used by bidirectional streaming
MIN_TOKEN_TEXT_RATIO, MAX_TOKEN_TEXT_RATIO = 2, 20   # speech tokens per text token (spec 4.2)


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

    def forward(self, inputs_embeds: torch.Tensor, cache=None):
        """inputs_embeds [B, T, H] (+ an optional KV cache) -> (hidden [B, T, H] after the final
        norm, the updated cache)."""
        out = self.model.model(inputs_embeds=inputs_embeds, past_key_values=cache, use_cache=True)
        return out.last_hidden_state, out.past_key_values


class SpeechLM(nn.Module):
    """Qwen2-based speech-token LM (the yaml's `Qwen2LM`)."""

    def __init__(self, llm_input_size: int, llm_output_size: int, speech_token_size: int,
                 llm: QwenBody, sampling: Callable[..., int]):
        super().__init__()
        self.speech_token_size = speech_token_size
        self.llm_embedding = nn.Embedding(2, llm_input_size)
        self.llm = llm
        self.llm_decoder = nn.Linear(llm_output_size, speech_token_size + N_STOP_TOKENS)
        self.speech_embedding = nn.Embedding(speech_token_size + N_STOP_TOKENS, llm_input_size)
        self.sampling = sampling

    @property
    def eos_token(self) -> int:
        return self.speech_token_size

    def is_stop_token(self, token: int) -> bool:
        return token >= self.speech_token_size

    def prompt_embeddings(self, text_ids: torch.Tensor, prompt_text_ids: torch.Tensor,
                          prompt_speech_tokens: torch.Tensor) -> torch.Tensor:
        """Builds the LLM input sequence.

        text_ids [1, L] and prompt_text_ids [1, Lp] (Qwen ids, tokenised separately),
        prompt_speech_tokens [1, P] (may be empty) -> embeddings [1, 1 + Lp + L + 1 + P, H].
        """
        device = self.llm_embedding.weight.device
        text = torch.cat([prompt_text_ids, text_ids], dim=1).to(device=device, dtype=torch.long)
        text_embeds = self.llm.model.model.embed_tokens(text)                      # [1, Lp+L, H]
        sos = self.llm_embedding.weight[SOS_ROW].reshape(1, 1, -1)
        task_id = self.llm_embedding.weight[TASK_ID_ROW].reshape(1, 1, -1)
        speech = self.speech_embedding(prompt_speech_tokens.to(device=device, dtype=torch.long))
        return torch.cat([sos, text_embeds, task_id, speech], dim=1)

    def _log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
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
        return self._log_probs(hidden[0, prompt_embeds.shape[1] - 1:])

    @torch.inference_mode()
    def generate(self, text_ids: torch.Tensor, prompt_text_ids: torch.Tensor,
                 prompt_speech_tokens: torch.Tensor, *, sampling: Callable[..., int] | None = None,
                 generator: torch.Generator | None = None,
                 min_token_text_ratio: float = MIN_TOKEN_TEXT_RATIO,
                 max_token_text_ratio: float = MAX_TOKEN_TEXT_RATIO) -> Iterator[int]:
        """Yields speech tokens one by one until a stop token or the length limit.

        The limits count only the text to speak (`text_ids`, not the prompt text): at least
        `min_token_text_ratio` and at most `max_token_text_ratio` tokens per text token. Only
        EOS is blocked before the minimum; the other stop ids may end generation early.
        `sampling(logp [V], decoded_tokens, generator=...) -> token` defaults to the yaml's.
        """
        sample = sampling or self.sampling
        n_text = text_ids.shape[1]
        min_len, max_len = int(n_text * min_token_text_ratio), int(n_text * max_token_text_ratio)
        inputs = self.prompt_embeddings(text_ids, prompt_text_ids, prompt_speech_tokens)
        cache = None
        decoded: list[int] = []
        for step in range(max_len):
            hidden, cache = self.llm(inputs, cache)
            logp = self._log_probs(hidden[0, -1])                      # [V]
            if step < min_len:
                logp[self.eos_token] = -float("inf")
            token = sample(logp, decoded, generator=generator)
            if self.is_stop_token(token):
                return
            decoded.append(token)
            yield token
            inputs = self.speech_embedding.weight[token].reshape(1, 1, -1)
