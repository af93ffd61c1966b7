"""autodl_deploy.sh is shellcheck-clean and explains itself; the bundle builder's parts on fake
inputs (target tags, the manifest contract on both sides, model choice, the committed locks), and
the installer's manifest checks on fake bundles. Nothing here downloads, builds wheels or installs."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "autodl_deploy.sh"
PROFILES = REPO / "offline_packages" / "profiles"
PACKAGES, MODELS = "offline_packages.zip", "pretrained_models.zip"

sys.path.insert(0, str(REPO))
from offline_packages import build, common, lock, manifest, models, wheels  # noqa: E402

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
                 "--dry-run", "--demo", "--online", "--model", "COSYVOICE_DATA_DIR",
                 "COSYVOICE_PORT", "COSYVOICE_MODEL"):
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
    target = common.Target("torch", "3.10", "x86_64-manylinux_2_31")
    tags = target.pip_platform_tags()
    assert tags[0] == "manylinux_2_31_x86_64"
    assert "manylinux_2_28_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert not any(re.search(r"manylinux_2_(3[2-9]|[4-9]\d)", tag) for tag in tags)
    assert target.abi == "cp310"


# --- the manifest contract -------------------------------------------------------------------------


def manifest_values(kind: str, **changes) -> dict:
    """A complete, valid manifest header of `kind` for a demo bundle of this machine."""
    values = {**manifest.common_values(kind, common.Target("torch", "3.10", "host", demo=True)),
              "files_count": 0, "unpacked_size": 0}
    if kind == "packages":
        values.update(cuda="cpu", torch="2.7.1+cpu", manylinux_max="host", glibc_min="0.0",
                      project_version="0.1.0", lock="lock.txt", lock_pins=0, uv_wheel="uv/uv.whl",
                      uv_version=wheels.UV_VERSION,
                      # a bundled Python, so that preflight needs none on this machine
                      python_standalone="python/cpython-3.10.0-install_only.tar.gz",
                      python_standalone_note="test", python_size=0, install_size=0,
                      launchers="server.py", launchers_missing="fast_server.py",
                      extra_index_urls="")
    else:
        values.update(models="cosyvoice3=Fun-CosyVoice3-0.5B-2512,cosyvoice2=CosyVoice2-0.5B",
                      default_model="cosyvoice3", ttsfrd=None, voices=1, install_size=0)
    values.update(changes)
    return {name: values[name] for name in manifest.fields_of(kind)}


def test_manifest_is_json_with_one_field_and_one_file_per_line():
    entries = [{"path": "wheels/a-1.0-py3-none-any.whl", "sha256": "0" * 64, "size": 3},
               {"path": "voices/[默认]你好.wav", "sha256": "f" * 64, "size": 5}]
    text = manifest.manifest_text(manifest_values("models", files_count=2), entries)
    data = json.loads(text)
    assert data["files"] == entries and data["ttsfrd"] is None
    assert data["manifest_version"] == manifest.MANIFEST_VERSION
    # The shape the installer's sed expressions read.
    assert '\n  "kind": "models",\n' in text
    assert ('\n    {"path": "voices/[默认]你好.wav", "sha256": "' + "f" * 64 + '", "size": 5}\n'
            in text)


@pytest.mark.parametrize("change", ["missing", "extra", "type", "quote"])
def test_manifest_takes_exactly_the_documented_fields(change):
    values = manifest_values("packages")
    if change == "missing":
        del values["cuda"]
    elif change == "extra":
        values["colour"] = "blue"
    elif change == "type":
        values["lock_pins"] = "many"
    else:
        values["python_standalone_note"] = 'failed: "404"'
    with pytest.raises(ValueError):
        manifest.manifest_text(values, [])
    assert '"404"' not in manifest.plain('failed: "404"')


def test_models_field_round_trips_and_refuses_separators():
    pairs = [("cosyvoice3", "Fun-CosyVoice3-0.5B-2512"), ("cosyvoice2", "CosyVoice2-0.5B")]
    assert manifest.decode_models(manifest.encode_models(pairs)) == pairs
    for bad in ("a,b", "a=b", "a/b", ""):
        with pytest.raises(ValueError):
            manifest.encode_models([("cosyvoice2", bad)])


def test_installer_reads_the_version_and_fields_that_manifest_py_defines():
    script = SCRIPT.read_text()
    assert re.search(r"^MANIFEST_VERSION=(\d+)$", script, re.M).group(1) == str(
        manifest.MANIFEST_VERSION)
    assert re.search(r'^MANIFEST_FORMAT="(.*)"$', script, re.M).group(1) == manifest.FORMAT
    read = {"packages": set(re.findall(r"\$\(pkg ([a-z_]+)\)", script)),
            "models": set(re.findall(r"\$\(models ([a-z_]+)\)", script))}
    assert "cuda" in read["packages"] and "default_model" in read["models"]
    for kind, names in read.items():
        assert names <= set(manifest.fields_of(kind)), names - set(manifest.fields_of(kind))
    generic = set(re.findall(r'manifest_get "\$[a-z]+" ([a-z_]+)', script))
    assert generic and generic <= set(manifest.COMMON_FIELDS)


def source_script(snippet: str, *args: str) -> str:
    """Runs `snippet` in bash after sourcing the installer (which then defines, runs nothing)."""
    result = subprocess.run(["bash", "-c", f'source "{SCRIPT}"; {snippet}', "-", *args],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_installer_sed_reads_what_manifest_py_writes(tmp_path):
    values = manifest_values("models", python_version="3.10", files_count=2)
    entries = [{"path": "CosyVoice2-0.5B/llm.pt", "sha256": "a" * 64, "size": 7},
               {"path": "voices/[bob]Hello, world.wav", "sha256": "b" * 64, "size": 9}]
    path = tmp_path / "manifest.json"
    path.write_text(manifest.manifest_text(values, entries), encoding="utf-8")
    fields = source_script('for f in "${@:2}"; do printf "%s=%s\\n" "$f" "$(manifest_get "$1" "$f")";'
                           ' done', str(path), *values)
    expected = {name: ("" if value is None else str(value).lower() if isinstance(value, bool)
                       else str(value)) for name, value in values.items()}
    assert dict(line.split("=", 1) for line in fields.splitlines()) == expected
    sums = source_script('manifest_sums "$1"', str(path))
    assert sums.splitlines() == [f"{e['sha256']}  {e['path']}" for e in entries]
    chosen = source_script('MODELS_MANIFEST=$1; model_list; echo; wanted_model; echo;'
                           ' model_entry cosyvoice2; echo; model_entry Fun-CosyVoice3-0.5B-2512;'
                           ' echo; if model_entry cosyvoice1; then echo found; fi', str(path))
    assert chosen.splitlines() == ["cosyvoice3 (default), cosyvoice2", "cosyvoice3",
                                   "cosyvoice2=CosyVoice2-0.5B",
                                   "cosyvoice3=Fun-CosyVoice3-0.5B-2512"]


# --- the installer on fake bundles (manifests only: preflight and --dry-run) -----------------------


def fake_bundle(folder: Path, texts: dict[str, str] | None = None, **models_fields) -> Path:
    """The two zips holding just their manifest.json (enough for preflight and --dry-run)."""
    folder.mkdir(exist_ok=True)
    texts = texts or {kind: manifest.manifest_text(manifest_values(kind, **(
        models_fields if kind == "models" else {})), []) for kind in ("packages", "models")}
    for kind, name in (("packages", PACKAGES), ("models", MODELS)):
        with zipfile.ZipFile(folder / name, "w") as archive:
            archive.writestr("manifest.json", texts[kind])
    return folder


def installer(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("COSYVOICE_")}
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env={**environ, **(env or {})})


def one_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().splitlines()[-1] == errors[0], result.stderr
    return errors[0]


def test_installer_serves_the_default_model_or_the_one_named(tmp_path):
    data = fake_bundle(tmp_path)
    flags = ["--data-dir", data, "--demo", "--no-start", "--disk-headroom-mb", "0"]
    doctor = installer("doctor", *flags)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "ok    model cosyvoice3 (Fun-CosyVoice3-0.5B-2512)" in doctor.stdout
    assert "models: cosyvoice3 (default), cosyvoice2" in doctor.stdout
    for chosen, env in ((["--model", "cosyvoice2"], None), (["--model", "CosyVoice2-0.5B"], None),
                        ([], {"COSYVOICE_MODEL": "cosyvoice2"})):
        doctor = installer("doctor", *flags, *chosen, env=env)
        assert "ok    model cosyvoice2 (CosyVoice2-0.5B)" in doctor.stdout, doctor.stdout
    dry = installer("deploy", "--dry-run", *flags, "--model", "cosyvoice2")
    assert dry.returncode == 0 and "dry run: nothing was changed" in dry.stdout, dry.stderr
    for chosen, env in ((["--model", "cosyvoice1"], None), ([], {"COSYVOICE_MODEL": "cosyvoice1"})):
        line = one_error(installer("deploy", "--dry-run", *flags, *chosen, env=env))
        assert ("--model cosyvoice1 is not in this bundle, which holds cosyvoice3 (default), "
                "cosyvoice2" in line), line


@pytest.mark.parametrize("version", [1, manifest.MANIFEST_VERSION + 1])
def test_installer_refuses_another_manifest_version(tmp_path, version):
    texts = {kind: manifest.manifest_text(manifest_values(kind), [])
             for kind in ("packages", "models")}
    if version == 1:   # version 1 wrote its number into `format` and had no manifest_version
        texts["models"] = texts["models"].replace(f'"{manifest.FORMAT}"',
                                                  f'"{manifest.FORMAT} 1"')
        texts["models"] = re.sub(r'\n  "manifest_version": \d+,', "", texts["models"])
    else:
        texts["models"] = texts["models"].replace(
            f'"manifest_version": {manifest.MANIFEST_VERSION},', f'"manifest_version": {version},')
    data = fake_bundle(tmp_path, texts)
    line = one_error(installer("deploy", "--dry-run", "--demo", "--data-dir", data))
    assert (f"pretrained_models.zip has manifest version {version} but this autodl_deploy.sh "
            f"reads version {manifest.MANIFEST_VERSION}: rebuild the bundle") in line, line
    texts["models"] = texts["packages"]   # the zips swapped: the kind is wrong
    line = one_error(installer("deploy", "--dry-run", "--demo", "--data-dir",
                               fake_bundle(tmp_path, texts)))
    assert "pretrained_models.zip is not a models bundle" in line, line


# --- the builder's steps, on fake inputs ---------------------------------------------------------


def test_model_choice_keeps_order_and_defaults_to_cosyvoice3():
    assert [m.name for m in models.choose(None)] == ["cosyvoice3"]
    assert [m.name for m in models.choose(["cosyvoice2", "all", "cosyvoice2"])] == [
        "cosyvoice2", "cosyvoice3"]
    assert [m.folder for m in models.choose(["all"])] == ["Fun-CosyVoice3-0.5B-2512",
                                                          "CosyVoice2-0.5B"]
    assert models.MODELS["cosyvoice3"].modelscope_id == "FunAudioLLM/Fun-CosyVoice3-0.5B-2512"
    with pytest.raises(build.BuildError, match="--model cosyvoice1 is unknown"):
        models.choose(["cosyvoice1"])


def test_committed_torch_lock_is_pinned_with_hashes_for_the_target():
    text = (PROFILES / "torch.lock").read_text()
    header = text.splitlines()[0]
    assert "profile=torch python=3.10 platform=x86_64-manylinux_2_31" in header
    pins = dict(lock.lock_pins(text))
    assert pins["torch"] == "2.7.1"
    assert any(name.startswith("nvidia-cuda-runtime-cu12") for name in pins)   # a CUDA 12 build
    blocks = re.split(r"\n(?=[a-z0-9])", text.split("\n", 2)[2])
    for block in blocks:
        if "==" in block:
            assert "--hash=sha256:" in block, block.splitlines()[0]


def test_trtllm_profile_needs_nvidia_index():
    args = build.parse_args(["--profile", "trtllm", "--out", "x"])
    with pytest.raises(common.BuildError, match="extra-index-url https://pypi.nvidia.com"):
        build.make_target(args)
    assert "tensorrt-llm==1.0.0" in lock.read_profile("trtllm")


def test_lock_only_refuses_demo(capsys):
    with pytest.raises(SystemExit):
        build.parse_args(["--lock-only", "--demo"])
    assert "drop --demo" in capsys.readouterr().err


def fake_model_folders(source: Path, folders) -> None:
    for folder in folders:
        (source / folder).mkdir(parents=True)
        (source / folder / "weights.pt").write_bytes(folder.encode())


def test_models_zip_from_a_folder_records_the_models_and_the_default(tmp_path):
    """--models-from with two models and voices: weights hard-linked into staging, and the
    manifest names both models, the first given as the default."""
    source, voices = tmp_path / "models", tmp_path / "voices"
    fake_model_folders(source, ["CosyVoice2-0.5B", "Fun-CosyVoice3-0.5B-2512", "CosyVoice-ttsfrd"])
    voices.mkdir()
    (voices / "[bob]hello.wav").write_bytes(b"RIFF")
    args = build.parse_args(["--out", "x", "--models-from", str(source), "--voices", str(voices),
                             "--model", "cosyvoice2", "--model", "all"])
    target = build.make_target(args)
    build.build_models(args, target, tmp_path / "work", tmp_path / MODELS)
    staging = tmp_path / "work" / "models"
    assert (staging / "voices" / "[bob]hello.wav").read_bytes() == b"RIFF"
    copied = staging / "CosyVoice2-0.5B" / "weights.pt"
    assert copied.stat().st_ino == (source / "CosyVoice2-0.5B" / "weights.pt").stat().st_ino
    with zipfile.ZipFile(tmp_path / MODELS) as archive:
        data = json.loads(archive.read("manifest.json"))
        assert "Fun-CosyVoice3-0.5B-2512/weights.pt" in archive.namelist()
    assert data["models"] == "cosyvoice2=CosyVoice2-0.5B,cosyvoice3=Fun-CosyVoice3-0.5B-2512"
    assert data["default_model"] == "cosyvoice2" and data["ttsfrd"] == "CosyVoice-ttsfrd"
    assert data["voices"] == 1 and data["files_count"] == 4
    missing = build.parse_args(["--out", "x", "--models-from", str(source / "CosyVoice2-0.5B")])
    with pytest.raises(common.BuildError, match="has no Fun-CosyVoice3-0.5B-2512/ folder"):
        build.build_models(missing, target, tmp_path / "work2", tmp_path / "other.zip")


def test_models_come_from_modelscope_without_its_bookkeeping(tmp_path, monkeypatch):
    calls = []

    def snapshot_download(model_id, local_dir):
        calls.append(model_id)
        Path(local_dir, ".msc").mkdir(parents=True, exist_ok=True)
        Path(local_dir, "llm.pt").write_bytes(model_id.encode())
        return local_dir
    monkeypatch.setitem(sys.modules, "modelscope",
                        types.SimpleNamespace(snapshot_download=snapshot_download))
    staging = tmp_path / "staging"
    staging.mkdir()
    models.download_models(models.choose(["all"]), staging, tmp_path / "cache")
    assert calls == ["FunAudioLLM/Fun-CosyVoice3-0.5B-2512", "iic/CosyVoice2-0.5B",
                     "iic/CosyVoice-ttsfrd"]
    assert (staging / "Fun-CosyVoice3-0.5B-2512" / "llm.pt").read_bytes() == calls[0].encode()
    assert (tmp_path / "cache" / "CosyVoice2-0.5B" / "llm.pt").is_file()   # kept to resume
    assert not list(staging.rglob(".msc"))


def test_link_or_copy_copies_when_it_cannot_link(tmp_path, monkeypatch):
    (tmp_path / "a").write_bytes(b"data")

    def cross_device(*_args, **_kwargs):
        raise OSError(18, "Invalid cross-device link")
    monkeypatch.setattr(common.os, "link", cross_device)
    common.link_or_copy(str(tmp_path / "a"), str(tmp_path / "b"))
    assert (tmp_path / "b").read_bytes() == b"data"
    assert (tmp_path / "b").stat().st_ino != (tmp_path / "a").stat().st_ino


@pytest.mark.parametrize("script, chosen", [("#!/bin/sh\nexit 0\n", "pinned"),
                                            ("#!/bin/sh\nexit 1\n", "path")],
                         ids=["pinned uv runs", "pinned uv fails"])
def test_host_uv_prefers_the_pinned_wheel_binary(tmp_path, monkeypatch, script, chosen):
    wheel = tmp_path / "uv-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("uv-0.data/scripts/uv", script)
    monkeypatch.setattr(wheels.shutil, "which", lambda name: "/somewhere/bin/uv")
    found = wheels.host_uv(wheel, tmp_path / "work")
    assert found == (tmp_path / "work" / "host-uv" / wheel.stem / "uv" if chosen == "pinned"
                     else Path("/somewhere/bin/uv"))
