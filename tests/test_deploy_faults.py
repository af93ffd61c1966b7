"""autodl_deploy.sh under faults, fast: a tiny bundle of the real shape (the real uv, one filler
wheel, a stand-in server.py that answers /ready at once, a Python archive that links to this
machine's Python), so a whole install takes about a second, and functions called alone by sourcing
the script. The cases of issue 17: a pid file naming a process that is not ours, liveness right
after the fork, a disk that fills at each step (on a tmpfs: skipped, with the reason, where this
machine may not mount one), a server that lost its pid file, a lock held by a killed run's orphan,
relative paths, and the messages (truncated zips, near-match names, the Python checked before
unpacking, doctor, a read-only folder, pasteable hints).

Every case ends in one `error:` line or a correct install on rerun."""
from __future__ import annotations

import base64
import errno
import hashlib
import io
import os
import pty
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "autodl_deploy.sh"
WHEELHOUSE = Path(os.environ.get("COSYVOICE_DEMO_WHEELHOUSE", REPO / ".venv" / "wheelhouse"))
PACKAGES, MODELS = "offline_packages.zip", "pretrained_models.zip"

sys.path.insert(0, str(REPO))
from offline_packages import common, manifest, wheels  # noqa: E402

# The stand-in for server.py: answers every GET with 200 at once (after FAKE_SERVER_DELAY
# seconds, to look like a model still loading), and ends on SIGTERM.
FAKE_SERVER = r'''
import argparse, http.server, os, time
parser = argparse.ArgumentParser()
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=6006)
args, _ = parser.parse_known_args()
time.sleep(float(os.environ.get("FAKE_SERVER_DELAY", "0")))

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass

print("fake server listening", flush=True)
http.server.HTTPServer((args.host, args.port), Handler).serve_forever()
'''


# --- the tiny bundle -----------------------------------------------------------------------------


def base_python() -> Path:
    """The real interpreter behind this venv's python (what a system Python would be)."""
    return Path(getattr(sys, "_base_executable", sys.executable)).resolve()


def filler_wheel(folder: Path, size: int) -> Path:
    """A valid pure-Python wheel holding `size` random bytes."""
    name = folder / "filler-1.0-py3-none-any.whl"
    files = {"filler/__init__.py": b"", "filler/data.bin": os.urandom(size),
             "filler-1.0.dist-info/METADATA":
                 b"Metadata-Version: 2.1\nName: filler\nVersion: 1.0\n",
             "filler-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\n"
                                           b"Root-Is-Purelib: true\nTag: py3-none-any\n"}
    def digest(data: bytes) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record = "".join(f"{path},sha256={digest(data)},{len(data)}\n" for path, data in files.items())
    record += "filler-1.0.dist-info/RECORD,,\n"
    files["filler-1.0.dist-info/RECORD"] = record.encode()
    with zipfile.ZipFile(name, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data, zipfile.ZIP_STORED)
    return name


def python_archive(folder: Path, version: str, size: int) -> tuple[Path, int]:
    """An "install_only" archive whose python/bin/pythonX.Y links to this machine's Python."""
    path = folder / f"cpython-{version}.0-test-install_only.tar.gz"
    blob = os.urandom(size)
    with tarfile.open(path, "w:gz") as archive:
        link = tarfile.TarInfo(f"python/bin/python{version}")
        link.type, link.linkname = tarfile.SYMTYPE, str(base_python())
        archive.addfile(link)
        data = tarfile.TarInfo("python/lib/blob.bin")
        data.size = len(blob)
        archive.addfile(data, io.BytesIO(blob))
    return path, size


