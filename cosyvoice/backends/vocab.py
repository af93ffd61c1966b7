"""The merged vocabulary of the exported LLM: Qwen's text ids, then the speech tokens, then the
three stop tokens and the two prompt markers, in one id space (the spec's HF/TensorRT-LLM layout).

    ids 0 .. T-1            text (the tokenizer with CosyVoice2's special tokens; T = 151663 for
                            CosyVoice2-0.5B)
    T + s, s < S            speech token s, named <|s_s|> (S = 6561)
    T + S + 0, 1, 2         the stop tokens <|eos1|> (EOS), <|eos2|>, <|eos3|> (FILL)
    T + S + 3, T + S + 4    <|sos|> and <|task_id|>, the two rows of `llm_embedding`
    .. rows - 1             padding up to a multiple of 128 (and at least Qwen's own row count)

The speech head's row r (0 <= r < S + 3) is merged id T + r, so speech tokens and stop tokens
map back by subtracting T.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.llm import SpeechLM

ROW_MULTIPLE = 128
STOP_NAMES = ("<|eos1|>", "<|eos2|>", "<|eos3|>")
SOS_NAME, TASK_ID_NAME = "<|sos|>", "<|task_id|>"


def speech_token_name(token: int) -> str:
    return f"<|s_{token}|>"


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class MergedVocab:
    text_size: int     # tokenizer length including CosyVoice2's special tokens
    speech_size: int   # speech codes (the speech head has speech_size + 3 rows)
    qwen_rows: int     # rows of Qwen's own embedding table

    @property
    def speech_offset(self) -> int:
        return self.text_size

    @property
    def head_rows(self) -> int:
        """Rows of the speech head and the speech embedding: codes + stop tokens."""
        return self.speech_size + SpeechLM.n_extra_tokens

    @property
    def stop_ids(self) -> tuple[int, int, int]:
        first = self.speech_offset + self.speech_size
        return first, first + 1, first + 2

    @property
    def eos_id(self) -> int:
        return self.stop_ids[0]

    @property
    def sos_id(self) -> int:
        return self.speech_offset + self.head_rows

    @property
    def task_id(self) -> int:
        return self.sos_id + 1

    @property
    def length(self) -> int:
        """Tokenizer length after the export's tokens are added."""
        return self.task_id + 1

    @property
    def rows(self) -> int:
        """Rows of the exported embedding and lm_head."""
        return round_up(max(self.length, self.qwen_rows), ROW_MULTIPLE)

    def added_token_names(self) -> list[str]:
        """The tokens the export adds to the tokenizer, in id order from `text_size`."""
        names = [speech_token_name(token) for token in range(self.speech_size)]
        return names + list(STOP_NAMES) + [SOS_NAME, TASK_ID_NAME]

    def merged_id(self, head_row: int) -> int:
        """Speech-head row (speech token or stop token) -> merged id."""
        if not 0 <= head_row < self.head_rows:
            raise ValueError(f"speech-head row {head_row} is outside 0..{self.head_rows - 1}")
        return self.speech_offset + head_row

    def head_row(self, merged_id: int) -> int:
        """Merged id of a speech or stop token -> its speech-head row."""
        row = merged_id - self.speech_offset
        if not 0 <= row < self.head_rows:
            raise ValueError(f"id {merged_id} is not a speech or stop token "
                             f"({self.speech_offset}..{self.speech_offset + self.head_rows - 1})")
        return row

    def prompt_ids(self, text_ids: torch.Tensor, prompt_text_ids: torch.Tensor,
                   prompt_speech_tokens: torch.Tensor) -> list[int]:
        """The LLM prompt as merged ids: SOS, prompt text, text, TASK_ID, prompt speech.

        text_ids [1, L], prompt_text_ids [1, Lp] (tokenised separately), prompt_speech_tokens
        [1, P] -> 1 + Lp + L + 1 + P ids, the same sequence SpeechLM.prompt_embeddings embeds.
        """
        text = prompt_text_ids.reshape(-1).tolist() + text_ids.reshape(-1).tolist()
        speech = [self.speech_offset + int(token) for token in prompt_speech_tokens.reshape(-1)]
        return [self.sos_id, *text, self.task_id, *speech]

    def to_dict(self) -> dict:
        return {"text_size": self.text_size, "speech_size": self.speech_size,
                "qwen_rows": self.qwen_rows}
