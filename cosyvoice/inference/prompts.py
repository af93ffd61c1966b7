"""How each generation writes the text its LLM reads besides the text to speak.

CosyVoice2 reads a zero-shot transcript or an instruction as given (an instruction ends in
<|endofprompt|>). CosyVoice3 was trained with a system part before every prompt and requires
<|endofprompt|> in its input: zero_shot puts the prefix before the transcript, instruct2 wraps
the instruction in it, and cross_lingual and sft, which have no prompt text, put it before the
text to speak. Text that already holds <|endofprompt|> is taken as written, so a caller can
send exactly what the reference examples send.
"""
from __future__ import annotations

from ..frontend.tokenizer import END_OF_PROMPT

SYSTEM_PROMPT = "You are a helpful assistant."


class CosyVoice2Prompts:
    def transcript(self, transcript: str) -> str:
        """The LLM prompt text of zero_shot (normalised afterwards like any text)."""
        return transcript

    def instruction(self, instruct: str) -> str:
        return instruct if END_OF_PROMPT in instruct else instruct + END_OF_PROMPT

    def unprompted_text(self, segment: str) -> str:
        """A segment to speak in a mode without prompt text (cross_lingual, sft)."""
        return segment


class CosyVoice3Prompts:
    def transcript(self, transcript: str) -> str:
        # With the prefix the text holds special-token markup, so the normaliser leaves the
        # transcript as written: the reference does the same.
        return transcript if END_OF_PROMPT in transcript else SYSTEM_PROMPT + END_OF_PROMPT + transcript

    def instruction(self, instruct: str) -> str:
        # The reference's instructions read "You are a helpful assistant. 请用广东话表达。<|endofprompt|>",
        # with a space after the period.
        return instruct if END_OF_PROMPT in instruct else f"{SYSTEM_PROMPT} {instruct}{END_OF_PROMPT}"

    def unprompted_text(self, segment: str) -> str:
        # The reference expects callers to put the prefix into the text itself, which then skips
        # normalisation and splitting; we normalise and split the caller's text first and prefix
        # each segment, so long texts and numbers are spoken as in the other modes.
        return segment if END_OF_PROMPT in segment else SYSTEM_PROMPT + END_OF_PROMPT + segment