def build_tiny_bundle(out: Path, *, wheel_mb: float = 2, model_mb: float = 3,
                      python_mb: float = 2, python_version: str | None = None,
                      standalone: bool = True, real_uv: bool = True) -> Path:
    """offline_packages.zip and pretrained_models.zip in `out`, written by manifest.write_zip
    (with a stand-in uv wheel unless `real_uv`: enough for the preflight)."""
    version = python_version or "%d.%d" % sys.version_info[:2]
    target = common.Target("torch", version, "host", demo=True)
    staging = out / "staging-packages"
    shutil.rmtree(staging, ignore_errors=True)
    for sub in ("uv", "wheels", "app", "python"):
        (staging / sub).mkdir(parents=True)
    if real_uv:
        uv_wheel = next(WHEELHOUSE.glob("uv-*.whl"), None)
        if uv_wheel is None:
            pytest.fail(f"no uv wheel in {WHEELHOUSE}: run setup.sh (it fills the demo "
                        "wheelhouse)", pytrace=False)
        common.link_or_copy(str(uv_wheel), str(staging / "uv" / uv_wheel.name))
    else:
        uv_wheel = staging / "uv" / "uv-0.0.0-py3-none-any.whl"
        with zipfile.ZipFile(uv_wheel, "w") as archive:
            archive.writestr("uv-0.0.0.data/scripts/uv", "#!/bin/sh\n")
    wheel = filler_wheel(staging / "wheels", int(wheel_mb * 2**20))
    (staging / "lock.txt").write_text(
        f"# test lock\nfiller==1.0 \\\n    --hash=sha256:{common.sha256_of(wheel)}\n")
    (staging / "app" / "server.py").write_text(FAKE_SERVER)
    archive, python_size = (python_archive(staging / "python", version, int(python_mb * 2**20))
                            if standalone else (None, 0))
    installed = wheels.wheel_installed_size(wheel)
    manifest.write_zip(staging, out / PACKAGES, {
        **manifest.common_values("packages", target),
        "cuda": "cpu", "torch": "", "manylinux_max": "host", "glibc_min": "0.0",
        "project_version": "0.0.0", "lock": "lock.txt", "lock_pins": 1,
        "uv_wheel": f"uv/{uv_wheel.name}", "uv_version": uv_wheel.name.split("-")[1],
        "python_standalone": archive.relative_to(staging).as_posix() if archive else None,
        "python_standalone_note": "a test archive" if archive else "not bundled (test)",
        "python_size": python_size, "install_size": installed,
        "launchers": "server.py", "launchers_missing": "fast_server.py", "extra_index_urls": ""})
    staging = out / "staging-models"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "Tiny-Model").mkdir(parents=True)
    (staging / "voices").mkdir()
    (staging / "Tiny-Model" / "llm.pt").write_bytes(os.urandom(int(model_mb * 2**20)))
    (staging / "voices" / "[tiny]Hello.wav").write_bytes(b"RIFF" + os.urandom(1000))
    manifest.write_zip(staging, out / MODELS, {
        **manifest.common_values("models", target),
        "models": "tiny=Tiny-Model", "default_model": "tiny", "ttsfrd": None, "voices": 1,
        "install_size": 0})
    for name in ("staging-packages", "staging-models"):
        shutil.rmtree(out / name)
    return out


# --- machinery -----------------------------------------------------------------------------------

RUN_TIMEOUT = 120      # one installer command; a hang fails the test instead of blocking it


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environ(**extra) -> dict:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("COSYVOICE_", "FAKE_SERVER"))}
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env[key] = "http://127.0.0.1:9"
    env.update({key: str(value) for key, value in extra.items()})
    return env


def installer(*args, env: dict | None = None, cwd=None, stdin=None,
              script: Path = SCRIPT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *map(str, args)], capture_output=True, text=True,
                          env=env or environ(), cwd=cwd, stdin=stdin, timeout=RUN_TIMEOUT)


def sourced(snippet: str, *args, cwd=None) -> subprocess.CompletedProcess:
    """`snippet` run in bash after sourcing the installer (which then defines, runs nothing)."""
    return subprocess.run(["bash", "-c", f'source "{SCRIPT}"; {snippet}', "-", *map(str, args)],
                          capture_output=True, text=True, env=environ(), cwd=cwd,
                          timeout=RUN_TIMEOUT)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def one_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """Failed with exactly one line on stderr, `error: ...`, holding every word."""
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    print(lines[0])
    return lines[0]


