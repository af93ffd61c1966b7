#!/usr/bin/env python3
"""Builds the two zips that `autodl_deploy.sh` installs from, on a machine with internet.

    python offline_packages/build.py --out dist                      # torch profile, both zips
    python offline_packages/build.py --profile trtllm --extra-index-url https://pypi.nvidia.com --out dist
    python offline_packages/build.py --demo --out dist               # tiny random model, this machine
    python offline_packages/build.py --lock-only --profile torch     # re-resolve profiles/torch.lock

offline_packages.zip                      pretrained_models.zip
  manifest.json                             manifest.json
  lock.txt        pinned, with hashes       CosyVoice2-0.5B/...      (iic/CosyVoice2-0.5B)
  wheels/*.whl    every pin of the lock     CosyVoice-ttsfrd/...     (iic/CosyVoice-ttsfrd)
  uv/uv-*.whl     the installer             voices/[name]transcript.wav
  python/cpython-*-install_only*.tar.gz     (absent when it could not be had; the manifest says why)
  app/server.py, app/fast_server.py         launchers (the package itself is a wheel in wheels/)
  autodl_deploy.sh

manifest.json is JSON written one field per line and one file per line, so that the installer can
read it with sed before any Python exists on the box: top-level scalars (`"key": value,`), then
`"files": [` with lines `{"path": "...", "sha256": "...", "size": N}`. Paths never contain `"`,
`\\` or a newline (the builder refuses them).

Everything is resolved for the TARGET, not for this machine: CPython 3.10 (ttsfrd exists only for
3.10), linux x86_64, manylinux tags up to 2_31 (Ubuntu 20.04's glibc), PyPI's CUDA 12 torch build.
`--demo` instead takes this machine's Python and wheels, and needs no model hub.
Only the standard library is imported here; pip (this interpreter's), uv (from the uv wheel) and,
for the real models, modelscope do the work.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import wave
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

BUILDER_VERSION = "1.0.0"
MANIFEST_FORMAT = "cosyvoice-deploy manifest 1"
UV_VERSION = "0.13.9"
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PROFILES = HERE / "profiles"
PROFILE_NAMES = ("torch", "trtllm")
PROJECT_NAME = "cosyvoice-deploy"
LAUNCHERS = ("server.py", "fast_server.py")
DEPLOY_SCRIPT = "autodl_deploy.sh"
MODELS = {"CosyVoice2-0.5B": "iic/CosyVoice2-0.5B", "CosyVoice-ttsfrd": "iic/CosyVoice-ttsfrd"}
MAIN_MODEL = "CosyVoice2-0.5B"
DEMO_MODEL = "CosyVoice2-demo-tiny"
DEMO_VOICE_NAME = "default"
DEMO_VOICE_TEXT = "Hello, this is the default demo voice."
# Already compressed (or incompressible): stored as they are, which also makes unzip fast.
STORED_SUFFIXES = {".whl", ".zip", ".gz", ".tgz", ".xz", ".zst", ".pt", ".pth", ".bin", ".onnx",
                   ".safetensors", ".wav", ".mp3", ".tar"}
UNSAFE_PATH = re.compile(r'["\\\n\r]')


class BuildError(Exception):
    """A failure the user can act on; main() prints it as one line."""


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
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


# --- the target --------------------------------------------------------------------------------


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


def read_profile(profile: str) -> list[str]:
    path = PROFILES / f"{profile}.txt"
    if not path.is_file():
        raise BuildError(f"profile file {path} is missing; profiles are {', '.join(PROFILE_NAMES)}")
    return [line.strip() for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def lock_inputs(target: Target) -> str:
    """The requirements that the lock resolves: the project's, then the profile's pins."""
    requirements = [line.split("#")[0].strip() for line in
                    (REPO / "requirements.txt").read_text().splitlines()]
    pins = [] if target.demo else read_profile(target.profile)
    return "\n".join([line for line in requirements if line] + pins) + "\n"


def lock_key(target: Target, inputs: str) -> str:
    text = json.dumps([inputs, target.python_version, target.platform,
                       sorted(target.extra_index_urls), target.index_strategy])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def lock_header(target: Target, key: str) -> str:
    how = ("# A demo lock: the build machine's own wheels (build.py --demo).\n" if target.demo else
           f"# Resolved by: python offline_packages/build.py --lock-only --profile {target.profile}"
           " (needs the package index; rerun after editing profiles/*.txt or requirements.txt)\n")
    return (f"# cosyvoice-deploy lock: profile={target.profile} python={target.python_version} "
            f"platform={target.platform} inputs={key}\n" + how)


# --- uv ----------------------------------------------------------------------------------------


def download_uv_wheel(target: Target, dest: Path, wheelhouse: Path | None, offline: bool) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", "--dest", dest, f"uv=={UV_VERSION}"]
    if target.platform != "host":
        command += ["--python-version", target.python_version, "--implementation", "cp"]
        command += [arg for tag in target.pip_platform_tags() for arg in ("--platform", tag)]
    command += source_args(wheelhouse, offline, [])
    run(command)
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


def runs(binary: Path) -> bool:
    """Whether `binary --version` works here (a binary for another machine fails to exec)."""
    try:
        return subprocess.run([str(binary), "--version"], capture_output=True).returncode == 0
    except OSError:
        return False


def uv_env() -> dict:
    # No interpreter downloads, no user configuration: the result depends on the arguments only.
    return {**os.environ, "UV_PYTHON_DOWNLOADS": "never", "UV_NO_CONFIG": "1"}


# --- wheels and the lock -----------------------------------------------------------------------


def source_args(wheelhouse: Path | None, offline: bool, extra_index_urls: list[str]) -> list:
    """Where pip looks: the wheelhouse (only it when offline), then the configured indexes."""
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


def compile_lock(target: Target, uv: Path, work: Path, wheelhouse: Path | None, offline: bool,
                 constraints: list[str]) -> str:
    """uv pip compile for the target; returns the lock text (with our header)."""
    inputs = lock_inputs(target) + "".join(f"{line}\n" for line in constraints)
    key = lock_key(target, inputs)
    source = work / f"{target.profile}.in"
    source.write_text(inputs)
    output = work / f"{target.profile}.lock"
    command = [uv, "pip", "compile", source, "--output-file", output, "--generate-hashes",
               "--only-binary", ":all:", "--no-header", "--python-version", target.python_version,
               "--quiet"]
    if target.platform != "host":
        command += ["--python-platform", target.platform]
    if target.index_strategy:
        command += ["--index-strategy", target.index_strategy]
    command += source_args(wheelhouse, offline, target.extra_index_urls)
    if offline:
        command += ["--offline"]
    run(command, env=uv_env())
    return lock_header(target, key) + output.read_text()


def committed_lock(target: Target) -> str | None:
    """profiles/<profile>.lock when it was resolved from exactly today's inputs and target."""
    path = PROFILES / f"{target.profile}.lock"
    if not path.is_file():
        return None
    text = path.read_text()
    key = lock_key(target, lock_inputs(target))
    return text if f"inputs={key}" in text.splitlines()[0] else None


