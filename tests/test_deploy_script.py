"""autodl_deploy.sh is shellcheck-clean and explains itself; the bundle builder's pure parts
(target tags, manifest format, the committed locks). Nothing here builds or installs."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "autodl_deploy.sh"
PROFILES = REPO / "offline_packages" / "profiles"


def load_builder():
    """offline_packages/build.py as a module (it is a script, not part of the package)."""
    if "bundle_builder" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bundle_builder",
                                                      REPO / "offline_packages" / "build.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module   # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
    return sys.modules["bundle_builder"]


def test_shellcheck_finds_nothing():
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed: apt-get install -y shellcheck (setup.sh does)",
                    pytrace=False)
    result = subprocess.run(["shellcheck", "--severity=style", "--shell=bash", str(SCRIPT)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout


def test_help_lists_every_verb_and_flag():
    result = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for word in ("deploy", "doctor", "start", "stop", "restart", "status", "logs",
                 "--data-dir", "--install-dir", "--host", "--port", "--backend", "--no-start",
                 "--dry-run", "--demo", "--online", "COSYVOICE_DATA_DIR", "COSYVOICE_PORT"):
        assert word in result.stdout, word


def test_bad_arguments_are_one_line(tmp_path):
    for args, words in ((["--frobnicate"], "unknown argument"),
                        (["--port"], "--port needs a value"),
                        (["--ready-timeout", "soon"], "whole numbers")):
        result = subprocess.run(["bash", str(SCRIPT), *args, "--data-dir", str(tmp_path)],
                                capture_output=True, text=True)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error:")
        assert words in result.stderr


def test_missing_data_dir_is_one_line(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), "--data-dir", str(tmp_path / "nope")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "does not exist: pass --data-dir" in result.stderr


def test_status_without_install_says_stopped(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), "status", "--data-dir", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 3
    assert "not installed" in result.stdout and "stopped" in result.stdout


def test_target_platform_tags_stop_at_glibc_2_31():
    builder = load_builder()
    target = builder.Target("torch", "3.10", "x86_64-manylinux_2_31")
    tags = target.pip_platform_tags()
    assert tags[0] == "manylinux_2_31_x86_64"
    assert "manylinux_2_28_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert not any(re.search(r"manylinux_2_(3[2-9]|[4-9]\d)", tag) for tag in tags)
    assert target.abi == "cp310"


def test_manifest_is_json_with_one_file_per_line():
    builder = load_builder()
    entries = [{"path": "wheels/a-1.0-py3-none-any.whl", "sha256": "0" * 64, "size": 3},
               {"path": "voices/[默认]你好.wav", "sha256": "f" * 64, "size": 5}]
    text = builder.manifest_text({"format": builder.MANIFEST_FORMAT, "kind": "models",
                                  "python_standalone": None, "demo": True}, entries)
    data = json.loads(text)
    assert data["files"] == entries and data["python_standalone"] is None
    # The shape the installer's sed expressions read.
    assert '\n  "kind": "models",\n' in text
    assert ('\n    {"path": "voices/[默认]你好.wav", "sha256": "' + "f" * 64 + '", "size": 5}\n'
            in text)
    with pytest.raises(TypeError):
        builder.manifest_text({"nested": {"no": 1}}, entries)


def test_committed_torch_lock_is_pinned_with_hashes_for_the_target():
    builder = load_builder()
    lock = (PROFILES / "torch.lock").read_text()
    header = lock.splitlines()[0]
    assert "profile=torch python=3.10 platform=x86_64-manylinux_2_31" in header
    pins = dict(builder.lock_pins(lock))
    assert pins["torch"] == "2.7.1"
    assert any(name.startswith("nvidia-cuda-runtime-cu12") for name in pins)   # a CUDA 12 build
    blocks = re.split(r"\n(?=[a-z0-9])", lock.split("\n", 2)[2])
    for block in blocks:
        if "==" in block:
            assert "--hash=sha256:" in block, block.splitlines()[0]


def test_trtllm_profile_needs_nvidia_index():
    builder = load_builder()
    args = builder.parse_args(["--profile", "trtllm", "--out", "x"])
    with pytest.raises(builder.BuildError, match="extra-index-url https://pypi.nvidia.com"):
        builder.make_target(args)
    assert "tensorrt-llm==1.0.0" in builder.read_profile("trtllm")


def test_lock_only_refuses_demo(capsys):
    builder = load_builder()
    with pytest.raises(SystemExit):
        builder.parse_args(["--lock-only", "--demo"])
    assert "drop --demo" in capsys.readouterr().err


def test_models_from_takes_the_voices_too_and_links_the_weights(tmp_path):
    builder = load_builder()
    source, voices, staging = tmp_path / "models", tmp_path / "voices", tmp_path / "staging"
    for name in builder.MODELS:
        (source / name).mkdir(parents=True)
        (source / name / "weights.pt").write_bytes(b"weights")
    voices.mkdir()
    (voices / "[bob]hello.wav").write_bytes(b"RIFF")
    staging.mkdir()
    args = builder.parse_args(["--out", "x", "--models-from", str(source), "--voices", str(voices)])
    builder.download_models(args, staging, tmp_path / "work")
    assert (staging / "voices" / "[bob]hello.wav").read_bytes() == b"RIFF"
    for name in builder.MODELS:
        copied = staging / name / "weights.pt"
        assert copied.read_bytes() == b"weights"
        assert copied.stat().st_ino == (source / name / "weights.pt").stat().st_ino   # a hard link


def test_link_or_copy_copies_when_it_cannot_link(tmp_path, monkeypatch):
    builder = load_builder()
    (tmp_path / "a").write_bytes(b"data")

    def cross_device(*_args, **_kwargs):
        raise OSError(18, "Invalid cross-device link")
    monkeypatch.setattr(builder.os, "link", cross_device)
    builder.link_or_copy(str(tmp_path / "a"), str(tmp_path / "b"))
    assert (tmp_path / "b").read_bytes() == b"data"
    assert (tmp_path / "b").stat().st_ino != (tmp_path / "a").stat().st_ino


@pytest.mark.parametrize("script, chosen", [("#!/bin/sh\nexit 0\n", "pinned"),
                                            ("#!/bin/sh\nexit 1\n", "path")],
                         ids=["pinned uv runs", "pinned uv fails"])
def test_host_uv_prefers_the_pinned_wheel_binary(tmp_path, monkeypatch, script, chosen):
    builder = load_builder()
    wheel = tmp_path / "uv-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("uv-0.data/scripts/uv", script)
    monkeypatch.setattr(builder.shutil, "which", lambda name: "/somewhere/bin/uv")
    found = builder.host_uv(wheel, tmp_path / "work")
    assert found == (tmp_path / "work" / "host-uv" / wheel.stem / "uv" if chosen == "pinned"
                     else Path("/somewhere/bin/uv"))