class Tmpfs:
    """A tmpfs mounted for a test (the fault cases need a disk that fills, fast)."""

    def __init__(self, path: Path, size_mb: int, options: str = "") -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m{options}",
                                 "tmpfs", str(path)], capture_output=True, text=True)
        self.mounted = result.returncode == 0
        self.why = result.stderr.strip() or f"mount exited {result.returncode}"

    def fill(self) -> Path:
        """Fills the disk to its last byte with a file, which is returned (delete it to free)."""
        filler = self.path / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for block in (1 << 20, 1 << 12, 1):
                chunk = b"\0" * block
                while True:
                    try:
                        os.write(fd, chunk)
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC, exc
                        break
        finally:
            os.close(fd)
        return filler

    def free_mb(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize // 2**20

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


def mount_tmpfs(path: Path, size_mb: int, options: str = "") -> Tmpfs:
    """A mounted tmpfs, or a skip that says why (CI runners may not mount)."""
    if os.geteuid() != 0:
        pytest.skip("not root, so no tmpfs can be mounted: the disk-full and read-only cases "
                    "need one and are skipped here")
    disk = Tmpfs(path, size_mb, options)
    if not disk.mounted:
        pytest.skip(f"this machine does not allow mount -t tmpfs ({disk.why}): the disk-full and "
                    "read-only cases need one and are skipped here")
    return disk


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """Scratch space: a tmpfs when this machine allows one (installs take a second there),
    else a temporary folder."""
    root = tmp_path_factory.mktemp("deploy-faults")
    disk = Tmpfs(root / "scratch", 768) if os.geteuid() == 0 else None
    if disk is not None and disk.mounted:
        yield disk.path
        disk.close()
    else:
        (root / "scratch").mkdir(exist_ok=True)
        yield root / "scratch"


@pytest.fixture(scope="module")
def bundle(scratch) -> Path:
    return build_tiny_bundle(scratch / "bundle")


def stage(root: Path, bundle: Path, name: str) -> Path:
    """A fresh data folder holding copies of the zips."""
    data = root / name
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    for zip_name in (PACKAGES, MODELS):
        shutil.copy(bundle / zip_name, data / zip_name)
    return data


def flags(data: Path, port: int, *more) -> list:
    return ["--demo", "--data-dir", data, "--host", "127.0.0.1", "--port", port,
            "--disk-headroom-mb", 0, *more]


@pytest.fixture(scope="module")
def installed(scratch, bundle):
    """The tiny bundle installed (not started), as `--data-dir '../my data 数据'` from a/b, and
    a/b then deleted: (data folder, port, the deploy's result)."""
    root = scratch / "installed"
    (root / "a" / "b").mkdir(parents=True)
    data = stage(root / "a", bundle, "my data 数据")
    port = free_port()
    result = ok(installer("deploy", "--no-start", *flags(Path("../my data 数据"), port),
                          cwd=root / "a" / "b"))
    shutil.rmtree(root / "a" / "b")
    yield data, port, result
    installer("stop", *flags(data, port))


def our_servers(install: Path) -> list[int]:
    """Live processes running this install's server.py."""
    launcher = f"{install}/packages/app/server.py"
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
            state = Path(cmdline.parent, "stat").read_text().rsplit(") ", 1)[1].split()[0]
        except OSError:
            continue
        if launcher.encode() in args and state not in "ZX":
            found.append(int(cmdline.parent.name))
    return found


def session_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[3])
    except OSError:
        return None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]
    except OSError:
        return False
    return state not in "ZX"


