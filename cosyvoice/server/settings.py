"""Every server setting in one place: a command-line flag, a COSYVOICE_* environment variable,
or the default, in that order of precedence. The TensorRT-LLM settings are flags of fast_server.py
only (`from_args(..., fast_server=True)`); server.py always runs the PyTorch LLM.

    settings = Settings.from_args(["--model-dir", "pretrained_models/CosyVoice2-0.5B"])
    COSYVOICE_API_KEY=secret python server.py --model-dir ...     # same as --api-key secret
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

ENV_PREFIX = "COSYVOICE_"
# Requests admitted at once, CPU or GPU. Their LLM steps are batched (up to this many rows) and
# their flow calls overlap. On a 2-core CPU with full-size CosyVoice2 and 8 clients, LLM decode steps
# then carry 6-8 requests each (bench/results/cpu-full-cv2-streaming.json); the earlier CPU default
# of 2 admitted requests rarely formed a batch.
DEFAULT_WORKERS = 8
# the names both uvicorn (lower case) and logging (upper case, see logs.py) understand
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LLM_BACKENDS = ("trtllm", "torch")
TRTLLM_DTYPES = ("bfloat16", "float16")
FAST_SERVER = "fast_server"   # metadata key of the settings only fast_server.py takes as flags


@dataclass(frozen=True)
class Settings:
    model_dir: Path = field(metadata={"help": "model directory, CosyVoice2 or CosyVoice3 (required)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; 0.0.0.0 to serve every interface"})
    port: int = field(default=6006, metadata={"help": "TCP port (AutoDL publishes 6006)"})
    grpc_port: int = field(default=0, metadata={
        "help": "also serve upstream CosyVoice's gRPC service (cosyvoice.CosyVoice/Inference) on this "
                "port, same host; 0: off"})
    device: str = field(default="cpu", metadata={
        "help": "torch device: cuda or cpu (fast_server.py with TensorRT-LLM: default cuda)"})
    dtype: str = field(default="auto", metadata={
        "help": "LLM and flow weights: float32, float16, bfloat16, or auto (float16 on a GPU, float32 "
                "on a CPU); the vocoder always runs in float32"})
    voices_dir: Path = field(default=Path("voices"), metadata={
        "help": "voice folder: '[name]prompt text.wav' files are imported at start; "
                "prepared voices are kept in its .store/ subfolder"})
    default_voice: str = field(default="default", metadata={
        "help": "voice used when a request names none (else the first registered)"})
    api_key: str = field(default="", metadata={
        "help": "require this key (Authorization: Bearer, X-API-Key, or an api_key query parameter "
                "for media links) on all but /health, /ready and the web page"})
    cors_origins: str = field(default="*", metadata={
        "help": "origins allowed by CORS: * (any, the default: browser clients such as SillyTavern "
                "run on their own origin), a comma-separated list, or none"})
    public_url: str = field(default="", metadata={
        "help": "the URL clients reach this server at (e.g. https://u1-6006.autodl.pro), for the "
                "preview links of /speakers; empty: http://HOST:PORT when bound to one address, "
                "else links relative to the server"})
    workers: int = field(default=0, metadata={
        "help": "requests synthesised at the same time (their LLM steps and, on a GPU, flow passes are "
                "batched); 0: 8"})
    max_queue: int = field(default=16, metadata={"help": "requests waiting for a worker before 503"})
    max_text_chars: int = field(default=2000, metadata={"help": "longest text accepted"})
    max_upload_mb: float = field(default=25.0, metadata={"help": "largest request body (prompt upload) in MiB"})
    cache_mb: float = field(default=64.0, metadata={
        "help": "MiB of audio kept to answer identical requests again; 0: no cache"})
    retry_after_s: int = field(default=2, metadata={"help": "Retry-After seconds sent with 503"})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning, error or critical"})
    # fast_server.py only (server.py runs the PyTorch LLM)
    llm_backend: str = field(default="torch", metadata={
        FAST_SERVER: True, "help": "LLM stage: trtllm (TensorRT-LLM, the default) or torch (the "
                                   "PyTorch model)"})
    trtllm_cache: Path | None = field(default=None, metadata={
        FAST_SERVER: True, "help": "folder for the HF export and engines (default <model-dir>/trtllm)"})
    trtllm_dtype: str | None = field(default=None, metadata={
        FAST_SERVER: True, "help": "engine precision, bfloat16 or float16 (default bfloat16 on compute "
                                   "capability 8.0+, else float16)"})
    trtllm_kv_fraction: float = field(default=0.2, metadata={
        FAST_SERVER: True, "help": "most of the free GPU memory the KV cache may take (flow and HiFT "
                                   "share the GPU)"})

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def cors_origin_list(self) -> list[str]:
        """The allowed origins; [] (CORS off) for 'none' or an empty value."""
        origins = [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]
        return [] if origins in ([], ["none"]) else origins

    @property
    def link_base(self) -> str:
        """What links the server hands out start with: the public URL, else this address when
        bound to one (not to every interface), else "" (links relative to the server)."""
        if self.public_url:
            return self.public_url.rstrip("/")
        if self.host in ("0.0.0.0", "::", ""):
            return ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @classmethod
    def from_args(cls, argv: list[str] | None = None, environ: dict[str, str] | None = None,
                  fast_server: bool = False) -> "Settings":
        """Flags override COSYVOICE_* variables, which override the defaults. `fast_server`: the
        flags of fast_server.py (the TensorRT-LLM ones too), whose LLM backend defaults to trtllm
        and, on it, the device to cuda."""
        environ = os.environ if environ is None else environ
        program = "fast_server.py" if fast_server else "server.py"
        parser = argparse.ArgumentParser(
            prog=program, description="CosyVoice text-to-speech server. Every flag can also be set "
                                      f"as an environment variable {ENV_PREFIX}<FLAG NAME>.")
        launcher_defaults = {"llm_backend": "trtllm", "device": None} if fast_server else {}
        for setting in fields(cls):
            if setting.metadata.get(FAST_SERVER) and not fast_server:
                continue
            flag = "--" + setting.name.replace("_", "-")
            env_name = ENV_PREFIX + setting.name.upper()
            convert = _converter(setting.type)
            default = environ.get(env_name)
            required = default is None and setting.name == "model_dir"
            if default is None and setting.name != "model_dir":
                default = launcher_defaults.get(setting.name, setting.default)
            parser.add_argument(flag, dest=setting.name, type=convert, default=default,
                                required=required, help=f"{setting.metadata['help']} (env {env_name})")
        # argparse converts string defaults (the environment's values) with `type` as well
        values = vars(parser.parse_args(argv))
        if values.get("device", "cpu") is None:   # fast_server.py, told no device
            values["device"] = "cuda" if values["llm_backend"] == "trtllm" else "cpu"
        return cls(**values).validated(parser)

    def __post_init__(self):
        if self.workers == 0:   # auto: see DEFAULT_WORKERS
            object.__setattr__(self, "workers", DEFAULT_WORKERS)

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
        if not 0 <= self.grpc_port < 65536 or self.grpc_port == self.port:
            problems.append(f"--grpc-port must be 0 (off) or a port between 1 and 65535 other than "
                            f"--port, not {self.grpc_port}")
        for name in ("workers", "max_text_chars"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("max_queue", "cache_mb", "retry_after_s"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must not be negative")
        if self.max_upload_mb <= 0:
            problems.append("--max-upload-mb must be positive")
        if self.llm_backend not in LLM_BACKENDS:
            problems.append(f"--llm-backend must be {' or '.join(LLM_BACKENDS)}, not {self.llm_backend!r}")
        if self.trtllm_dtype not in (None, *TRTLLM_DTYPES):
            problems.append(f"--trtllm-dtype must be {' or '.join(TRTLLM_DTYPES)}, not {self.trtllm_dtype!r}")
        if problems:
            parser.error("; ".join(problems))
        return self


def _converter(annotation: str):
    """The function turning a flag's text into the field's type (annotations are strings here)."""
    return {"Path": Path, "int": int, "float": float, "str": str}[annotation.removesuffix(" | None")]
