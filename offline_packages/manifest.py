"""manifest.json, the contract between the builder and autodl_deploy.sh: its version, every field
of each kind of zip, and the line layout that lets the installer read it with sed before any Python
exists on the box. The installer checks MANIFEST_VERSION (its own copy must be equal) and reads
only the fields named here; change either side only together with the other, and bump the version."""
from __future__ import annotations

import datetime as dt
import json
import re
import zipfile
from pathlib import Path

from .common import BuildError, Target, say, sha256_of

FORMAT = "cosyvoice-deploy manifest"
MANIFEST_VERSION = 2          # 1: one model per bundle (`model`); 2: `models` and `default_model`
BUILDER_VERSION = "2.0.0"

# name: (JSON types allowed, meaning). The order here is the order in the file.
COMMON_FIELDS = {
    "format": (str, f'always "{FORMAT}": the file is ours'),
    "manifest_version": (int, "MANIFEST_VERSION; the installer refuses any other"),
    "kind": (str, "packages (offline_packages.zip) or models (pretrained_models.zip)"),
    "builder_version": (str, "build.py's version, for people"),
    "created": (str, "when it was built, ISO 8601 UTC"),
    "demo": (bool, "built with --demo: this machine's wheels, tiny random models"),
    "profile": (str, "torch, trtllm or ray (torch with Ray Serve)"),
    "python_version": (str, "the target CPython, major.minor"),
    "arch": (str, "the target machine, e.g. x86_64"),
    "platform": (str, "uv's target platform, e.g. x86_64-manylinux_2_31, or host for --demo"),
}
PACKAGES_FIELDS = {
    "cuda": (str, "the torch wheel's CUDA, major.minor; cpu; or none (no torch)"),
    "torch": (str, "the torch version, empty without torch"),
    "manylinux_max": (str, "newest manylinux accepted, e.g. 2_31, or host"),
    "glibc_min": (str, "the oldest glibc every wheel accepts, e.g. 2.28 (0.0: no manylinux wheel)"),
    "project_version": (str, "the cosyvoice-deploy wheel's version"),
    "lock": (str, "path of the lock (name==version --hash=... lines) that the installer feeds "
                  "to uv pip install --require-hashes"),
    "lock_pins": (int, "pins in the lock"),
    "uv_wheel": (str, "path of uv's wheel; the binary is uv-VERSION.data/scripts/uv in it"),
    "uv_version": (str, "uv's version"),
    "python_standalone": ((str, type(None)), "path of the python-build-standalone install_only "
                                             "archive, null when none is bundled"),
    "python_standalone_note": (str, "where it came from, or why there is none"),
    "python_size": (int, "bytes the Python archive unpacks to (0 without one)"),
    "install_size": (int, "bytes the wheels unpack to (the installer reserves twice this)"),
    "launchers": (str, "comma-separated launchers present in app/"),
    "launchers_missing": (str, "comma-separated launchers the checkout lacked"),
    "extra_index_urls": (str, "space-separated extra indexes the lock was resolved against"),
}
MODELS_FIELDS = {
    "models": (str, "comma-separated NAME=FOLDER pairs, the default first; NAME is what "
                    "--model takes, FOLDER the model directory at the top of the zip"),
    "default_model": (str, "the NAME served unless --model says otherwise"),
    "ttsfrd": ((str, type(None)), "the ttsfrd folder (wheels and resource.zip), null without"),
    "voices": (int, "number of voices/[name]transcript.wav prompts"),
    "install_size": (int, "bytes that unzipping the zips inside the models adds (ttsfrd's "
                          "resource.zip)"),
}
TOTAL_FIELDS = {   # computed by write_zip from the files
    "files_count": (int, "number of files listed"),
    "unpacked_size": (int, "their total size in bytes"),
}
KIND_FIELDS = {"packages": PACKAGES_FIELDS, "models": MODELS_FIELDS}

# Already compressed (or incompressible): stored as they are, which also makes unzip fast.
STORED_SUFFIXES = {".whl", ".zip", ".gz", ".tgz", ".xz", ".zst", ".pt", ".pth", ".bin", ".onnx",
                   ".safetensors", ".wav", ".mp3", ".tar"}
# Never in a path or a string value: the installer's sed reads values without JSON unescaping.
UNSAFE = re.compile(r'["\\\x00-\x1f]')


def fields_of(kind: str) -> dict:
    """Every field of a manifest of `kind`, in file order."""
    return {**COMMON_FIELDS, **KIND_FIELDS[kind], **TOTAL_FIELDS}


def plain(text: str) -> str:
    """`text` made safe as a string value (free text such as an error message)."""
    return UNSAFE.sub("'", text)


