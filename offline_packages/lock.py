"""The lock: requirements.txt plus a profile's pins, resolved with hashes for the target by
`uv pip compile`. profiles/PROFILE.lock is used when its first line records today's inputs, else
the build resolves afresh; `build.py --lock-only` rewrites the committed file."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from .common import HERE, REPO, BuildError, Target, run, source_args, uv_env

PROFILES = HERE / "profiles"
PROFILE_NAMES = ("torch", "trtllm", "ray")


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
    """A distribution name as pip compares them: runs of -_. become -, lower case."""
    return re.sub(r"[-_.]+", "-", name).lower()


def demo_constraints() -> list[str]:
    """The demo installs the torch build this machine has (a CPU wheel on dev/CI machines)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return [f"torch=={version('torch')}"]
    except PackageNotFoundError:
        return []