def lock_pins(lock: str) -> list[tuple[str, str]]:
    """(name, version) of every `name==version` line of a uv lock."""
    pins = []
    for line in lock.splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^ \\;]+)", line)
        if match:
            pins.append((match.group(1), match.group(3)))
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download_wheels(target: Target, lock_file: Path, dest: Path, wheelhouse: Path | None,
                    offline: bool) -> None:
    """Every pin of the lock, checked against its hashes, for the target's tags."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", "--require-hashes", "--dest", dest, "-r", lock_file]
    if target.platform != "host":
        command += ["--python-version", target.python_version, "--implementation", "cp",
                    "--abi", target.abi, "--abi", "abi3", "--abi", "none"]
        command += [arg for tag in target.pip_platform_tags() for arg in ("--platform", tag)]
    command += source_args(wheelhouse, offline, target.extra_index_urls)
    run(command)


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


# --- python-build-standalone -------------------------------------------------------------------


def standalone_url(target: Target, uv: Path) -> str:
    """The download uv itself would use for this Python (install_only, linux x86_64 gnu)."""
    result = subprocess.run([str(uv), "python", "list", target.python_version, "--only-downloads",
                             "--all-platforms", "--all-arches", "--output-format", "json",
                             "--offline"], capture_output=True, text=True, env=uv_env())
    if result.returncode != 0:
        raise BuildError(f"uv python list failed: {result.stderr.strip()[:200]}")
    for entry in json.loads(result.stdout):
        if (entry.get("implementation") == "cpython" and entry.get("os") == "linux"
                and entry.get("arch") == target.arch and entry.get("libc") == "gnu"
                and entry.get("variant") == "default" and entry.get("url")):
            return entry["url"]
    raise BuildError(f"uv knows no CPython {target.python_version} download for linux {target.arch}")


def fetch_standalone(args: argparse.Namespace, target: Target, uv: Path,
                     dest: Path) -> tuple[Path | None, str]:
    """(archive, note). A missing archive is not fatal: the installer then uses a system Python
    of the same version, and the manifest says why there is none."""
    dest.mkdir(parents=True, exist_ok=True)
    if args.python_standalone:
        source = Path(args.python_standalone)
        if not source.is_file():
            raise BuildError(f"--python-standalone {source} does not exist")
        if not re.search(rf"cpython-{re.escape(target.python_version)}\.\d+", source.name):
            raise BuildError(f"{source.name} is not a CPython {target.python_version} build; pass "
                             f"a cpython-{target.python_version}.*-install_only*.tar.gz archive")
        shutil.copy2(source, dest / source.name)
        return dest / source.name, f"given with --python-standalone ({source.name})"
    if args.demo or args.offline or args.no_python_standalone:
        why = ("a demo bundle" if args.demo else "--offline" if args.offline
               else "--no-python-standalone")
        return None, (f"not bundled ({why}): the installer uses a system Python "
                      f"{target.python_version}")
    try:
        url = args.python_standalone_url or standalone_url(target, uv)
        name = urllib.parse.unquote(url.rsplit("/", 1)[1])
        say(f"downloading {name}")
        partial = dest / (name + ".part")
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
        partial.rename(dest / name)
        return dest / name, f"downloaded from {url}"
    except (OSError, BuildError, ValueError) as exc:
        print(f"warning: no python-build-standalone archive ({exc}); the installer will need a "
              f"system Python {target.python_version} on the box", file=sys.stderr)
        return None, f"download failed ({str(exc)[:160]}): the installer uses a system Python"


def tar_size(path: Path) -> int:
    with tarfile.open(path) as archive:
        return sum(member.size for member in archive.getmembers() if member.isfile())


# --- manifest and zip --------------------------------------------------------------------------


def file_entries(root: Path) -> list[dict]:
    entries = []
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise BuildError(f"{path} is a symbolic link; bundles hold plain files only")
        if not path.is_file():
            continue
        relative = path.relative_to(root).as_posix()
        if UNSAFE_PATH.search(relative):
            raise BuildError(f"{relative!r} has a quote, backslash or newline in its name; "
                             "rename it")
        entries.append({"path": relative, "sha256": sha256_of(path), "size": path.stat().st_size})
    return entries


def manifest_text(header: dict, entries: list[dict]) -> str:
    """One scalar field per line, one file per line (see the module docstring)."""
    lines = ["{"]
    for key, value in header.items():
        if not (value is None or isinstance(value, (str, int, float, bool))):
            raise TypeError(f"manifest field {key} must be a scalar")
        lines.append(f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)},")
    lines.append('  "files": [')
    rows = [f'    {{"path": {json.dumps(e["path"], ensure_ascii=False)}, '
            f'"sha256": "{e["sha256"]}", "size": {e["size"]}}}' for e in entries]
    lines.append(",\n".join(rows))
    lines += ["  ]", "}"]
    text = "\n".join(lines) + "\n"
    json.loads(text)  # it is JSON
    return text


def write_zip(staging: Path, out_zip: Path, header: dict) -> None:
    """staging/ plus its manifest.json into out_zip, written beside it and renamed when whole."""
    entries = file_entries(staging)
    header = {**header, "files_count": len(entries),
              "unpacked_size": sum(entry["size"] for entry in entries)}
    manifest = manifest_text(header, entries)
    (staging / "manifest.json").write_text(manifest, encoding="utf-8")
    partial = out_zip.with_name(out_zip.name + ".part")
    say(f"writing {out_zip} ({len(entries)} files, {header['unpacked_size'] / 2**20:.0f} MB)")
    with zipfile.ZipFile(partial, "w", allowZip64=True) as archive:
        archive.write(staging / "manifest.json", "manifest.json", zipfile.ZIP_DEFLATED)
        for entry in entries:
            path = staging / entry["path"]
            method = (zipfile.ZIP_STORED if path.suffix.lower() in STORED_SUFFIXES
                      else zipfile.ZIP_DEFLATED)
            archive.write(path, entry["path"], method)
    partial.replace(out_zip)
    out_zip.with_name(out_zip.stem + ".manifest.json").write_text(manifest, encoding="utf-8")


def common_header(kind: str, target: Target, demo: bool) -> dict:
    return {"format": MANIFEST_FORMAT, "kind": kind, "builder_version": BUILDER_VERSION,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "demo": demo, "profile": target.profile, "python_version": target.python_version,
            "arch": target.arch, "platform": target.platform}


# --- offline_packages.zip ----------------------------------------------------------------------


def build_packages(args: argparse.Namespace, target: Target, work: Path, out_zip: Path) -> None:
    staging = work / "packages"
    shutil.rmtree(staging, ignore_errors=True)
    wheels_dir, uv_dir = staging / "wheels", staging / "uv"
    wheelhouse = Path(args.wheelhouse).resolve() if args.wheelhouse else None
    offline = args.offline
    if args.demo:
        # Demo wheels come from a wheelhouse of this machine's wheels, filled here unless given.
        if wheelhouse is None:
            wheelhouse = work / "wheelhouse"
        if not offline:
            fetch_demo_wheelhouse(wheelhouse)
        offline = True

    say(f"uv {UV_VERSION} wheel")
    uv_wheel = download_uv_wheel(target, uv_dir, wheelhouse, offline)
    uv = host_uv(uv_wheel, work)

    say("the cosyvoice-deploy wheel")
    project = build_project_wheel(wheels_dir)
    project_version = project.name.split("-")[1]

    say(f"lock for profile {target.profile}, Python {target.python_version}, {target.platform}")
    if args.demo:
        lock = compile_lock(target, uv, work, wheelhouse, offline, demo_constraints())
    else:
        lock = committed_lock(target)
        if lock is None:
            say(f"profiles/{target.profile}.lock does not match today's inputs or target: "
                "resolving afresh (commit it with --lock-only)")
            lock = compile_lock(target, uv, work, wheelhouse, offline, [])
    third_party = work / "third-party.lock"
    third_party.write_text(lock)

    say("wheels")
    download_wheels(target, third_party, wheels_dir, wheelhouse, offline)
    check_wheels_cover_lock(lock, wheels_dir)
    lock += (f"# this project, built from the checkout\n{PROJECT_NAME}=={project_version} \\\n"
             f"    --hash=sha256:{sha256_of(project)}\n")
    (staging / "lock.txt").write_text(lock)

    say("python-build-standalone")
    archive, note = fetch_standalone(args, target, uv, staging / "python")

    say("launchers and the deploy script")
    (staging / "app").mkdir()
    missing = []
    for launcher in LAUNCHERS:
        if (REPO / launcher).is_file():
            shutil.copy2(REPO / launcher, staging / "app" / launcher)
        else:
            missing.append(launcher)
    if (REPO / DEPLOY_SCRIPT).is_file():
        shutil.copy2(REPO / DEPLOY_SCRIPT, staging / DEPLOY_SCRIPT)

    wheels = sorted(wheels_dir.glob("*.whl"))
    torch_version, cuda = torch_build(wheels_dir)
    glibc = max((wheel_glibc_floor(wheel) for wheel in wheels), default=(0, 0))
    header = common_header("packages", target, args.demo)
    header.update({
        "cuda": cuda, "torch": torch_version,
        "manylinux_max": "host" if target.demo else "%d_%d" % target.manylinux_max,
        "glibc_min": "%d.%d" % glibc, "project_version": project_version,
        "lock": "lock.txt", "lock_pins": len(lock_pins(lock)),
        "uv_wheel": uv_wheel.relative_to(staging).as_posix(), "uv_version": UV_VERSION,
        "python_standalone": archive.relative_to(staging).as_posix() if archive else None,
        "python_standalone_note": note,
        "python_size": tar_size(archive) if archive else 0,
        "install_size": sum(wheel_installed_size(wheel) for wheel in wheels),
        "launchers": ",".join(launcher for launcher in LAUNCHERS if launcher not in missing),
        "launchers_missing": ",".join(missing),
        "extra_index_urls": " ".join(target.extra_index_urls),
    })
    write_zip(staging, out_zip, header)
    if missing:
        print(f"note: {', '.join(missing)} not in this checkout, so not in the bundle",
              file=sys.stderr)


def demo_constraints() -> list[str]:
    """The demo installs the torch build this machine has (a CPU wheel on dev/CI machines)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return [f"torch=={version('torch')}"]
    except PackageNotFoundError:
        return []


