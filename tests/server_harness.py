"""A real server for the server tests: `python server.py` in a subprocess on 127.0.0.1.

One server is shared by the test_server_* modules (the session fixture `server` in conftest.py
starts it on first use and stops it when the test session ends). It has an API key, a small queue (2 workers + 4 waiting) so 503 is reachable, the
response cache, CORS for one origin, a voice folder with one imported voice, 'alice', and
upstream's gRPC service on `server.grpc_port`.
"""
from __future__ import annotations

import io
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import av
import httpx
import numpy as np
import soundfile as sf

REPO_ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key"
ALLOWED_ORIGIN = "http://allowed.example"
MAX_TEXT_CHARS = 500
MAX_UPLOAD_MB = 24
WORKERS, MAX_QUEUE = 2, 4
RATE = 24000                                 # the tiny model's sample rate
SHORT = {"text": "Hi.", "seed": 3}           # about 0.3 s of audio from the tiny model
# zero_shot in 'alice' with this seed gives three model chunks (about 3.7 s of audio)
STREAMING = {"text": "One two three four five six.", "seed": 3}
START_TIMEOUT_S = 240

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir: Path, voices_dir: Path, *extra: str, grpc: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # the gRPC service (--grpc-port), when asked for, on another free port
        self.grpc_port = next(port for port in iter(free_port, None) if port != self.port) if grpc else 0
        if grpc:
            extra = (*extra, "--grpc-port", str(self.grpc_port))
        self.voices_dir = voices_dir
        self.log_dir = Path(tempfile.mkdtemp(prefix="cosyvoice-server-log-"))
        self.stdout_path, self.stderr_path = self.log_dir / "stdout.log", self.log_dir / "stderr.log"
        command = [sys.executable, str(REPO_ROOT / "server.py"), "--model-dir", str(model_dir),
                   "--host", "127.0.0.1", "--port", str(self.port), "--voices-dir", str(voices_dir),
                   *extra]
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=stdout, stderr=stderr)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.stderr()}")
            try:
                if httpx.get(self.url + "/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass   # not listening yet
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout_s} s:\n{self.stderr()}")

    def client(self, **options) -> httpx.Client:
        headers = {"X-API-Key": API_KEY, **options.pop("headers", {})}
        return httpx.Client(base_url=self.url, headers=headers, timeout=options.pop("timeout", 120),
                            **options)

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS in /proc status")

    def metric(self, name: str) -> float:
        """The value of an unlabelled metric from /metrics."""
        text = httpx.get(self.url + "/metrics", headers={"X-API-Key": API_KEY}, timeout=30).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(f"{name} not in /metrics")

    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        shutil.rmtree(self.log_dir, ignore_errors=True)


def prompt_files(fixture_dir: Path) -> tuple[Path, str]:
    reference = fixture_dir / "reference"
    return reference / "prompt.wav", (reference / "prompt.txt").read_text(encoding="utf-8").strip()


SHARED_FLAGS = ("--api-key", API_KEY, "--workers", str(WORKERS), "--max-queue", str(MAX_QUEUE),
                "--cache-mb", "16", "--cors-origins", ALLOWED_ORIGIN, "--max-text-chars",
                str(MAX_TEXT_CHARS), "--max-upload-mb", str(MAX_UPLOAD_MB), "--retry-after-s", "1")


@contextmanager
def run_test_server(model_dir: Path, fixture_dir: Path, flags: tuple[str, ...] = SHARED_FLAGS,
                    grpc: bool = False) -> Iterator[ServerProcess]:
    """A server, ready, with one imported voice ('alice'); stopped on exit. The default flags are
    those of the server the tests share; `flags=()` runs server.py with its own defaults."""
    voices_dir = Path(tempfile.mkdtemp(prefix="cosyvoice-voices-"))
    prompt_wav, transcript = prompt_files(fixture_dir)
    shutil.copy(prompt_wav, voices_dir / f"[alice]{transcript}.wav")
    server = ServerProcess(model_dir, voices_dir, *flags, grpc=grpc)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
        shutil.rmtree(voices_dir, ignore_errors=True)


def wait_for(condition, timeout_s: float = 60.0) -> bool:
    """Polls `condition` until it holds (True) or the time is up (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def decode(fmt: str, data: bytes, streamed: bool) -> tuple[np.ndarray, int]:
    """Audio bytes -> (samples, rate) as a client that saved them reads them: soundfile
    (`sf.read`) for every container it knows, streamed or not; PyAV for AAC (libsndfile has none)."""
    if fmt == "pcm":
        assert len(data) % 2 == 0
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768, RATE
    if fmt == "aac":
        with av.open(io.BytesIO(data)) as container:
            frames = list(container.decode(audio=0))
        return np.concatenate([frame.to_ndarray().reshape(-1) for frame in frames]), frames[0].sample_rate
    samples, rate = sf.read(io.BytesIO(data), dtype="float32")
    return samples, rate


def assert_json_error(response: httpx.Response, status: int | None = None) -> str:
    """A 4xx with a JSON body that carries a message; returns the message."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    if status is not None:
        assert response.status_code == status, (response.status_code, response.text[:300])
    body = response.json()
    message = body["error"]["message"] if "error" in body else body["detail"]
    assert isinstance(message, str) and len(message) > 5, body
    assert "object at 0x" not in message, message   # no Python object reprs
    return message

