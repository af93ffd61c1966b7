"""The wheels: uv's own wheel (the installer unpacks its binary), the project wheel built from this
checkout, and every pin of the lock downloaded for the target's tags and checked against its
hashes; then what the manifest says about them (CUDA build, glibc floor, installed size)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from .common import REPO, BuildError, Target, run, runs, say, source_args
from .lock import demo_constraints, lock_pins, normalise

UV_VERSION = "0.13.9"


def download_uv_wheel(target: Target, dest: Path, wheelhouse: Path | None, offline: bool) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--dest", dest, f"uv=={UV_VERSION}", *target.pip_target_args(),
         *source_args(wheelhouse, offline, [])])
    wheels = sorted(dest.glob(f"uv-{UV_VERSION}-*.whl"))
    if not wheels:
        raise BuildError(f"pip did not produce the uv {UV_VERSION} wheel in {dest}")
    return wheels[0]


def host_uv(uv_wheel: Path, work: Path) -> Path:
    """A uv that runs here: the pinned one inside the target's wheel when this machine can run it
    (a linux x86_64 builder), else one on PATH. The pinned one first, because the lock uv compiles
    and the Python download it picks depend on uv's version."""
    binary = work / "host-uv" / uv_wheel.stem / "uv"   # per wheel: a reused --work-dir has older ones
    if not binary.exists():
        with zipfile.ZipFile(uv_wheel) as archive:
            member = next((name for name in archive.namelist() if name.endswith(".data/scripts/uv")),
                          None)
            if member is not None:
                binary.parent.mkdir(parents=True, exist_ok=True)
                binary.write_bytes(archive.read(member))
                binary.chmod(0o755)
    if binary.exists() and runs(binary):
        return binary
    found = shutil.which("uv")
    if found:
        return Path(found)
    if not binary.exists():
        raise BuildError(f"{uv_wheel.name} holds no uv binary; install uv here (pip install uv) "
                         "and rerun")
    raise BuildError("the bundled uv does not run on this machine; install uv here "
                     "(pip install uv) and rerun")


def build_project_wheel(dest: Path) -> Path:
    """The cosyvoice-deploy package as a wheel, built from this checkout."""
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", dest, REPO]
    try:
        import setuptools  # noqa: F401  (present: build here, without fetching a build env)
        command[4:4] = ["--no-build-isolation"]
    except ImportError:
        pass
    run(command, stdout=subprocess.DEVNULL)
    wheels = sorted(dest.glob("cosyvoice_deploy-*.whl"))
    if not wheels:
        raise BuildError(f"pip wheel did not produce a cosyvoice_deploy wheel in {dest}")
    return wheels[-1]


def download_wheels(target: Target, lock_file: Path, dest: Path, wheelhouse: Path | None,
                    offline: bool) -> None:
    """Every pin of the lock, checked against its hashes, for the target's tags."""
    abis = [] if target.platform == "host" else [
        "--abi", target.abi, "--abi", "abi3", "--abi", "none"]
    run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--require-hashes", "--dest", dest, "-r", lock_file, *target.pip_target_args(), *abis,
         *source_args(wheelhouse, offline, target.extra_index_urls)])


def check_wheels_cover_lock(lock: str, wheels_dir: Path) -> None:
    present = {}
    for wheel in wheels_dir.glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        present[normalise(name)] = version
    missing = [f"{name}=={version}" for name, version in lock_pins(lock)
               if normalise(name) not in present]
    if missing:
        raise BuildError(f"no wheel was downloaded for {', '.join(missing[:5])}: check the "
                         "platform tags and the indexes")


def fetch_demo_wheelhouse(wheelhouse: Path) -> None:
    """Downloads what a demo bundle needs into a wheelhouse (pip sees this machine's find-links,
    where uv would not)."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    say(f"filling the demo wheelhouse {wheelhouse}")
    run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
         "--dest", wheelhouse, "-r", REPO / "requirements.txt", *demo_constraints(),
         f"uv=={UV_VERSION}"])


def wheel_installed_size(path: Path) -> int:
    with zipfile.ZipFile(path) as archive:
        return sum(info.file_size for info in archive.infolist())


def wheel_glibc_floor(path: Path) -> tuple[int, int]:
    """The lowest glibc a manylinux wheel accepts (a wheel names several compatible tags)."""
    tags = re.findall(r"manylinux_(\d+)_(\d+)", path.name)
    floors = [(int(a), int(b)) for a, b in tags]
    floors += [value for word, value in (("manylinux2014", (2, 17)), ("manylinux2010", (2, 12)),
                                         ("manylinux1_", (2, 5))) if word in path.name]
    return min(floors) if floors else (0, 0)


def torch_build(wheels_dir: Path) -> tuple[str, str]:
    """(torch version, CUDA) from the torch wheel and its nvidia-* companions."""
    torch_wheels = sorted(wheels_dir.glob("torch-*.whl"))
    if not torch_wheels:
        return "", "none"
    version = torch_wheels[0].name.split("-")[1]
    local = version.split("+")[1] if "+" in version else ""
    if local == "cpu":
        return version, "cpu"
    if local.startswith("cu"):
        digits = local[2:]
        return version, f"{digits[:-1]}.{digits[-1]}"
    runtime = sorted(wheels_dir.glob("nvidia_cuda_runtime_cu*-*.whl"))
    if runtime:
        # nvidia-cuda-runtime-cu12 12.6.77 -> "12.6"
        return version, ".".join(runtime[0].name.split("-")[1].split(".")[:2])
    return version, "cpu"