def fetch_demo_wheelhouse(wheelhouse: Path) -> None:
    """Downloads what a demo bundle needs into a wheelhouse (pip sees this machine's find-links,
    where uv would not)."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    say(f"filling the demo wheelhouse {wheelhouse}")
    run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
         "--dest", wheelhouse, "-r", REPO / "requirements.txt", *demo_constraints(),
         f"uv=={UV_VERSION}"])


# --- pretrained_models.zip ---------------------------------------------------------------------


def demo_voice(path: Path, seconds: float = 2.5, rate: int = 16000) -> None:
    """A harmonic tone with a slow pitch glide and syllable-like bursts: enough to be a prompt."""
    frames = bytearray()
    phase = 0.0
    for i in range(int(seconds * rate)):
        t = i / rate
        f0 = 140.0 + 30.0 * math.sin(2 * math.pi * 0.7 * t)
        phase += 2 * math.pi * f0 / rate
        envelope = 0.5 * (1 - math.cos(2 * math.pi * min(t / 0.25, 1.0))) if t < 0.125 else 1.0
        envelope *= 0.55 + 0.45 * math.sin(2 * math.pi * 4.0 * t) ** 2
        sample = sum(math.sin(k * phase) / k for k in range(1, 6)) * 0.18 * envelope
        frames += struct.pack("<h", max(-32767, min(32767, int(sample * 32767))))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(bytes(frames))


def build_demo_models(staging: Path) -> None:
    say("demo model (tiny, random weights)")
    run([sys.executable, "-m", "cosyvoice", "make-model", "--size", "tiny",
         "--out", staging / DEMO_MODEL], cwd=REPO)
    voices = staging / "voices"
    voices.mkdir()
    demo_voice(voices / f"[{DEMO_VOICE_NAME}]{DEMO_VOICE_TEXT}.wav")


def link_or_copy(source: str, dest: str) -> None:
    """copytree's copy_function: a hard link where it can (the staging folder is only read, to zip
    it, so linking saves copying gigabytes of weights), a copy across file systems."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def download_models(args: argparse.Namespace, staging: Path, work: Path) -> None:
    if args.models_from:
        source = Path(args.models_from)
        for name in MODELS:
            if not (source / name).is_dir():
                raise BuildError(f"--models-from {source} has no {name}/ folder")
            say(f"copying {source / name}")
            shutil.copytree(source / name, staging / name, copy_function=link_or_copy)
    else:
        download_from_modelscope(args, staging, work)
    if args.voices:
        shutil.copytree(args.voices, staging / "voices", copy_function=link_or_copy)