def wait_until(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def held(data: Path, step: str, env: dict, *args) -> subprocess.Popen:
    """A deploy run stopped by the script's test hook at `step` (its hold file exists)."""
    hold = data / "cosyvoice" / ".state" / f"hold-{step}"
    run = subprocess.Popen(["bash", str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True,
                           env={**env, "COSYVOICE_DEPLOY_TEST_HOLD": step})
    wait_until(lambda: hold.exists() or run.poll() is not None, f"the hold at {step}", 120)
    if run.poll() is not None:
        pytest.fail(f"the run ended before {step}: {run.stdout.read()}{run.stderr.read()}")
    return run


def kill_group(run: subprocess.Popen) -> None:
    os.killpg(run.pid, signal.SIGKILL)
    run.communicate()


# --- 1. a pid file naming a process that is not ours ---------------------------------------------


def test_foreign_pid_file_is_stale_and_its_process_untouched(installed):
    """A live process with server.py in its command line (in its own session, as ours would
    be) named by the pid file: status, stop, start and restart say the pid file was stale and
    leave the process alone; the server they start is ours."""
    data, port, _ = installed
    run_dir = data / "cosyvoice" / "run"
    foreign = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "server.py",
                                "--port", str(port)], start_new_session=True)
    try:
        for verb in ("status", "stop", "start", "restart"):
            (run_dir / "server.pid").write_text(f"{foreign.pid}\n")
            # as an earlier server of ours left it: same pid, another start time
            (run_dir / "server.id").write_text(f"{foreign.pid} 12345 old-boot\n")
            result = installer(verb, *flags(data, port))
            assert result.returncode == (3 if verb == "status" else 0), result.stderr
            assert f"pid {foreign.pid}" in result.stderr and "stale" in result.stderr, result.stderr
            assert f"left pid {foreign.pid} alone" in result.stderr or verb == "status"
            assert alive(foreign.pid), f"{verb} touched the foreign process"
            if verb in ("start", "restart"):
                assert "CosyVoice is ready" in result.stdout
                pid = int((run_dir / "server.pid").read_text())
                assert pid != foreign.pid and our_servers(data / "cosyvoice") == [pid]
            else:
                assert "stopped" in result.stdout or "not running" in result.stdout
        ok(installer("stop", *flags(data, port)))
        assert our_servers(data / "cosyvoice") == [] and alive(foreign.pid)
    finally:
        foreign.kill()
        foreign.wait()


def test_liveness_right_after_the_fork_is_never_missed(scratch):
    """The identity is read from /proc/PID/stat right after `&`: the child's start time is the
    fork's, so whether it has exec'd yet does not matter (the command line did: 1 in 8)."""
    run = scratch / "liveness"
    result = sourced('INSTALL_DIR=$1; setup_paths; mkdir -p "$RUN_DIR"; missed=0; pids=()\n'
                     'for i in $(seq 40); do sleep 30 & pid=$!; pids+=("$pid")\n'
                     '  record_server "$pid"; server_running || missed=$((missed + 1)); done\n'
                     'kill "${pids[@]}"; wait 2>/dev/null\n'
                     'true & pid=$!; record_server "$pid"; sleep 0.3; wait\n'
                     'if server_running; then echo "a finished server counts as running"; fi\n'
                     'echo "missed $missed"', run)
    assert result.stdout.strip() == "missed 0", result.stdout + result.stderr


# --- 2. a disk that fills ------------------------------------------------------------------------

# Each way a step writes: unzip (packages, models), unzip -j (uv), tar (python), uv (wheels), cp
# (voices), a symbolic link (activate), the server's files (start). venv and ttsfrd write as these
# do (uv; the step marker), and were measured by hand.
FILL_STEPS = ["packages", "uv", "python", "wheels", "models", "voices", "activate", "start"]


def test_disk_full_at_every_step_is_named_and_a_plain_rerun_completes(tmp_path, bundle):
    """Each step in turn finds the disk full (another program filled it after the preflight):
    one line naming the disk and the space, nothing blamed on the zip or the platform, nothing
    left behind; once the space is back, the next plain run resumes, and the last one serves."""
    disk = mount_tmpfs(tmp_path / "disk", 160)
    try:
        data = stage(disk.path, bundle, "data")
        install = data / "cosyvoice"
        port = free_port()
        args = ["deploy", *flags(data, port)]
        for step in FILL_STEPS:
            run = held(data, f"before-{step}", environ(), *args)
            try:
                filler = disk.fill()
                (install / ".state" / f"hold-before-{step}").unlink()
                out, errors = run.communicate(timeout=RUN_TIMEOUT)
            finally:
                if run.poll() is None:
                    kill_group(run)
            line = one_error(subprocess.CompletedProcess(args, run.returncode, out, errors),
                             f"the disk at {disk.path} is full (step {step}): 0 MB free",
                             "free some space there or use a bigger data disk")
            assert not re.search(r"zip|platform|another Python|unexpectedly", line), line
            assert not [p.name for p in install.glob("**/*.tmp*")], "a temporary file was left"
            assert f"{step}.done" not in os.listdir(install / ".state")
            filler.unlink()
        assert "CosyVoice is ready" in ok(installer(*args)).stdout
        ok(installer("stop", *flags(data, port)))
    finally:
        installer("stop", "--install-dir", tmp_path / "disk" / "data" / "cosyvoice")
        disk.close()


