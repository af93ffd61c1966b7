"""Cutting text that arrives piece by piece (an LLM writing its reply) into segments to speak.

Each segment is synthesised as one utterance, so where the text is cut decides the prosody: the
model gives every segment its own intonation contour, and a cut in the middle of a sentence is
heard as a sentence end. The rule therefore cuts at punctuation only, and as late as it can
without making the listener wait:

1. A cut falls after a sentence end (. ! ? ; … and the full-width 。！？；, or a line break) or
   a clause mark (, : and ，、：), with any closing quotes or brackets kept on the left. An ASCII
   mark counts only when whitespace follows it, so "3.5", "1,000" and "e.g.x" are not cuts, and
   neither is a period after a single letter or a title ("J. Smith", "Mr. Li"). A mark therefore
   counts once the next piece of text has arrived: one delta later, about one LLM token.
2. When the synthesiser is free, everything up to the *last* cut of the buffered text goes as
   one segment, preferring sentence ends: the first segment as soon as there is one, later ones
   whenever the previous segment has finished generating (text written meanwhile is merged, so
   sentences are spoken whole and a fast writer gets long, natural segments).
3. A clause mark is used only where no sentence end is buffered: for the first segment once it
   has MIN_FIRST_WORDS words (speech starts sooner), for later ones once the sentence has run to
   LONG_CLAUSE_WORDS words. A run of MAX_WORDS words without any mark is cut at its last space.
4. `flush()` makes everything buffered so far cuttable, `end()` everything at all. Text that
   arrives whole (all of it before the first cut) becomes one segment, which the model splits
   into sentences exactly as for an HTTP request.
5. No segment is longer than `max_chars` (the server's per-request text limit, which also sizes
   the TensorRT-LLM engine): a longer one ends at its last sentence end, else its last clause
   mark, else its last space within the limit, so a session may speak any amount of text.

Words are counted as runs of letters or digits; a Chinese or Japanese character counts as half
a word.
"""
from __future__ import annotations

import regex

SENTENCE_MARKS = frozenset(".!?;…\n。！？；")
CLAUSE_MARKS = frozenset(",:，、：")
FULL_WIDTH_MARKS = frozenset("…\n。！？；，、：")     # a cut whatever follows them
CLOSERS = frozenset("\"')]}”’»）」』】》")
# A period after one of these is an abbreviation, not a sentence end.
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "sr", "jr", "vs", "e.g", "i.e",
                           "etc", "fig", "approx"})

MIN_FIRST_WORDS = 4       # a clause may end the first segment from this many words on
LONG_CLAUSE_WORDS = 20    # a clause may end a later segment once its sentence is this long
MAX_WORDS = 40            # text without any mark is cut at a space past this many words
MAX_CHARS = 2000          # the longest segment (the server passes its --max-text-chars)

_CJK = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}]")
_WORD = regex.compile(r"[^\s\p{P}\p{S}\p{Han}\p{Hiragana}\p{Katakana}]+")
_LAST_TOKEN = regex.compile(r"(?:^|\s)(\S+)$")


def count_words(text: str) -> float:
    """Runs of letters or digits, plus half a word per Chinese or Japanese character."""
    return len(_WORD.findall(text)) + len(_CJK.findall(text)) / 2


class TextCutter:
    """The text of one session: feed() deltas in, take() segments out. Not thread-safe (one
    session's event loop uses it)."""

    def __init__(self, min_first_words: int = MIN_FIRST_WORDS,
                 long_clause_words: int = LONG_CLAUSE_WORDS, max_words: int = MAX_WORDS,
                 max_chars: int = MAX_CHARS):
        self.min_first_words = min_first_words
        self.long_clause_words = long_clause_words
        self.max_words = max_words
        self.max_chars = max_chars
        self.pending = ""          # received, not yet cut
        self.segments_taken = 0
        self.ended = False
        self._flushed = 0          # pending[:_flushed] may be cut whatever it ends with

    def feed(self, text: str) -> None:
        self.pending += text

    def flush(self) -> None:
        """Everything received so far may be cut, even mid-sentence."""
        self._flushed = len(self.pending)

    def end(self) -> None:
        """No more text: whatever is left is the last segment."""
        self.ended = True

    def take(self) -> str | None:
        """The next segment (stripped; may be only punctuation, which the caller skips), or None
        when the text so far should wait for more."""
        if not self.pending.strip():
            if self.ended:
                self.pending = ""
            return None
        cut = len(self.pending) if self.ended else max(self._flushed, self._cut())
        if cut <= 0:
            return None
        if cut > self.max_chars:
            cut = self._cut_within(self.max_chars)
        segment, self.pending = self.pending[:cut], self.pending[cut:]
        self._flushed = max(0, self._flushed - cut)
        self.segments_taken += 1
        return segment.strip()

    # ---- the rule ------------------------------------------------------------------------------

    def _cut(self) -> int:
        """Where the buffered text may be cut now (0: nowhere yet)."""
        text = self.pending
        sentence_cuts, clause_cuts = self._cut_points(text)
        if sentence_cuts:
            return sentence_cuts[-1]
        needed = self.min_first_words if self.segments_taken == 0 else self.long_clause_words
        for end in reversed(clause_cuts):
            if count_words(text[:end]) >= needed:
                return end
        if count_words(text) >= self.max_words:
            space = max(text.rstrip().rfind(" "), text.rstrip().rfind("\n"))
            return space + 1 if space > 0 else len(text)
        return 0

    def _cut_within(self, limit: int) -> int:
        """The best cut at or before `limit` (< len(pending)): a sentence end, a clause mark, a
        space, or `limit` itself inside a run of text with none of them."""
        text = self.pending
        for cuts in self._cut_points(text):
            fitting = [end for end in cuts if end <= limit]
            if fitting:
                return fitting[-1]
        space = max(text.rfind(" ", 0, limit), text.rfind("\n", 0, limit))
        return space + 1 if space > 0 else limit

    def _cut_points(self, text: str) -> tuple[list[int], list[int]]:
        """Positions after the confirmed sentence ends and after the confirmed clause marks."""
        sentence_cuts, clause_cuts = [], []
        for index, char in enumerate(text):
            if char in SENTENCE_MARKS or char in CLAUSE_MARKS:
                end = self._confirmed_end(text, index)
                if end:
                    (sentence_cuts if char in SENTENCE_MARKS else clause_cuts).append(end)
        return sentence_cuts, clause_cuts

    @staticmethod
    def _confirmed_end(text: str, index: int) -> int:
        """The cut position after the mark at `index` (closing quotes included), or 0 when the
        mark is not a cut or it is too early to tell."""
        end = index + 1
        while end < len(text) and text[end] in CLOSERS:
            end += 1
        if end >= len(text):
            return 0                      # what follows decides: wait for the next delta
        mark = text[index]
        if mark in FULL_WIDTH_MARKS:
            return end
        if not text[end].isspace():
            return 0                      # "3.5", "1,000", "e.g.x", "?!"
        if mark == ".":
            token = _LAST_TOKEN.search(text[:index])
            word = token.group(1).lstrip("\"'([{“‘").lower() if token else ""
            if (len(word) == 1 and word.isalpha()) or word in ABBREVIATIONS:
                return 0
        return end