def download_from_modelscope(args: argparse.Namespace, staging: Path, work: Path) -> None:
    try:
        from modelscope import snapshot_download
    except ImportError as exc:
        raise BuildError("modelscope is not installed here: pip install modelscope, or pass "
                         "--models-from DIR with CosyVoice2-0.5B/ and CosyVoice-ttsfrd/") from exc
    cache = Path(args.download_dir) if args.download_dir else work / "modelscope"
    for name, model_id in MODELS.items():
        say(f"modelscope: {model_id}")
        local = cache / name
        snapshot_download(model_id, local_dir=str(local))
        shutil.copytree(local, staging / name, copy_function=link_or_copy,
                        ignore=shutil.ignore_patterns(".msc", ".mv", "._____temp"))


def zip_members_size(folder: Path) -> int:
    """What unzipping the zips inside a model folder adds (ttsfrd's resource.zip)."""
    total = 0
    for inner in folder.rglob("*.zip"):
        with zipfile.ZipFile(inner) as archive:
            total += sum(info.file_size for info in archive.infolist())
    return total


def build_models(args: argparse.Namespace, target: Target, work: Path, out_zip: Path) -> None:
    staging = work / "models"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if args.demo:
        build_demo_models(staging)
        model, extras = DEMO_MODEL, ""
    else:
        download_models(args, staging, work)
        model, extras = MAIN_MODEL, "CosyVoice-ttsfrd"
    header = common_header("models", target, args.demo)
    voices = sorted(p.name for p in (staging / "voices").glob("*.wav")) if (
        staging / "voices").is_dir() else []
    header.update({"model": model, "ttsfrd": extras or None,
                   "voices": len(voices), "install_size": zip_members_size(staging)})
    write_zip(staging, out_zip, header)


