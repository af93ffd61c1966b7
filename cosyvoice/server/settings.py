"""Every server setting in one place: a command-line flag, a COSYVOICE_* environment variable,
or the default, in that order of precedence.

    settings = Settings.from_args(["--model-dir", "pretrained_models/CosyVoice2-0.5B"])
    COSYVOICE_API_KEY=secret python server.py --model-dir ...     # same as --api-key secret
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

ENV_PREFIX = "COSYVOICE_"
DEFAULT_GPU_WORKERS = 8
# the names both uvicorn (lower case) and logging (upper case, see logs.py) understand
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class Settings:
    model_dir: Path = field(metadata={"help": "CosyVoice2 model directory (required)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; 0.0.0.0 to serve every interface"})
    port: int = field(default=6006, metadata={"help": "TCP port (AutoDL publishes 6006)"})
    device: str = field(default="cpu", metadata={"help": "torch device: cuda or cpu"})
    dtype: str = field(default="auto", metadata={
        "help": "LLM and flow weights: float32, float16, bfloat16, or auto (float16 on a GPU, float32 "
                "on a CPU); the vocoder always runs in float32"})
    voices_dir: Path = field(default=Path("voices"), metadata={
        "help": "voice folder: '[name]prompt text.wav' files are imported at start; "
                "prepared voices are kept in its .store/ subfolder"})
    default_voice: str = field(default="default", metadata={
        "help": "voice used when a request names none (else the first registered)"})
    api_key: str = field(default="", metadata={
        "help": "require this key (Authorization: Bearer or X-API-Key) on all but /health and /ready"})
    cors_origins: str = field(default="", metadata={"help": "comma-separated origins allowed by CORS; empty: CORS off"})
    workers: int = field(default=0, metadata={
        "help": "requests synthesised at the same time (their LLM steps and, on a GPU, flow passes are "
                "batched); 0: 8 on a GPU, 2 on a CPU"})
    max_queue: int = field(default=16, metadata={"help": "requests waiting for a worker before 503"})
    max_text_chars: int = field(default=2000, metadata={"help": "longest text accepted"})
    max_upload_mb: float = field(default=25.0, metadata={"help": "largest request body (prompt upload) in MiB"})
    cache_mb: float = field(default=64.0, metadata={
        "help": "MiB of audio kept to answer identical requests again; 0: no cache"})
    retry_after_s: int = field(default=2, metadata={"help": "Retry-After seconds sent with 503"})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning, error or critical"})

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    @classmethod
    def from_args(cls, argv: list[str] | None = None, environ: dict[str, str] | None = None) -> "Settings":
        """Flags override COSYVOICE_* variables, which override the defaults."""
        environ = os.environ if environ is None else environ
        parser = argparse.ArgumentParser(
            prog="server.py", description="CosyVoice2 text-to-speech server. Every flag can also be set "
                                          f"as an environment variable {ENV_PREFIX}<FLAG NAME>.")
        for setting in fields(cls):
            flag = "--" + setting.name.replace("_", "-")
            env_name = ENV_PREFIX + setting.name.upper()
            convert = _converter(setting.type)
            default = environ.get(env_name)
            if default is None and setting.name != "model_dir":
                default = setting.default
            parser.add_argument(flag, dest=setting.name, type=convert, default=default,
                                required=default is None,
                                help=f"{setting.metadata['help']} (env {env_name})")
        # argparse converts string defaults (the environment's values) with `type` as well
        return cls(**vars(parser.parse_args(argv))).validated(parser)

    def __post_init__(self):
        if self.workers == 0:   # auto: a GPU runs a batch of 8 for about the cost of one request
            object.__setattr__(self, "workers", 2 if self.device == "cpu" else DEFAULT_GPU_WORKERS)

    def torch_dtype(self) -> str:
        """The dtype name to load with. float16 on a GPU: of the two half types it stays closer to
        float32 (tests/test_half_precision.py) and upstream offers it for these models."""
        if self.dtype != "auto":
            return self.dtype
        return "float32" if self.device == "cpu" else "float16"

    def validated(self, parser: argparse.ArgumentParser) -> "Settings":
        """Rejects values no server could run with, through argparse (exit status 2, one line)."""
        problems = []
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            problems.append(f"--device must be cpu, cuda or cuda:N, not {self.device!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            problems.append(f"--dtype must be auto, float32, float16 or bfloat16, not {self.dtype!r}")
        if self.log_level not in LOG_LEVELS:
            problems.append(f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}")
        if not 0 < self.port < 65536:
            problems.append(f"--port must be between 1 and 65535, not {self.port}")
        for name in ("workers", "max_text_chars"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("max_queue", "cache_mb", "retry_after_s"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must not be negative")
        if self.max_upload_mb <= 0:
            problems.append("--max-upload-mb must be positive")
        if problems:
            parser.error("; ".join(problems))
        return self


def _converter(annotation: str):
    """The function turning a flag's text into the field's type (annotations are strings here)."""
    return {"Path": Path, "int": int, "float": float, "str": str}[annotation]
