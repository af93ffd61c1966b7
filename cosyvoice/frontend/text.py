"""Text normalisation and splitting, as CosyVoice2's frontend does it.

Two normalisers, chosen once at start:
- ttsfrd (Alibaba's frontend; Python 3.10 wheels only) when it imports and its resource folder
  is found. It splits into sentences itself.
- wetext (>= 0.1, ships its FSTs, works offline) otherwise, followed by CosyVoice's own clean-up
  rules and `split_paragraph`.

Text that contains `<|` and `|>` (special-token markup) is passed through untouched. Empty text
and text made only of punctuation give no segments.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Callable

import regex

log = logging.getLogger("cosyvoice.frontend")

ZH_SENTENCE_MARKS = "。？！；：、.?!;"
EN_SENTENCE_MARKS = ".?!;:"
CLOSING_QUOTES = '"”'
_ONLY_PUNCTUATION = regex.compile(r"^[\p{P}\p{S}]*$")
_NOTHING_TO_SAY = regex.compile(r"^[\p{P}\p{S}\p{Z}\s]*$")   # punctuation, symbols, spaces
_DIGIT_RUN = re.compile(r"\d+")   # str.isdigit runs: ASCII and other Unicode digits
_TRAILING_COMMAS = re.compile(r"[，,、]+$")


def contains_chinese(text: str) -> bool:
    return any("\u4e00" <= char <= "\u9fff" for char in text)


def remove_blanks(text: str) -> str:
    """Drops every space except those between two ASCII, non-space characters ("PDF file")."""
    def is_ascii_word_char(char: str) -> bool:
        return char != "" and char != " " and char.isascii()

    kept = []
    for i, char in enumerate(text):
        before = text[i - 1] if i > 0 else ""
        after = text[i + 1] if i + 1 < len(text) else ""
        if char == " " and not (is_ascii_word_char(before) and is_ascii_word_char(after)):
            continue
        kept.append(char)
    return "".join(kept)


def split_paragraph(text: str, length: Callable[[str], int], lang: str, max_len: int = 80,
                    min_len: int = 60, merge_len: int = 20) -> list[str]:
    """Cuts text after sentence marks, then greedily merges the pieces into segments.

    `length` measures a piece (characters for Chinese, tokens for English). A segment is closed
    before a piece that would push it past `max_len`, provided it already exceeds `min_len`; a
    short tail (< `merge_len`) joins the previous segment.
    """
    marks = ZH_SENTENCE_MARKS if lang == "zh" else EN_SENTENCE_MARKS
    if text[-1] not in marks:
        text += "。" if lang == "zh" else "."
    pieces: list[str] = []
    start = 0
    for i, char in enumerate(text):
        if char not in marks:
            continue
        if i > start:
            pieces.append(text[start:i] + char)
        start = i + 1
        if start < len(text) and text[start] in CLOSING_QUOTES:
            if pieces:
                pieces[-1] += text[start]
            start += 1

    segments: list[str] = []
    current = ""
    for piece in pieces:
        if length(current + piece) > max_len and length(current) > min_len:
            segments.append(current)
            current = ""
        current += piece
    if current:
        if length(current) < merge_len and segments:
            segments[-1] += current
        else:
            segments.append(current)
    return segments


def spell_out_numbers(text: str, number_to_words: Callable[[str], str]) -> str:
    return _DIGIT_RUN.sub(lambda match: number_to_words(match.group()), text)


class TtsFrdNormalizer:
    """ttsfrd's voice-generation frontend: returns the text as a list of normalised sentences."""

    def __init__(self, resource_dir: Path):
        import ttsfrd  # only importable where its wheels are installed (Python 3.10)

        self.engine = ttsfrd.TtsFrontendEngine()
        if not self.engine.initialize(str(resource_dir)):
            raise RuntimeError(f"ttsfrd could not initialise from {resource_dir}")
        self.engine.set_lang_type("pinyinvg")

    def sentences(self, text: str) -> list[str]:
        result = json.loads(self.engine.do_voicegen_frd(text))
        return [sentence["text"] for sentence in result["sentences"]]


class TextNormalizer:
    """Normalises and splits text to speak. `count_tokens` measures English pieces."""

    def __init__(self, count_tokens: Callable[[str], int], ttsfrd_resource: Path | None = None):
        self.count_tokens = count_tokens
        self.ttsfrd = self._load_ttsfrd(ttsfrd_resource)
        self.wetext = None
        if self.ttsfrd is None:
            from wetext import Normalizer

            self.wetext = Normalizer(lang="auto", operator="tn", remove_erhua=False)
        self._inflect = None   # loaded on first use: importing inflect takes seconds

    @staticmethod
    def _load_ttsfrd(resource_dir: Path | None) -> TtsFrdNormalizer | None:
        if resource_dir is None or not Path(resource_dir).is_dir():
            return None
        try:
            return TtsFrdNormalizer(Path(resource_dir))
        except ImportError:
            return None

    @property
    def engine(self) -> str:
        return "ttsfrd" if self.ttsfrd is not None else "wetext"

    def normalize(self, text: str) -> str:
        """The normalised text as one string (used for prompt texts)."""
        if self._passthrough(text):
            return text
        text = text.strip()
        if _NOTHING_TO_SAY.match(text):   # (wetext fails an assertion on such text)
            return ""
        if self.ttsfrd is not None:
            return "".join(self.ttsfrd.sentences(text))
        return self._clean_zh(text) if contains_chinese(text) else self._clean_en(text)

    def split(self, text: str) -> list[str]:
        """The normalised text cut into segments, each synthesised on its own. Segments made only
        of punctuation or symbols are dropped, so the list may be empty."""
        if self._passthrough(text):
            return [text]
        text = text.strip()
        if _NOTHING_TO_SAY.match(text):   # (wetext fails an assertion on such text)
            return []
        if self.ttsfrd is not None:
            segments = self.ttsfrd.sentences(text)
        elif contains_chinese(text):
            segments = split_paragraph(self._clean_zh(text), len, "zh")
        else:
            segments = split_paragraph(self._clean_en(text), self.count_tokens, "en")
        return [s for s in segments if not _ONLY_PUNCTUATION.match(s)]

    @staticmethod
    def _passthrough(text: str) -> bool:
        return "<|" in text and "|>" in text

    def _wetext(self, text: str) -> str:
        """wetext's normalisation, or the text unchanged where wetext's parser gives up (it fails
        an internal assertion on some symbol/digit mixes, e.g. "²3")."""
        try:
            return self.wetext.normalize(text)
        except AssertionError:
            log.warning("wetext could not normalise %r; using it as written", text[:80])
            return text

    def _clean_zh(self, text: str) -> str:
        text = self._wetext(text)
        text = remove_blanks(text.replace("\n", ""))
        text = text.replace("²", "平方").replace("³", "立方")
        text = text.replace(".", "。").replace(" - ", "，")
        text = re.sub(r"[（）【】`]", "", text).replace("——", " ")
        return _TRAILING_COMMAS.sub("。", text)

    def _clean_en(self, text: str) -> str:
        text = self._wetext(text)
        if not _DIGIT_RUN.search(text):   # wetext usually spells numbers out already
            return text
        if self._inflect is None:
            import inflect

            self._inflect = inflect.engine()
        return spell_out_numbers(text, self._inflect.number_to_words)