# --- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python offline_packages/build.py",
        description="Builds offline_packages.zip and pretrained_models.zip for autodl_deploy.sh.")
    parser.add_argument("--out", help="output folder for the two zips")
    parser.add_argument("--profile", choices=PROFILE_NAMES, default="torch",
                        help="torch: server.py; trtllm: adds TensorRT-LLM and MPI (default torch)")
    parser.add_argument("--python-version", default="3.10",
                        help="target CPython major.minor (default 3.10; ttsfrd needs 3.10)")
    parser.add_argument("--platform", default="x86_64-manylinux_2_31",
                        help="target platform, uv's spelling; the manylinux version is the newest "
                             "glibc accepted (default x86_64-manylinux_2_31, Ubuntu 20.04)")
    parser.add_argument("--extra-index-url", action="append", default=[],
                        help="another package index (repeatable); the trtllm profile needs "
                             "NVIDIA's, https://pypi.nvidia.com")
    parser.add_argument("--index-strategy",
                        help="uv's --index-strategy, e.g. unsafe-best-match for a torch index")
    parser.add_argument("--wheelhouse", help="a folder of wheels to take first (only it with "
                        "--offline); with --demo --fetch-only, the folder to fill")
    parser.add_argument("--offline", action="store_true",
                        help="touch no index or hub: wheels only from --wheelhouse")
    parser.add_argument("--python-standalone", help="a local python-build-standalone "
                        "install_only .tar.gz for the target Python (else it is downloaded)")
    parser.add_argument("--python-standalone-url", help="download this archive instead of the "
                        "one uv would choose")
    parser.add_argument("--no-python-standalone", action="store_true",
                        help="bundle no Python: the box must have the target version")
    parser.add_argument("--models-from", help="a folder already holding CosyVoice2-0.5B/ and "
                        "CosyVoice-ttsfrd/ (skips modelscope)")
    parser.add_argument("--download-dir", help="where modelscope downloads (default: under "
                        "--work-dir; reuse it to resume)")
    parser.add_argument("--voices", help="a folder of [name]transcript.wav prompts to bundle")
    parser.add_argument("--only", choices=("packages", "models"), help="build just one zip")
    parser.add_argument("--work-dir", help="scratch folder (default OUT/.build)")
    parser.add_argument("--demo", action="store_true",
                        help="tiny random model + one voice + wheels for THIS machine; no hub")
    parser.add_argument("--fetch-only", action="store_true",
                        help="with --demo: only download the demo wheels into --wheelhouse")
    parser.add_argument("--lock-only", action="store_true",
                        help="resolve profiles/PROFILE.lock for the target and write it")
    args = parser.parse_args(argv)
    if not (args.out or args.lock_only or args.fetch_only):
        parser.error("--out DIR is required")
    if args.fetch_only and not (args.demo and args.wheelhouse):
        parser.error("--fetch-only needs --demo and --wheelhouse DIR")
    if args.lock_only and args.demo:
        # A demo lock is for this machine's wheels: it would overwrite the committed target lock.
        parser.error("--lock-only resolves the committed lock for the target; drop --demo")
    return args


