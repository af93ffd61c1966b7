"""The offline deploy, end to end: build the demo bundles, install them with autodl_deploy.sh where
no network exists, serve, and the fault matrix (each fault: one error line, then a rerun succeeds).

Everything runs inside a network namespace that has only loopback (`unshare -n`), builder
included, so nothing can be fetched. Where unshare is not allowed, the same runs on this machine
with every proxy variable pointing at a closed port and the deploy bound to 127.0.0.1.

The demo wheels come from a wheelhouse filled by setup.sh (COSYVOICE_DEMO_WHEELHOUSE, default
.venv/wheelhouse): `python offline_packages/build.py --demo --fetch-only --wheelhouse DIR`.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import json
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "autodl_deploy.sh"
BUILDER = REPO / "offline_packages" / "build.py"
WHEELHOUSE = Path(os.environ.get("COSYVOICE_DEMO_WHEELHOUSE", REPO / ".venv" / "wheelhouse"))
TIMEOUT = 900          # a generous bound on one command; never asserted
PACKAGES, MODELS = "offline_packages.zip", "pretrained_models.zip"
STEPS = ["verify", "packages", "uv", "python", "venv", "wheels", "models", "voices", "ttsfrd",
         "activate"]

# What the tests send to the server: prints "STATUS BYTES" and writes the body to argv[3].
CLIENT = r"""
import sys, urllib.error, urllib.parse, urllib.request
url, form, out = sys.argv[1], sys.argv[2], sys.argv[3]
data = urllib.parse.urlencode(dict(p.split("=", 1) for p in form.split("&"))).encode() if form else None
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(urllib.request.Request(url, data=data), timeout=120) as response:
        body, status = response.read(), response.status
except urllib.error.HTTPError as exc:
    body, status = exc.read(), exc.code
