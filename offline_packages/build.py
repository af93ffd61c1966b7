#!/usr/bin/env python3
"""Builds offline_packages.zip and pretrained_models.zip, which autodl_deploy.sh installs from, on a
machine with internet; `--help` lists the flags and offline_packages/README.md explains them.

    python offline_packages/build.py --out dist                      # CosyVoice3, torch profile
    python offline_packages/build.py --model cosyvoice3 --model cosyvoice2 --out dist   # both
    python offline_packages/build.py --profile trtllm --extra-index-url https://pypi.nvidia.com --out dist
    python offline_packages/build.py --demo --out dist               # tiny random model, this machine
    python offline_packages/build.py --lock-only --profile torch     # re-resolve profiles/torch.lock
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script: run the package's copy of this module instead (its folder, the first on
    # sys.path, would otherwise offer lock, models, ... as top-level modules to every import).
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    from offline_packages.build import main
    sys.exit(main())

from . import lock as locks  # noqa: E402
from . import manifest, models, python_standalone, wheels  # noqa: E402
from .common import REPO, BuildError, Target, say, sha256_of  # noqa: E402

PROJECT_NAME = "cosyvoice-deploy"
LAUNCHERS = ("server.py", "fast_server.py")
DEPLOY_SCRIPT = "autodl_deploy.sh"


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
            wheels.fetch_demo_wheelhouse(wheelhouse)
        offline = True

    say(f"uv {wheels.UV_VERSION} wheel")
    uv_wheel = wheels.download_uv_wheel(target, uv_dir, wheelhouse, offline)
    uv = wheels.host_uv(uv_wheel, work)

    say("the cosyvoice-deploy wheel")
    project = wheels.build_project_wheel(wheels_dir)
    project_version = project.name.split("-")[1]

    say(f"lock for profile {target.profile}, Python {target.python_version}, {target.platform}")
    if args.demo:
        lock = locks.compile_lock(target, uv, work, wheelhouse, offline, locks.demo_constraints())
    else:
        lock = locks.committed_lock(target)
        if lock is None:
            say(f"profiles/{target.profile}.lock does not match today's inputs or target: "
                "resolving afresh (commit it with --lock-only)")
            lock = locks.compile_lock(target, uv, work, wheelhouse, offline, [])
    third_party = work / "third-party.lock"
    third_party.write_text(lock)

    say("wheels")
    wheels.download_wheels(target, third_party, wheels_dir, wheelhouse, offline)
    wheels.check_wheels_cover_lock(lock, wheels_dir)
    lock += (f"# this project, built from the checkout\n{PROJECT_NAME}=={project_version} \\\n"
             f"    --hash=sha256:{sha256_of(project)}\n")
    (staging / "lock.txt").write_text(lock)

    say("python-build-standalone")
    skip_why = ("a demo bundle" if args.demo else "--offline" if args.offline
                else "--no-python-standalone" if args.no_python_standalone else None)
    archive, note = python_standalone.fetch_standalone(
        target, uv, staging / "python", given=args.python_standalone,
        url=args.python_standalone_url, skip_why=skip_why)

    say("launchers and the deploy script")
    (staging / "app").mkdir()
    missing = [name for name in LAUNCHERS if not (REPO / name).is_file()]
    for name in LAUNCHERS:
        if name not in missing:
            shutil.copy2(REPO / name, staging / "app" / name)
    if (REPO / DEPLOY_SCRIPT).is_file():
        shutil.copy2(REPO / DEPLOY_SCRIPT, staging / DEPLOY_SCRIPT)

    all_wheels = sorted(wheels_dir.glob("*.whl"))
    torch_version, cuda = wheels.torch_build(wheels_dir)
    glibc = max((wheels.wheel_glibc_floor(wheel) for wheel in all_wheels), default=(0, 0))
    manifest.write_zip(staging, out_zip, {
        **manifest.common_values("packages", target),
        "cuda": cuda, "torch": torch_version,
        "manylinux_max": "host" if target.demo else "%d_%d" % target.manylinux_max,
        "glibc_min": "%d.%d" % glibc, "project_version": project_version,
        "lock": "lock.txt", "lock_pins": len(locks.lock_pins(lock)),
        "uv_wheel": uv_wheel.relative_to(staging).as_posix(), "uv_version": wheels.UV_VERSION,
        "python_standalone": archive.relative_to(staging).as_posix() if archive else None,
        "python_standalone_note": manifest.plain(note),
        "python_size": python_standalone.tar_size(archive) if archive else 0,
        "install_size": sum(wheels.wheel_installed_size(wheel) for wheel in all_wheels),
        "launchers": ",".join(name for name in LAUNCHERS if name not in missing),
        "launchers_missing": ",".join(missing),
        "extra_index_urls": " ".join(target.extra_index_urls),
    })
    if missing:
        print(f"note: {', '.join(missing)} not in this checkout, so not in the bundle",
              file=sys.stderr)


# --- pretrained_models.zip ---------------------------------------------------------------------


def build_models(args: argparse.Namespace, target: Target, work: Path, out_zip: Path) -> None:
    chosen = models.choose(args.model)
    staging = work / "models"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if args.demo:
        models.make_demo_models(chosen, staging)
        folders, ttsfrd = [model.demo_folder for model in chosen], None
    else:
        if args.models_from:
            models.copy_models(chosen, Path(args.models_from), staging)
        else:
            cache = Path(args.download_dir) if args.download_dir else work / "modelscope"
            models.download_models(chosen, staging, cache)
        folders, ttsfrd = [model.folder for model in chosen], models.TTSFRD_FOLDER
    if args.voices:
        models.copy_voices(Path(args.voices), staging)
    manifest.write_zip(staging, out_zip, {
        **manifest.common_values("models", target),
        "models": manifest.encode_models([(m.name, f) for m, f in zip(chosen, folders)]),
        "default_model": chosen[0].name,
        "ttsfrd": ttsfrd,
        "voices": models.count_voices(staging),
        "install_size": models.zip_members_size(staging),
    })


# --- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python offline_packages/build.py",
        description="Builds offline_packages.zip and pretrained_models.zip for autodl_deploy.sh.")
    parser.add_argument("--out", help="output folder for the two zips")
    parser.add_argument("--profile", choices=locks.PROFILE_NAMES, default="torch",
                        help="torch: server.py; trtllm: adds TensorRT-LLM and MPI; ray: adds Ray Serve "
                             "(python -m cosyvoice.serve_ray) (default torch)")
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
    parser.add_argument("--model", action="append", choices=[*models.MODELS, models.ALL],
                        help="a model to bundle (repeatable; all: every one); the first named is "
                             "the one served unless the installer is told otherwise (default "
                             f"{next(iter(models.MODELS))}); with --demo, a tiny random model of "
                             "that generation")
    parser.add_argument("--models-from", help="a folder already holding each model's folder "
                        "(Fun-CosyVoice3-0.5B-2512/, CosyVoice2-0.5B/) and CosyVoice-ttsfrd/ "
                        "(skips modelscope)")
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
        uv_wheel = wheels.download_uv_wheel(target, work / "uv", None, False)
        lock = locks.compile_lock(target, wheels.host_uv(uv_wheel, work), work, None, False, [])
    path = locks.PROFILES / f"{target.profile}.lock"
    path.write_text(lock)
    say(f"wrote {path} ({len(locks.lock_pins(lock))} pins)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        target = make_target(args)
        if args.lock_only:
            lock_only(target)
            return 0
        if args.fetch_only:
            wheels.fetch_demo_wheelhouse(Path(args.wheelhouse).resolve())
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
