"""What every step of the builder shares: the error a user can act on, progress lines, running a
command, hashing and linking files, and the target the bundle is built for."""
from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


class BuildError(Exception):
    """A failure the user can act on; build.py prints it as one line."""


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    """Runs a command, echoing it; a failure becomes a BuildError naming the command."""
    print("    $ " + " ".join(str(part) for part in command), flush=True)
    result = subprocess.run([str(part) for part in command], **kwargs)
    if result.returncode != 0:
        raise BuildError(f"{Path(str(command[0])).name} failed (exit {result.returncode}): "
                         f"{' '.join(str(part) for part in command[:6])} ...; see the output above")
    return result


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def link_or_copy(source: str, dest: str) -> None:
    """copytree's copy_function: a hard link where it can (the staging folder is only read, to zip
    it, so linking saves copying gigabytes of weights), a copy across file systems."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def runs(binary: Path) -> bool:
    """Whether `binary --version` works here (a binary for another machine fails to exec)."""
    try:
        return subprocess.run([str(binary), "--version"], capture_output=True).returncode == 0
    except OSError:
        return False


def uv_env() -> dict:
    """uv's environment: no interpreter downloads, no user configuration, so that what it does
    depends on its arguments only."""
    return {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_NO_CONFIG": "1"}


@dataclass
class Target:
    """What the box runs: the bundle's wheels are chosen for exactly this."""
    profile: str
    python_version: str          # "3.10"
    platform: str                # uv's name: "x86_64-manylinux_2_31", or "host" for --demo
    demo: bool = False
    extra_index_urls: list[str] = field(default_factory=list)
    index_strategy: str | None = None

    @property
    def abi(self) -> str:
        return "cp" + self.python_version.replace(".", "")

    @property
    def arch(self) -> str:
        return platform.machine() if self.platform == "host" else self.platform.split("-")[0]

    @property
    def manylinux_max(self) -> tuple[int, int]:
        match = re.search(r"manylinux_(\d+)_(\d+)", self.platform)
        if match:
            return int(match.group(1)), int(match.group(2))
        if "manylinux2014" in self.platform:
            return 2, 17
        raise BuildError(f"--platform {self.platform} is not a manylinux platform; use e.g. "
                         "x86_64-manylinux_2_31")

    def pip_platform_tags(self) -> list[str]:
        """Every tag pip must accept (pip does not expand manylinux_2_31 down to older ones)."""
        major, minor = self.manylinux_max
        tags = [f"manylinux_{major}_{m}_{self.arch}" for m in range(minor, 4, -1)]
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        return tags + [f"{name}_{self.arch}" for m, name in legacy.items() if m <= minor]

    def pip_target_args(self) -> list[str]:
        """pip download's flags that pick the target's wheels (none for the demo's own host)."""
        if self.platform == "host":
            return []
        args = ["--python-version", self.python_version, "--implementation", "cp"]
        return args + [arg for tag in self.pip_platform_tags() for arg in ("--platform", tag)]


def source_args(wheelhouse: Path | None, offline: bool, extra_index_urls: list[str]) -> list:
    """Where pip and uv look: the wheelhouse (only it when offline), then the configured indexes."""
    args: list = []
    if wheelhouse is not None:
        args += ["--find-links", wheelhouse]
    if offline:
        if wheelhouse is None:
            raise BuildError("--offline needs --wheelhouse DIR holding the wheels")
        args += ["--no-index"]
    for url in extra_index_urls:
        args += ["--extra-index-url", url]
    return args