open(out, "wb").write(body)
print(status, len(body))
"""


def namespace_works() -> bool:
    if not all(shutil.which(tool) for tool in ("unshare", "nsenter", "ip")):
        return False
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"],
                           capture_output=True, text=True)
    return probe.returncode == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Box:
    """The offline box: a loopback-only network namespace, held open by a sleeping process."""

    def __init__(self) -> None:
        self.isolated = namespace_works()
        self.env = {key: value for key, value in os.environ.items()
                    if not key.startswith("COSYVOICE_") and key.lower() not in
                    ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
        # Belt and braces: any HTTP client that tried would meet a closed port.
        for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            self.env[key] = "http://127.0.0.1:9"
        self.env["PIP_NO_INDEX"] = "1"
        self.holder = None
        self.prefix: list[str] = []
        if self.isolated:
            self.holder = subprocess.Popen(
                ["unshare", "-n", "sh", "-c", "ip link set lo up && exec sleep 86400"])
            self.prefix = ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net"]
            for _ in range(100):
                link = subprocess.run(self.prefix + ["ip", "-o", "link", "show", "lo"],
                                      capture_output=True, text=True)
                if link.returncode == 0 and "LOOPBACK,UP" in link.stdout:
                    break
                time.sleep(0.1)
            else:
                pytest.fail("the loopback interface did not come up in the test namespace")
        self.host = "0.0.0.0" if self.isolated else "127.0.0.1"

    def port(self) -> int:
        return 6006 if self.isolated else free_port()

    def run(self, args: list, timeout: float = TIMEOUT, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.prefix + [str(arg) for arg in args], capture_output=True,
                              text=True, timeout=timeout, env=self.env, **kwargs)

    def popen(self, args: list, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.prefix + [str(arg) for arg in args], env=self.env,
                                start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **kwargs)

    def request(self, url: str, out: Path, form: str = "") -> tuple[int, int]:
        result = self.run([sys.executable, "-c", CLIENT, url, form, out], timeout=300)
        assert result.returncode == 0, result.stderr
        status, size = result.stdout.split()
        return int(status), int(size)

    def close(self) -> None:
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait()


@pytest.fixture(scope="module")
def box():
    offline = Box()
    yield offline
    offline.close()


@pytest.fixture(scope="module")
def workspace():
    """Scratch space for this module, removed at the end (installs are hundreds of MB each)."""
    root = Path(tempfile.mkdtemp(prefix="cosyvoice-deploy-test-"))
    yield root
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def bundle(box, workspace) -> Path:
    """The demo bundles, built once, offline, from the setup.sh wheelhouse."""
    if not any(WHEELHOUSE.glob("uv-*.whl")):
        pytest.fail(f"the demo wheelhouse {WHEELHOUSE} is empty; fill it (with the index) by "
                    f"running setup.sh, or: python {BUILDER.relative_to(REPO)} --demo --fetch-only "
                    f"--wheelhouse {WHEELHOUSE}", pytrace=False)
    out = workspace / "bundle"
    result = box.run([sys.executable, BUILDER, "--demo", "--offline", "--wheelhouse",
                      WHEELHOUSE, "--out", out], cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in (PACKAGES, MODELS):
        assert (out / name).is_file()
    return out


@pytest.fixture(scope="module")
def uv_cache(workspace) -> Path:
    """One uv cache for the fault cases, so each install after the first unpacks nothing."""
    return workspace / "uv-cache"


def served_model(bundle: Path) -> tuple[str, str]:
    """(name, folder) of the model the demo bundle serves by default, from its manifest."""
    fields = json.loads((bundle / "pretrained_models.manifest.json").read_text())
    pairs = dict(pair.split("=", 1) for pair in fields["models"].split(","))
    return fields["default_model"], pairs[fields["default_model"]]


def stage(workspace: Path, bundle: Path, name: str, zips=(PACKAGES, MODELS)) -> Path:
    """A fresh data dir holding the zips (hard links: never write through them)."""
    data = workspace / name
    if data.exists():
        shutil.rmtree(data)
    data.mkdir()
    for zip_name in zips:
        os.link(bundle / zip_name, data / zip_name)
    return data


def deploy(box: Box, data: Path, *flags, verb: str = "deploy", port: int | None = None,
           uv_cache: Path | None = None, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    args = ["bash", SCRIPT, verb, "--demo", "--data-dir", data, "--host", box.host,
            "--port", port or 6006]
    if uv_cache is not None:
        args += ["--uv-cache-dir", uv_cache]
    return box.run(args + list(flags), timeout=timeout)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


def assert_one_error(result: subprocess.CompletedProcess, *words: str) -> str:
    """Failed, with exactly one `error:` line (the last on stderr) naming a log that exists."""
    assert result.returncode != 0, result.stdout[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == errors[0]
    line = errors[0]
    for word in words:
        assert word in line, line
    if "(full log: " in line:
        log = Path(line.rsplit("(full log: ", 1)[1].rstrip(")"))
        assert log.is_file() and log.stat().st_size > 0
    print(line)
    return line


def done_steps(data: Path) -> set[str]:
    state = data / "cosyvoice" / ".state"
    return {path.name[:-5] for path in state.glob("*.done")} if state.is_dir() else set()


def assert_installed(data: Path) -> None:
    install = data / "cosyvoice"
    assert done_steps(data) >= set(STEPS)
    assert (install / "venv").is_symlink() and (install / "venv" / "bin" / "python").exists()
    assert not list(install.glob("*.tmp")) and not list(install.glob("*.old"))
    assert not (install / ".state" / "wheels.started").exists()


# --- the demo flow -------------------------------------------------------------------------------


def test_demo_deploy_serves_offline(box, bundle, workspace):
    """Port taken -> one line, nothing installed; freed -> install, serve, synthesise, status,
    a rerun that changes nothing, stop."""
    data = stage(workspace, bundle, "flow")
    port = box.port()
    squatter = box.popen([sys.executable, "-c",
                          "import socket, time; s = socket.socket(); "
                          f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(600)"])
    try:
        for _ in range(100):
            if box.run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"]).returncode == 0:
                break
            time.sleep(0.1)
        taken = deploy(box, data, port=port)
        assert_one_error(taken, f"port {port} is already in use")
        assert done_steps(data) == set()
    finally:
        os.killpg(squatter.pid, signal.SIGKILL)
        squatter.wait()

    first = deploy(box, data, port=port)
    try:
        assert_ok(first)
        assert "CosyVoice is ready" in first.stdout
        assert f"model {served_model(bundle)[0]}" in first.stdout
        assert_installed(data)
        url = f"http://127.0.0.1:{port}"
        assert box.request(f"{url}/health", workspace / "health.json")[0] == 200
        assert box.request(f"{url}/ready", workspace / "ready.json")[0] == 200
        status, size = box.request(f"{url}/tts", workspace / "speech.pcm",
                                   "text=Hello from the offline box.&speaker=default")
        assert status == 200 and size > 0 and size % 2 == 0   # s16le samples
        pcm = (workspace / "speech.pcm").read_bytes()
        assert any(pcm[i] for i in range(0, min(len(pcm), 20000)))   # not all silence

        running = deploy(box, data, port=port, verb="status")
        assert_ok(running)
        assert "running" in running.stdout and "/ready 200" in running.stdout
        pid = (data / "cosyvoice" / "run" / "server.pid").read_text().strip()
        # What identifies it: the pid, the start time in /proc/PID/stat (field 22), the boot.
        recorded_pid, started, _ = (data / "cosyvoice" / "run" / "server.id").read_text().split()
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
        assert recorded_pid == pid and started == stat[19] and stat[3] == pid   # a session leader

        again = deploy(box, data, port=port)
        assert_ok(again)
        for step in STEPS:
            assert f"==> {step}: already done" in again.stdout, again.stdout
        assert "already running" in again.stdout
        assert (data / "cosyvoice" / "run" / "server.pid").read_text().strip() == pid
    finally:
        stopped = deploy(box, data, port=port, verb="stop")
    assert_ok(stopped)
    after = deploy(box, data, port=port, verb="status")
    assert after.returncode == 3 and "stopped" in after.stdout
    assert not Path(f"/proc/{pid}").exists()
    logs = deploy(box, data, port=port, verb="logs")
    assert_ok(logs)
    assert "starting server.py" in logs.stdout
    shutil.rmtree(data)


# --- the fault matrix: one line each, then the rerun succeeds --------------------------------------


def rewrite_zip(source: Path, target: Path, change=None, add=None) -> None:
    """A valid zip with the same manifest: one member's bytes changed, or one member added."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            body = old.read(info)
            if change and info.filename.startswith(change):
                body += b"\0"
            new.writestr(info, body)
        if add:
            new.writestr(add, b"not a wheel")