def test_unzip_on_a_full_disk_from_a_terminal_does_not_hang(tmp_path, bundle):
    """unpack_zip alone, with a terminal as stdin: unzip's "Continue? (y/n)" gets no answer from
    it, the disk is named, and the half-unpacked folder is gone."""
    disk = mount_tmpfs(tmp_path / "disk", 8)
    try:
        controller, terminal = pty.openpty()
        try:
            result = subprocess.run(
                ["bash", "-c", f'source "{SCRIPT}"; INSTALL_DIR=$1; DATA_DIR=$1; setup_paths; '
                 'make_work_dir; LOG=/dev/null; STEP=packages; '
                 'unpack_zip "$2" /dev/null "$PKG_DIR" packages', "-", disk.path / "install",
                 bundle / PACKAGES],
                stdin=terminal, capture_output=True, text=True, env=environ(), timeout=60)
        finally:
            os.close(controller)
            os.close(terminal)
        one_error(result, f"the disk at {disk.path} is full (step packages)")
        assert not (disk.path / "install" / "packages.tmp").exists()
    finally:
        disk.close()


def test_leftovers_of_a_killed_run_count_as_free_space(tmp_path, bundle):
    """A run killed while unpacking leaves packages.tmp; with the disk then nearly full, doctor
    counts it as reclaimable and deploy removes it before measuring, and installs."""
    disk = mount_tmpfs(tmp_path / "disk", 160)
    try:
        data = stage(disk.path, bundle, "data")
        port = free_port()
        kill_group(held(data, "packages", environ(), "deploy", "--no-start", *flags(data, port)))
        leftover = data / "cosyvoice" / "packages.tmp"
        assert leftover.is_dir()
        doctor = ok(installer("doctor", *flags(data, port)))
        need = int(re.search(r"(\d+) MB needed", doctor.stdout).group(1))
        filler = disk.fill()
        with open(filler, "r+b") as out:   # give back less than the need, more than need - leftover
            out.truncate(filler.stat().st_size - (need - 8) * 2**20)
        assert disk.free_mb() < need
        doctor = ok(installer("doctor", *flags(data, port)))
        assert "MB of leftovers of an interrupted run, which deploy removes" in doctor.stdout
        ok(installer("deploy", "--no-start", *flags(data, port)))
        assert not leftover.exists()
    finally:
        disk.close()


# --- 3. a server that lost its pid file; the lock ---------------------------------------------


def test_server_without_pid_file_is_found_and_adopted(installed):
    data, port, _ = installed
    install = data / "cosyvoice"
    run_dir = install / "run"
    ok(installer("start", *flags(data, port)))
    pid = int((run_dir / "server.pid").read_text())
    for name in ("server.pid", "server.id"):
        (run_dir / name).unlink()
    status = installer("status", *flags(data, port))
    assert status.returncode == 0 and f"pid {pid} (found without its pid file" in status.stdout
    stop = ok(installer("stop", *flags(data, port)))
    assert "adopted" in stop.stdout and f"stopping the server (pid {pid})" in stop.stdout
    assert not alive(pid)

    # Killed right after starting a server that is still loading (not listening yet): the rerun
    # adopts it instead of starting a second one that would die on the port.
    env = environ(FAKE_SERVER_DELAY=2)
    run = held(data, "server-forked", env, "start", *flags(data, port))
    forked = int((run_dir / "server.pid").read_text())
    wait_until(lambda: session_of(forked) == forked, "the server to leave the script's session")
    kill_group(run)
    (run_dir / "server.pid").unlink()
    (run_dir / "server.id").unlink()
    assert our_servers(install) == [forked]
    server = forked
    again = ok(installer("start", *flags(data, port), env=env))
    assert f"runs as pid {server} but its pid file was missing" in again.stdout
    assert "already running" in again.stdout and "CosyVoice is ready" in again.stdout
    assert our_servers(install) == [server]
    ok(installer("stop", *flags(data, port)))
    assert our_servers(install) == []


