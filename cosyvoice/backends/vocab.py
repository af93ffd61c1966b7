"""The merged vocabulary of the exported LLM: Qwen's text ids, then the speech head's rows (speech
codes and the extra ids after them), in one id space (the spec's HF/TensorRT-LLM layout). One
layout, parametrised by the LLM: how many extra ids follow the codes, which one is EOS, and where
the prompt markers SOS and TASK_ID come from.

    ids 0 .. T-1          text (the tokenizer with the generation's special tokens)
    T + r, r < S + E      speech-head row r: speech code r (< S, named <|s_r|>), then the E extra
                          ids, every one of which stops generation
    [T + S + E, +1]       SOS and TASK_ID, only where they are not head rows (CosyVoice2)
    .. rows - 1           padding up to a multiple of 128 (and at least Qwen's own row count)

    generation   T        S      E    EOS      SOS / TASK_ID             rows
    CosyVoice2   151663   6561   3    T+6561   own ids 158227 / 158228   158336
    CosyVoice3   151924   6561   200  T+6562   head rows: 158485/158487  158720

(T for the official tokenizers.) The extra ids are named <|eos1|> (EOS), <|sos|>, <|task_id|>,
<|fill|> (CosyVoice3's FILL), and <|eos{i+1}|> for the i-th extra id otherwise: CosyVoice2's three
are <|eos1|> <|eos2|> <|eos3|> as in the spec's format; CosyVoice3's unused ones (6565..6760)
are <|eos5|>..<|eos200|>, stops by their name, unlike the reference's converter, which names them
<|s_6565|>.. so that a `<|s_N|>` parser hands the flow a token it has no row for.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

ROW_MULTIPLE = 128
EOS_NAME, SOS_NAME, TASK_ID_NAME, FILL_NAME = "<|eos1|>", "<|sos|>", "<|task_id|>", "<|fill|>"


def speech_token_name(token: int) -> str:
    return f"<|s_{token}|>"


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class MergedVocab:
    text_size: int                 # tokenizer length including the generation's special tokens
    speech_size: int               # speech codes S
    qwen_rows: int                 # rows of Qwen's own embedding table
    n_extra: int = 3               # head rows after the codes, all stop ids (CosyVoice2: 3)
    eos_extra: int = 0             # EOS = extra id number eos_extra (head row S + eos_extra)
    sos_extra: int | None = None   # SOS / TASK_ID / FILL as extra ids; None: SOS and TASK_ID get
    task_id_extra: int | None = None   # ids of their own after the head (CosyVoice2's llm_embedding)
    fill_extra: int | None = None

    def __post_init__(self):
        if (self.sos_extra is None) != (self.task_id_extra is None):
            raise ValueError("SOS and TASK_ID are either both speech-head rows or both separate ids")
        named = [i for i in (self.eos_extra, self.sos_extra, self.task_id_extra, self.fill_extra) if i is not None]
        if len(set(named)) != len(named) or not all(0 <= i < self.n_extra for i in named):
            raise ValueError(f"extra ids {named} must be distinct and below {self.n_extra}")
        if self.text_size > self.qwen_rows:
            raise ValueError(f"the tokenizer has {self.text_size} ids but Qwen's embedding only "
                             f"{self.qwen_rows} rows")

    @classmethod
    def for_llm(cls, llm, text_size: int) -> "MergedVocab":
        """The layout of a SpeechLM (CosyVoice2) or CosyVoice3LM, given the tokenizer's length.

        Extra ids are the head rows after the codes; SOS and TASK_ID are head rows where the LLM
        has no `llm_embedding` (then its SOS/TASK_ID/FILL offsets say which)."""
        size = llm.speech_token_size
        n_extra = llm.vocab_size - size
        stops = [row for row in range(llm.vocab_size) if llm.is_stop_token(row)]
        if stops != list(range(size, llm.vocab_size)):
            raise ValueError(f"{type(llm).__name__}: the merged layout needs the stop ids to be "
                             f"exactly the head rows after the {size} codes")
        markers = {}
        if not hasattr(llm, "llm_embedding"):
            markers = {"sos_extra": llm.SOS, "task_id_extra": llm.TASK_ID, "fill_extra": llm.FILL}
        return cls(text_size, size, llm.body.embed_tokens.num_embeddings, n_extra=n_extra,
                   eos_extra=llm.eos_token - size, **markers)

    @property
    def speech_offset(self) -> int:
        return self.text_size

    @property
    def head_rows(self) -> int:
        """Rows of the speech head and the speech embedding: codes + extra ids."""
        return self.speech_size + self.n_extra

    @property
    def markers_in_head(self) -> bool:
        return self.sos_extra is not None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Every extra id (generation stops on any of them), EOS among them."""
        first = self.speech_offset + self.speech_size
        return tuple(range(first, first + self.n_extra))

    def is_stop_id(self, merged_id: int) -> bool:
        return self.stop_ids[0] <= merged_id <= self.stop_ids[-1]

    @property
    def eos_row(self) -> int:
        return self.speech_size + self.eos_extra

    @property
    def eos_id(self) -> int:
        return self.speech_offset + self.eos_row

    @property
    def sos_id(self) -> int:
        if self.markers_in_head:
            return self.speech_offset + self.speech_size + self.sos_extra
        return self.speech_offset + self.head_rows

    @property
    def task_id(self) -> int:
        if self.markers_in_head:
            return self.speech_offset + self.speech_size + self.task_id_extra
        return self.speech_offset + self.head_rows + 1

    @property
    def length(self) -> int:
        """Tokenizer length after the export's tokens are added."""
        return self.speech_offset + self.head_rows + (0 if self.markers_in_head else 2)

    @property
    def rows(self) -> int:
        """Rows of the exported embedding and lm_head."""
        return round_up(max(self.length, self.qwen_rows), ROW_MULTIPLE)

    def extra_name(self, extra: int) -> str:
        names = {self.eos_extra: EOS_NAME, self.sos_extra: SOS_NAME, self.task_id_extra: TASK_ID_NAME,
                 self.fill_extra: FILL_NAME}
        return names.get(extra, f"<|eos{extra + 1}|>")

    def added_token_names(self) -> list[str]:
        """The tokens the export adds to the tokenizer, in id order from `text_size`."""
        names = [speech_token_name(token) for token in range(self.speech_size)]
        names += [self.extra_name(extra) for extra in range(self.n_extra)]
        if not self.markers_in_head:
            names += [SOS_NAME, TASK_ID_NAME]
        if len(set(names)) != len(names):
            raise ValueError("the export's token names are not distinct")
        return names

    def merged_id(self, head_row: int) -> int:
        """Speech-head row (speech code or extra id) -> merged id."""
        if not 0 <= head_row < self.head_rows:
            raise ValueError(f"speech-head row {head_row} is outside 0..{self.head_rows - 1}")
        return self.speech_offset + head_row

    def head_row(self, merged_id: int) -> int:
        """Merged id of a speech code or extra id -> its speech-head row."""
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
        speech = prompt_speech_tokens.reshape(-1).tolist()
        if not all(0 <= token < self.speech_size for token in speech):
            raise ValueError(f"prompt speech tokens must be codes 0..{self.speech_size - 1}")
        return [self.sos_id, *text, self.task_id, *(self.speech_offset + token for token in speech)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MergedVocab":
        """Reads `to_dict`'s fields (those of an older export, without the extra-id fields, are
        CosyVoice2's layout)."""
        fields = ("text_size", "speech_size", "qwen_rows", "n_extra", "eos_extra", "sos_extra",
                  "task_id_extra", "fill_extra")
        return cls(**{name: data[name] for name in fields if name in data})