def flip_byte(source: Path, target: Path) -> None:
    """One flipped byte in the middle of the largest member's data."""
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        big = max(archive.infolist(), key=lambda info: info.compress_size)
        offset = (big.header_offset + 30 + len(big.filename.encode()) + len(big.extra)
                  + big.compress_size // 2)
    data[offset] ^= 0xFF
    target.write_bytes(bytes(data))


def replace(data: Path, name: str) -> Path:
    target = data / name
    target.unlink()
    return target


ZIP_FAULTS = {
    "missing zip": ("is not in", lambda data, bundle: replace(data, PACKAGES)),
    "corrupt zip (flipped byte)": (
        "is corrupt", lambda data, bundle: flip_byte(bundle / PACKAGES, replace(data, PACKAGES))),
    "truncated zip": (
        "is incomplete or not a zip file",
        lambda data, bundle: replace(data, MODELS).write_bytes(
            (bundle / MODELS).read_bytes()[: (bundle / MODELS).stat().st_size * 2 // 3])),
    "manifest mismatch (changed file)": (
        "does not match its manifest.json (sha256)",
        lambda data, bundle: rewrite_zip(bundle / MODELS, replace(data, MODELS), change="voices/")),
    "manifest mismatch (extra file)": (
        "does not match its manifest.json",
        lambda data, bundle: rewrite_zip(bundle / PACKAGES, replace(data, PACKAGES),
                                         add="wheels/extra-1.0-py3-none-any.whl")),
}


@pytest.mark.parametrize("fault", list(ZIP_FAULTS))
def test_bad_zip_is_one_line_then_resumes(box, bundle, workspace, uv_cache, fault):
    words, make = ZIP_FAULTS[fault]
    data = stage(workspace, bundle, "zip-fault")
    make(data, bundle)
    failed = deploy(box, data, "--no-start", uv_cache=uv_cache)
    assert_one_error(failed, words)
    assert not (data / "cosyvoice" / "pretrained_models").exists()
    for name in (PACKAGES, MODELS):
        (data / name).unlink(missing_ok=True)
        os.link(bundle / name, data / name)
    assert_ok(deploy(box, data, "--no-start", uv_cache=uv_cache))
    assert_installed(data)
    shutil.rmtree(data)


@pytest.mark.parametrize("flags, words", [
    (["--disk-headroom-mb", "1000000000"], ["not enough free disk space", "MB free"]),
    (["--python", "3.9"], ["Python 3.9 was requested", "bundled wheels are for Python"]),
    (["--python", "/nonexistent/python3"], ["is not an executable file"]),
    (["--backend", "trtllm"], ["needs a bundle of the trtllm profile"]),
], ids=["too little disk", "wrong Python version", "missing Python path", "trtllm on torch bundle"])
def test_preflight_fault_is_one_line_then_resumes(box, bundle, workspace, uv_cache, flags, words):
    data = stage(workspace, bundle, "preflight-fault")
    failed = deploy(box, data, "--no-start", *flags, uv_cache=uv_cache)
    assert_one_error(failed, *words)
    assert done_steps(data) == set()
    assert_ok(deploy(box, data, "--no-start", uv_cache=uv_cache))
    assert_installed(data)
    if flags[0] == "--backend":
        # start checks the same; and a bundle without fast_server.py says so in one line.
        started = deploy(box, data, "--backend", "trtllm", verb="start", uv_cache=uv_cache)
        assert_one_error(started, "needs a bundle of the trtllm profile")
        (data / "cosyvoice" / "packages" / "app" / "fast_server.py").unlink(missing_ok=True)
        started = deploy(box, data, "--backend", "trtllm", verb="start", uv_cache=uv_cache)
        assert_one_error(started, "fast_server.py is not in this bundle")
    shutil.rmtree(data)


def wait_for(path: Path, process: subprocess.Popen, what: str) -> None:
    for _ in range(6000):
        if path.exists():
            return
        if process.poll() is not None:
            pytest.fail(f"the deploy ended before {what}: {process.stdout.read()[-2000:]}"
                        f"{process.stderr.read()[-2000:]}")
        time.sleep(0.05)
    pytest.fail(f"the deploy never reached {what}")


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL to the deploy and everything it started, and wait until all of them are gone."""
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    for _ in range(600):
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail("processes of the killed deploy are still alive after 30 s")


def test_killed_during_wheels_then_rerun(box, bundle, workspace):
    """SIGKILL while uv installs (a cold cache: unpacking torch takes a while); the rerun starts
    the environment afresh and finishes."""
    data = stage(workspace, bundle, "kill-wheels")
    state = data / "cosyvoice" / ".state"
    run = box.popen(["bash", SCRIPT, "--demo", "--no-start", "--data-dir", data])
    wait_for(state / "wheels.started", run, "the wheel step")
    time.sleep(1.0)
    kill_group(run)
    assert not (state / "wheels.done").exists(), "uv finished before the kill"
    assert not (data / "cosyvoice" / "venv").exists()
    again = deploy(box, data, "--no-start")
    assert_ok(again)
    assert "a previous wheel install was interrupted" in again.stdout
    assert_installed(data)
    shutil.rmtree(data)


def test_killed_during_model_extraction_then_rerun(box, bundle, workspace, uv_cache):
    """SIGKILL with the models half-unpacked (held there by the script's test hook): nothing is
    in its final place, and the rerun unpacks them again."""
    data = stage(workspace, bundle, "kill-models")
    install = data / "cosyvoice"
    env = {"COSYVOICE_DEPLOY_TEST_HOLD": "models"}
    run = box.popen(["env", *[f"{k}={v}" for k, v in env.items()], "bash", SCRIPT, "--demo",
                     "--no-start", "--data-dir", data, "--uv-cache-dir", uv_cache])
    wait_for(install / ".state" / "hold-models", run, "the model step")
    kill_group(run)
    assert (install / "pretrained_models.tmp").is_dir()
    assert not (install / "pretrained_models").exists()
    assert "models" not in done_steps(data) and "wheels" in done_steps(data)
    again = deploy(box, data, "--no-start", uv_cache=uv_cache)
    assert_ok(again)
    assert "==> wheels: already done" in again.stdout
    assert_installed(data)
    assert (install / "pretrained_models" / served_model(bundle)[1] / "llm.pt").is_file()
    shutil.rmtree(data)


def test_doctor_and_dry_run_change_nothing(box, bundle, workspace):
    data = stage(workspace, bundle, "doctor")
    doctor = deploy(box, data, verb="doctor")
    assert_ok(doctor)
    assert "no problems found" in doctor.stdout and "FAIL" not in doctor.stdout
    dry = deploy(box, data, "--dry-run")
    assert_ok(dry)
    assert all(f"==> {step}: would run" in dry.stdout for step in STEPS)
    assert done_steps(data) == set() and not (data / "cosyvoice" / "packages").exists()
    name, folder = served_model(bundle)
    assert f"ok    model {name} ({folder})" in doctor.stdout
    assert_one_error(deploy(box, data, "--dry-run", "--model", "nope"),
                     f"--model nope is not in this bundle, which holds {name} (default)")
    (data / PACKAGES).unlink()
    missing = deploy(box, data, verb="doctor")
    assert_one_error(missing, "1 check(s) failed")
    assert "FAIL  offline_packages.zip is not in" in missing.stdout
    shutil.rmtree(data)
