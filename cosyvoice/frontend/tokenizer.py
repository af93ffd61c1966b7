"""The Qwen2 BPE tokenizer of `CosyVoice-BlankEN`, with each generation's special tokens added.

The added tokens get ids after the base vocabulary in list order, so the lists below are part
of the model: CosyVoice3's adds `<|endofsystem|>`, 84 CMU phones and 176 pinyin units (written
in brackets, e.g. `[AH0]`, `[ǐ]`) for pronunciation control, each one token.
"""
from __future__ import annotations

import threading
from pathlib import Path

from transformers import AutoTokenizer

# Added in this order, so their ids follow the base vocabulary in this order (the first two
# already exist in the base tokenizer and keep their ids).
COSYVOICE2_SPECIAL_TOKENS = [
    "<|im_start|>", "<|im_end|>", "<|endofprompt|>", "[breath]", "<strong>", "</strong>", "[noise]",
    "[laughter]", "[cough]", "[clucking]", "[accent]", "[quick_breath]", "<laughter>", "</laughter>",
    "[hissing]", "[sigh]", "[vocalized-noise]", "[lipsmack]", "[mn]",
]
# CMU (ARPAbet) phones with stress digits, and pinyin initials and tone-marked finals.
_CMU_PHONES = """
    AA AA0 AA1 AA2 AE AE0 AE1 AE2 AH AH0 AH1 AH2 AO AO0 AO1 AO2 AW AW0 AW1 AW2 AY AY0 AY1 AY2 B
    CH D DH EH EH0 EH1 EH2 ER ER0 ER1 ER2 EY EY0 EY1 EY2 F G HH IH IH0 IH1 IH2 IY IY0 IY1 IY2 JH
    K L M N NG OW OW0 OW1 OW2 OY OY0 OY1 OY2 P R S SH T TH UH UH0 UH1 UH2 UW UW0 UW1 UW2 V W Y Z
    ZH
""".split()
_PINYIN_UNITS = """
    a ai an ang ao b c ch d e ei en eng f g h i ian in ing iu ià iàn iàng iào iá ián iáng iáo iè
    ié iòng ióng iù iú iā iān iāng iāo iē iě iōng iū iǎ iǎn iǎng iǎo iǒng iǔ j k l m n o ong ou
    p q r s sh t u uang ue un uo uà uài uàn uàng uá uái uán uáng uè ué uì uí uò uó uā uāi uān
    uāng uē uě uī uō uǎ uǎi uǎn uǎng uǐ uǒ vè w x y z zh à ài àn àng ào á ái án áng áo è èi èn
    èng èr é éi én éng ér ì ìn ìng í ín íng ò òng òu ó óng óu ù ùn ú ún ā āi ān āng āo ē ēi ēn
    ēng ě ěi ěn ěng ěr ī īn īng ō ōng ōu ū ūn ǎ ǎi ǎn ǎng ǎo ǐ ǐn ǐng ǒ ǒng ǒu ǔ ǔn ǘ ǚ ǜ
""".split()
COSYVOICE3_SPECIAL_TOKENS = (COSYVOICE2_SPECIAL_TOKENS + ["<|endofsystem|>"]
                             + [f"[{phone}]" for phone in _CMU_PHONES]
                             + [f"[{unit}]" for unit in _PINYIN_UNITS])
END_OF_PROMPT = "<|endofprompt|>"


class QwenTokenizer:
    """Encodes text to Qwen ids (no BOS/EOS added). Safe to call from several threads."""

    def __init__(self, path: str | Path, special_tokens: list[str] = COSYVOICE2_SPECIAL_TOKENS):
        self._tokenizer = AutoTokenizer.from_pretrained(str(path))
        self._tokenizer.add_special_tokens({
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "additional_special_tokens": special_tokens,
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
