"""What a benchmark ran on: machine, accelerator, model, code version, time and load.

Every report embeds `describe_run(...)`, so a number can always be traced to the box, the model
size and the commit that produced it.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
QWEN_CONFIG = Path("CosyVoice-BlankEN") / "config.json"
FULL_SIZE = {"hidden_size": 896, "num_hidden_layers": 24}   # CosyVoice2-0.5B's Qwen2 body


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def ram_gb() -> float | None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024 ** 2, 1)
    return None


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (compare with `cores`: above it, the box was busy)."""
    return [round(value, 2) for value in os.getloadavg()]


def machine() -> dict:
    return {"cpu_model": cpu_model(), "cores": os.cpu_count(), "ram_gb": ram_gb(),
            "platform": platform.platform(), "python": platform.python_version()}


def gpu_names() -> list[str]:
    """GPU names from nvidia-smi (the load generator does not import torch); [] without one."""
    if shutil.which("nvidia-smi") is None:
        return []
    result = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def git_commit() -> dict:
    """The checked-out commit and whether the tree had changes; None outside a git checkout."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                              timeout=30)
    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(git("status", "--porcelain").stdout.strip())}


def model_info(model_dir: str | Path | None) -> dict | None:
    """The model directory, its size on disk and its LLM shape ("full" = CosyVoice2-0.5B sizes)."""
    if model_dir is None:
        return None
    model_dir = Path(model_dir).resolve()
    size = sum(path.stat().st_size for path in model_dir.rglob("*") if path.is_file())
    qwen = json.loads((model_dir / QWEN_CONFIG).read_text())
    shape = {key: qwen[key] for key in FULL_SIZE}
    return {"path": str(model_dir), "size_mb": round(size / 1024 ** 2, 1),
            "llm_hidden_size": shape["hidden_size"], "llm_layers": shape["num_hidden_layers"],
            "size_class": "full" if shape == FULL_SIZE else "reduced"}


def describe_run(model_dir: str | Path | None, device: dict) -> dict:
    """The `environment` block of a report; `device` says what ran the model."""
    return {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "device": device, "model": model_info(model_dir),
            "git": git_commit(), "load_average_start": load_average()}
