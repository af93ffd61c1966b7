"""Where the TensorRT-LLM backend keeps its HF export and engines, and what each is keyed by.

    <cache>/hf-<source>/         the HF export of llm.pt (hf_export), per source fingerprint
    <cache>/engines/<name>/      one engine per key: GPU name and compute capability,
                                 TensorRT-LLM version, dtype, sha256 of the exported weights and
                                 the build limits; <name> is readable and ends with the key's hash
    <cache>/engines/<name>/cosyvoice_engine.json   the key, written last (the "complete" mark)

Engines are tied to the GPU architecture and the library versions, so a box whose GPU or
TensorRT-LLM changed builds a new one beside the old; an export is redone only when llm.pt or
the tokenizer folder changes (their sizes and modification times).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..loading.model_dir import CHECKPOINTS, QWEN_DIR
from ..models.llm import token_length_limits

ENGINE_MARK = "cosyvoice_engine.json"
# Longest prompt parts the limits allow for: the reference tokenizer takes at most 30 s of prompt
# audio (25 speech tokens a second), and its transcript stays well under 400 text tokens.
PROMPT_SPEECH_TOKENS = 30 * 25
PROMPT_TEXT_TOKENS = 400
OUTPUT_CAP = 4096              # speech tokens per segment: 164 s of audio


@dataclass(frozen=True)
class BuildLimits:
    """The engine's sizes, from the server's limits."""
    max_batch_size: int        # requests decoded together (in-flight batching)
    max_input_len: int         # prompt ids: SOS + prompt text + text + TASK_ID + prompt speech
    max_output_len: int        # speech tokens per request (longer segments are cut here)

    @property
    def max_seq_len(self) -> int:
        return self.max_input_len + self.max_output_len

    @property
    def max_num_tokens(self) -> int:
        """Tokens one engine step takes: a whole prompt plus one decode step per other request."""
        return self.max_input_len + self.max_batch_size

    @classmethod
    def for_server(cls, workers: int, max_text_chars: int) -> "BuildLimits":
        """Sized for `workers` concurrent requests of at most `max_text_chars` characters (one
        text token per character bounds Qwen's BPE for Chinese and English text)."""
        text_tokens = max_text_chars
        return cls(max_batch_size=workers,
                   max_input_len=2 + PROMPT_TEXT_TOKENS + text_tokens + PROMPT_SPEECH_TOKENS,
                   max_output_len=min(OUTPUT_CAP, token_length_limits(text_tokens)[1]))

    def describe(self) -> str:
        return (f"max_batch_size={self.max_batch_size} max_input_len={self.max_input_len} "
                f"max_seq_len={self.max_seq_len} max_num_tokens={self.max_num_tokens} max_beam_width=1")


@dataclass(frozen=True)
class EngineKey:
    gpu_name: str
    compute_capability: str    # "9.0"
    trtllm_version: str
    dtype: str
    weights_sha256: str
    limits: BuildLimits

    def digest(self) -> str:
        payload = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def folder_name(self) -> str:
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", self.gpu_name).strip("-").lower()
        return (f"{gpu}-sm{self.compute_capability.replace('.', '')}-trtllm{self.trtllm_version}-"
                f"{self.dtype}-{self.digest()}")

    def to_json(self) -> dict:
        return {**asdict(self), "digest": self.digest()}


def source_fingerprint(model_dir: Path) -> str:
    """Changes when llm.pt or the tokenizer folder changes (sizes and modification times)."""
    files = [model_dir / CHECKPOINTS["llm"], *sorted((model_dir / QWEN_DIR).iterdir())]
    stats = [(path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in files if path.is_file()]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def export_dir(cache_dir: Path, model_dir: Path) -> Path:
    return cache_dir / f"hf-{source_fingerprint(model_dir)}"


def engine_dir(cache_dir: Path, key: EngineKey) -> Path:
    return cache_dir / "engines" / key.folder_name()


def engine_is_complete(folder: Path, key: EngineKey) -> bool:
    mark = folder / ENGINE_MARK
    return mark.is_file() and json.loads(mark.read_text(encoding="utf-8")) == key.to_json()


def mark_complete(folder: Path, key: EngineKey) -> None:
    (folder / ENGINE_MARK).write_text(json.dumps(key.to_json(), indent=2) + "\n", encoding="utf-8")
