"""The Qwen2 BPE tokenizer of `CosyVoice-BlankEN`, with CosyVoice2's special tokens added."""
from __future__ import annotations

import threading
from pathlib import Path

from transformers import AutoTokenizer

# Added in this order, so their ids follow the base vocabulary in this order (the first two
# already exist in the base tokenizer and keep their ids).
SPECIAL_TOKENS = [
    "<|im_start|>", "<|im_end|>", "<|endofprompt|>", "[breath]", "<strong>", "</strong>", "[noise]",
    "[laughter]", "[cough]", "[clucking]", "[accent]", "[quick_breath]", "<laughter>", "</laughter>",
    "[hissing]", "[sigh]", "[vocalized-noise]", "[lipsmack]", "[mn]",
]
END_OF_PROMPT = "<|endofprompt|>"


class QwenTokenizer:
    """Encodes text to Qwen ids (no BOS/EOS added). Safe to call from several threads."""

    def __init__(self, path: str | Path):
        self._tokenizer = AutoTokenizer.from_pretrained(str(path))
        self._tokenizer.add_special_tokens({
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "additional_special_tokens": SPECIAL_TOKENS,
        })
        # Rust-backed tokenizers refuse concurrent use of one instance ("Already borrowed").
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._tokenizer)

    def encode(self, text: str) -> list[int]:
        with self._lock:
            return self._tokenizer([text])["input_ids"][0]

    def decode(self, ids: list[int]) -> str:
        """Ids back to text, special tokens included."""
        with self._lock:
            return self._tokenizer.decode(ids, skip_special_tokens=False)

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def token_id(self, token: str) -> int:
        return self._tokenizer.convert_tokens_to_ids(token)
