"""The Python: a python-build-standalone install_only archive for the target version (the one uv
itself would install, or one given), so the box's own Python does not matter. Its absence is not
fatal: the manifest says why, and the installer then looks for a system Python of that version."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
from pathlib import Path

from .common import BuildError, Target, say, uv_env


def standalone_url(target: Target, uv: Path) -> str:
    """The download uv itself would use for this Python (install_only, linux, gnu libc)."""
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


def fetch_standalone(target: Target, uv: Path, dest: Path, *, given: str | None = None,
                     url: str | None = None, skip_why: str | None = None
                     ) -> tuple[Path | None, str]:
    """(archive, note): the archive `given`, else none when `skip_why` says why not, else the one
    downloaded from `url` (default: uv's choice). A failed download is a warning, not an error."""
    dest.mkdir(parents=True, exist_ok=True)
    if given:
        source = Path(given)
        if not source.is_file():
            raise BuildError(f"--python-standalone {source} does not exist")
        if not re.search(rf"cpython-{re.escape(target.python_version)}\.\d+", source.name):
            raise BuildError(f"{source.name} is not a CPython {target.python_version} build; pass "
                             f"a cpython-{target.python_version}.*-install_only*.tar.gz archive")
        shutil.copy2(source, dest / source.name)
        return dest / source.name, f"given with --python-standalone ({source.name})"
    if skip_why:
        return None, (f"not bundled ({skip_why}): the installer uses a system Python "
                      f"{target.python_version}")
    try:
        url = url or standalone_url(target, uv)
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
    """The unpacked size of a tar archive's files."""
    with tarfile.open(path) as archive:
        return sum(member.size for member in archive.getmembers() if member.isfile())
