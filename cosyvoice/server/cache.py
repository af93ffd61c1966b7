"""Answers repeated identical requests (same text, voice, mode and parameters) from memory.

Entries are the float32 chunks of a finished synthesis, so one entry serves every audio format.
Least recently used entries are dropped once the total passes the byte budget.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

import numpy as np


class ResponseCache:
    """Used from the event loop only, so it needs no lock."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, list[np.ndarray]] = OrderedDict()
        self._bytes = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: Hashable) -> list[np.ndarray] | None:
        chunks = self._entries.get(key)
        if chunks is not None:
            self._entries.move_to_end(key)
        return chunks

    def put(self, key: Hashable, chunks: list[np.ndarray]) -> None:
        size = sum(chunk.nbytes for chunk in chunks)
        if not self.enabled or size > self.max_bytes or key in self._entries:
            return
        self._entries[key] = chunks
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= sum(chunk.nbytes for chunk in dropped)