def common_values(kind: str, target: Target) -> dict:
    return {"format": FORMAT, "manifest_version": MANIFEST_VERSION, "kind": kind,
            "builder_version": BUILDER_VERSION,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "demo": target.demo, "profile": target.profile,
            "python_version": target.python_version, "arch": target.arch,
            "platform": target.platform}


def encode_models(pairs: list[tuple[str, str]]) -> str:
    """The `models` field: [(NAME, FOLDER), ...] -> "NAME=FOLDER,NAME=FOLDER"."""
    for part in (part for pair in pairs for part in pair):
        if not part or re.search(r"[,=/\s]", part) or UNSAFE.search(part):
            raise ValueError(f"model name or folder {part!r} cannot be written in the manifest")
    return ",".join(f"{name}={folder}" for name, folder in pairs)


def decode_models(value: str) -> list[tuple[str, str]]:
    return [tuple(pair.split("=", 1)) for pair in value.split(",") if pair]


def file_entries(root: Path) -> list[dict]:
    """{path, sha256, size} of every file under root, sorted by path."""
    entries = []
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise BuildError(f"{path} is a symbolic link; bundles hold plain files only")
        if not path.is_file():
            continue
        relative = path.relative_to(root).as_posix()
        if UNSAFE.search(relative):
            raise BuildError(f"{relative!r} has a quote, backslash or control character in its "
                             "name; rename it")
        entries.append({"path": relative, "sha256": sha256_of(path), "size": path.stat().st_size})
    return entries


def check(values: dict) -> None:
    """Raises ValueError unless `values` has exactly the fields of its kind, each of its type (in
    any order: the file is written in the order above)."""
    kind = values.get("kind")
    if kind not in KIND_FIELDS:
        raise ValueError(f"manifest kind {kind!r} is not one of {', '.join(KIND_FIELDS)}")
    expected = fields_of(kind)
    if set(values) != set(expected):
        missing = [name for name in expected if name not in values]
        extra = [name for name in values if name not in expected]
        raise ValueError(f"{kind} manifest fields differ from manifest.py (missing {missing}, "
                         f"not documented {extra})")
    for name, value in values.items():
        types = expected[name][0]
        if not isinstance(value, types) or (isinstance(value, bool) and types is int):
            raise ValueError(f"manifest field {name} = {value!r} is not of type {types}")
        if isinstance(value, str) and UNSAFE.search(value):
            raise ValueError(f"manifest field {name} = {value!r} holds a quote, backslash or "
                             "control character")


def manifest_text(values: dict, entries: list[dict]) -> str:
    """The file: `{`, one `  "name": value,` line per field, `  "files": [`, one
    `    {"path": "...", "sha256": "...", "size": N}` line per file (a comma after all but the
    last), `  ]`, `}`. Ordinary JSON, and each line readable on its own."""
    check(values)
    lines = ["{"]
    lines += [f"  {json.dumps(name)}: {json.dumps(values[name], ensure_ascii=False)},"
              for name in fields_of(values["kind"])]
    lines.append('  "files": [')
    rows = [f'    {{"path": {json.dumps(e["path"], ensure_ascii=False)}, '
            f'"sha256": "{e["sha256"]}", "size": {e["size"]}}}' for e in entries]
    lines.append(",\n".join(rows))
    lines += ["  ]", "}"]
    text = "\n".join(line for line in lines if line) + "\n"
    json.loads(text)  # it is JSON
    return text


def write_zip(staging: Path, out_zip: Path, values: dict) -> None:
    """staging/ plus its manifest.json into out_zip, written beside it and renamed when whole; a
    copy of the manifest goes beside the zip (NAME.manifest.json) to read without unzipping."""
    entries = file_entries(staging)
    values = {**values, "files_count": len(entries),
              "unpacked_size": sum(entry["size"] for entry in entries)}
    manifest = manifest_text(values, entries)
    (staging / "manifest.json").write_text(manifest, encoding="utf-8")
    partial = out_zip.with_name(out_zip.name + ".part")
    say(f"writing {out_zip} ({len(entries)} files, {values['unpacked_size'] / 2**20:.0f} MB)")
    with zipfile.ZipFile(partial, "w", allowZip64=True) as archive:
        archive.write(staging / "manifest.json", "manifest.json", zipfile.ZIP_DEFLATED)
        for entry in entries:
            path = staging / entry["path"]
            method = (zipfile.ZIP_STORED if path.suffix.lower() in STORED_SUFFIXES
                      else zipfile.ZIP_DEFLATED)
            archive.write(path, entry["path"], method)
    partial.replace(out_zip)
    out_zip.with_name(out_zip.stem + ".manifest.json").write_text(manifest, encoding="utf-8")