def lock_holders(lock: Path) -> set[int]:
    pids = set()
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) == str(lock):
                pids.add(int(fd.parts[2]))
        except OSError:
            pass
    return pids


def test_lock_is_never_inherited_and_a_held_lock_names_its_holder(installed):
    data, port, _ = installed
    install = data / "cosyvoice"
    lock = install / ".deploy.lock"
    run = held(data, "before-start", environ(), "start", *flags(data, port))
    try:
        holders = lock_holders(lock)
        assert len(holders) == 1, holders   # the helper, not the script or anything it started
        [helper] = holders
        assert Path(f"/proc/{helper}/comm").read_text().strip() == "flock"
        waited = sourced('INSTALL_DIR=$1; setup_paths; LOCK_WAIT=1; take_lock', install)
        one_error(waited, "another autodl_deploy.sh is working on ", f": pid {run.pid} (bash ",
                  "still is after 1 s", f"kill {run.pid}")
        os.kill(run.pid, signal.SIGKILL)   # the script alone: its children live on
        run.communicate()
        wait_until(lambda: not lock_holders(lock), "the lock to be free")
        again = ok(installer("start", *flags(data, port)))
        assert "another autodl_deploy.sh" not in again.stdout + again.stderr
        ok(installer("stop", *flags(data, port)))
    finally:
        if run.poll() is None:
            kill_group(run)
        subprocess.run(["pkill", "-KILL", "-s", str(run.pid)], capture_output=True)

    # A process of an older script's run that kept the lock: named at once, never waited for.
    orphan = subprocess.Popen(["flock", str(lock), "sleep", "60"], start_new_session=True)
    try:
        wait_until(lambda: lock_holders(lock), "the orphan to take the lock")
        line = one_error(installer("stop", *flags(data, port)), "which is not an autodl_deploy.sh",
                         "kill ")
        assert re.search(r"held by pid (\d+) \((flock|sleep)", line), line
    finally:
        os.killpg(orphan.pid, signal.SIGKILL)
        orphan.wait()


# --- 4. paths, hints and messages ----------------------------------------------------------------


def test_relative_paths_with_spaces_and_pasteable_hints(installed):
    """Installed with --data-dir '../my data 数据' from a/b (the fixture): everything recorded is
    absolute and canonical, so the install works after a/b is gone, and the printed
    start/status/logs/stop hints, pasted into a shell as they are, work for a path with a space
    and a non-ASCII name."""
    data, port, deployed = installed
    install = data / "cosyvoice"
    assert os.readlink(install / "venv").startswith(str(install / "envs"))
    assert "/b/.." not in (install / ".state" / "python.path").read_text()
    hint = re.search(r"run '(.*)' when you want it", deployed.stdout).group(1)
    assert str(install) in shlex.split(hint), hint

    def paste(command: str, *more: str) -> subprocess.CompletedProcess:
        return ok(subprocess.run(["bash", "-c", " ".join([command, *more])], capture_output=True,
                                 text=True, env=environ(), cwd="/", timeout=RUN_TIMEOUT))

    started = paste(hint, "--host 127.0.0.1")
    assert "CosyVoice is ready" in started.stdout
    hints = dict(re.findall(r"^    (status|logs|stop): +(.*)$", started.stdout, re.M))
    assert set(hints) == {"status", "logs", "stop"}
    assert "running" in paste(hints["status"]).stdout
    assert "fake server listening" in paste(hints["logs"]).stdout
    paste(hints["stop"])
    assert our_servers(install) == []