def make_target(args: argparse.Namespace) -> Target:
    if args.demo:
        if args.profile != "torch":
            raise BuildError("--demo builds the torch profile only")
        return Target("torch", "%d.%d" % sys.version_info[:2], "host", demo=True)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        raise BuildError(f"--python-version {args.python_version} is not like 3.10")
    if args.profile == "trtllm" and not args.extra_index_url:
        raise BuildError("the trtllm profile needs NVIDIA's package index: pass "
                         "--extra-index-url https://pypi.nvidia.com")
    return Target(args.profile, args.python_version, args.platform,
                  extra_index_urls=args.extra_index_url, index_strategy=args.index_strategy)


def lock_only(target: Target) -> None:
    with tempfile.TemporaryDirectory(prefix="cosyvoice-lock-") as scratch:
        work = Path(scratch)
        uv_wheel = download_uv_wheel(target, work / "uv", None, False)
        lock = compile_lock(target, host_uv(uv_wheel, work), work, None, False, [])
    path = PROFILES / f"{target.profile}.lock"
    path.write_text(lock)
    say(f"wrote {path} ({len(lock_pins(lock))} pins)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        target = make_target(args)
        if args.lock_only:
            lock_only(target)
            return 0
        if args.fetch_only:
            fetch_demo_wheelhouse(Path(args.wheelhouse).resolve())
            return 0
        out = Path(args.out).resolve()
        out.mkdir(parents=True, exist_ok=True)
        work = Path(args.work_dir).resolve() if args.work_dir else out / ".build"
        work.mkdir(parents=True, exist_ok=True)
        if args.only in (None, "packages"):
            build_packages(args, target, work, out / "offline_packages.zip")
        if args.only in (None, "models"):
            build_models(args, target, work, out / "pretrained_models.zip")
        if not args.work_dir:
            shutil.rmtree(work)
        say(f"done: {out}")
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
