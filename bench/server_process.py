"""Runs our server.py on 127.0.0.1 for the duration of a benchmark.

    with local_server(model_dir, workers=8, max_queue=8) as url:
        ...   # url answers /ready with 200

The response cache is off (--cache-mb 0) so every request is synthesised. The server's output
goes to a temporary log whose tail is shown if the server fails to start.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

from .environment import REPO_ROOT

STOP_TIMEOUT_S = 30
LOG_TAIL_CHARS = 3000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def local_server(model_dir: Path, *, workers: int | None, max_queue: int | None, device: str = "cpu",
                 dtype: str = "float32", voices_dir: Path | None = None,
                 ready_timeout_s: float = 600) -> Iterator[str]:
    """Starts server.py, yields its base URL once /ready answers 200, and stops it. `workers` or
    `max_queue` None: the server's default."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-server-") as scratch:
        log_path = Path(scratch) / "server.log"
        admission = [*(["--workers", str(workers)] if workers is not None else []),
                     *(["--max-queue", str(max_queue)] if max_queue is not None else [])]
        command = [sys.executable, str(REPO_ROOT / "server.py"), "--model-dir", str(model_dir),
                   "--host", "127.0.0.1", "--port", str(port), "--device", device, "--dtype", dtype,
                   *admission, "--cache-mb", "0",
                   "--voices-dir", str(voices_dir or Path(scratch) / "voices"), "--log-level", "warning"]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_ready(url, process, log_path, ready_timeout_s)
            yield url
        finally:
            _stop(process)


def _wait_ready(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server.py exited with status {process.returncode}:\n{_tail(log_path)}")
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass   # not listening yet: poll again
        time.sleep(0.5)
    raise RuntimeError(f"server.py not ready after {timeout_s:.0f} s:\n{_tail(log_path)}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)


def _tail(log_path: Path) -> str:
    return log_path.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL_CHARS:]