def test_zip_messages_name_the_real_cause(scratch, bundle):
    """A zip cut just after a wheel stored in it (unzip then takes the wheel's end record for the
    zip's) is called incomplete; missing zips are named together, with near-match names and the
    command that renames them; pasting it fixes the run."""
    data = stage(scratch, bundle, "messages")
    port = free_port()
    with zipfile.ZipFile(bundle / PACKAGES) as archive:
        wheel = next(info for info in archive.infolist() if info.filename.startswith("uv/"))
        end = (wheel.header_offset + 30 + len(wheel.filename.encode()) + len(wheel.extra)
               + wheel.compress_size)
    (data / PACKAGES).write_bytes((bundle / PACKAGES).read_bytes()[:end])
    for verb in ("deploy", "doctor"):
        result = installer(verb, "--dry-run", *flags(data, port))
        assert "incomplete or not a zip file (truncated upload?)" in result.stdout + result.stderr
        assert "attempting to process anyway" not in result.stdout + result.stderr
        assert "no manifest.json" not in result.stdout + result.stderr

    (data / PACKAGES).unlink()
    (data / MODELS).rename(data / "Pretrained_Models (1).zip")
    shutil.copy(bundle / PACKAGES, data / "offline_packages.zip.zip")
    line = one_error(installer("deploy", "--dry-run", *flags(data, port)),
                     f"{PACKAGES} and {MODELS} are not in {data}: upload them there")
    renames = re.findall(r"if it is, (mv -- .*?)(?:;|$| \(full log)", line)
    assert len(renames) == 2, line
    for command in renames:
        ok(subprocess.run(["bash", "-c", command], capture_output=True, text=True))
    ok(installer("deploy", "--dry-run", *flags(data, port)))
    shutil.rmtree(data)


def test_python_is_checked_before_unpacking_and_doctor_lists_every_stop(scratch):
    """A bundle for a Python this box lacks, without its own: the deploy stops in the preflight
    (nothing unpacked), and doctor lists that with everything else a deploy would stop on: the
    missing launcher, a taken port with its holder's pid."""
    bundle = build_tiny_bundle(scratch / "bundle-py399", python_version="3.99",
                               standalone=False, real_uv=False, wheel_mb=0.01, model_mb=0.01)
    data = stage(scratch, bundle, "python-3.99")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        one_error(installer("deploy", *flags(data, free_port())),
                  "no Python 3.99 on this machine and none in the bundle")
        assert not (data / "cosyvoice" / "packages").exists()
        doctor = installer("doctor", *flags(data, port, "--backend", "trtllm"))
        fails = [line for line in doctor.stdout.splitlines() if line.startswith("  FAIL")]
        assert any("no Python 3.99" in line for line in fails), doctor.stdout
        assert any("--backend trtllm needs a bundle of the trtllm profile" in line
                   for line in fails), doctor.stdout
        assert any(f"port {port} is already in use by pid {os.getpid()}" in line
                   for line in fails), doctor.stdout
        one_error(doctor, f"{len(fails)} check(s) failed")
        doctor = installer("doctor", *flags(data, free_port()))
        assert "FAIL  no Python 3.99" in doctor.stdout
    finally:
        listener.close()
    shutil.rmtree(data)


def test_read_only_folder_is_one_sentence(tmp_path, bundle):
    disk = mount_tmpfs(tmp_path / "ro", 1, ",ro")
    try:
        port = free_port()
        for verb in ("deploy", "start", "stop"):
            one_error(installer(verb, *flags(disk.path, port, "--bundle-dir", bundle)),
                      f"{disk.path}/cosyvoice is on a read-only file system: pass --data-dir")
        doctor = installer("doctor", *flags(disk.path, port, "--bundle-dir", bundle))
        assert "FAIL  " + f"{disk.path}/cosyvoice is on a read-only file system" in doctor.stdout
    finally:
        disk.close()
