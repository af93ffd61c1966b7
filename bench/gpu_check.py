"""One-call GPU verification: every CUDA path checked and the GPU numbers taken in one short run.

On a machine with a CUDA GPU (a lent GPU machine: PyTorch preinstalled, the wheels of
bench/gpu_carry installed; bench/README.md has the exact command):

    python3 -m bench.gpu_check --out $OUT

On a CPU, the dry mode runs the same code on tiny models, small levels and the CPU (CI runs it):

    python -m bench.gpu_check --dry --out /tmp/gpu-check

Parts, in order (each one's failure is recorded and the run goes on):
  dependencies   every module the runtime imports; a missing one stops the run (exit 2) with
                 the wheels to carry (--prepare-carry downloads them here)
  builds         full-size random models of both generations (`make-model --size full`), built in
                 background processes while the parity part runs (tiny ones in the dry mode)
  parity         on tiny models of both generations (made where it runs, seeded): each stage on the device
                 in fp32 vs the CPU, fp16 and bf16 vs fp32 (LLM distributions, flow mel, vocoder
                 audio), the static decode step recorded as CUDA graphs vs eager, batched vs solo
                 greedy tokens, batched vs solo flow, one streaming synthesis (bench.cuda_checks)
  second_device  the model on cuda:1 against cuda:0, when the machine has two GPUs
  performance    per generation on the full model, loaded as the server loads it (batched LLM
                 with a slot per client, flow batching, --dtype): streaming first-chunk latency
                 p50/p95 and aggregate speed at each concurrency (bench.streaming_load), LLM speech
                 tokens/s at each concurrency with and without CUDA graphs
                 (bench.llm_concurrency), peak GPU memory
On a GPU each part runs in a process of its own (--isolate): a crash or a poisoned CUDA context
costs that part only. --budget-s stops starting parts and stops a part that overruns it by 20 s.
Writes OUT/gpu-check.json (after every part, so a run cut short still leaves one) and
OUT/gpu-check.png, prints a pass/fail table and the performance goals. Exit status: 0 every check
passed, 1 a check failed or a part raised, 2 the run could not start (a module or the GPU missing).
Goals are reported, not enforced: missing one does not change the exit status.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):   # run as `python bench/gpu_check.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.environment import REPO_ROOT  # noqa: E402  (standard library only: safe before the check)

REPORT_NAME = "gpu-check"
GENERATIONS = ("3", "2")                      # CosyVoice3 first: the model people deploy now
GENERATION_NAMES = {"2": "cosyvoice2", "3": "cosyvoice3"}
CARRY_DIR = REPO_ROOT / "bench" / "gpu_carry"

# import name -> (distribution, what needs it). torch, numpy, transformers, tokenizers, onnx,
# onnxruntime, safetensors, yaml, regex and matplotlib are preinstalled on the lent GPU machines.
REQUIRED_MODULES = {
    "torch": ("torch", "everything"),
    "numpy": ("numpy", "everything"),
    "yaml": ("PyYAML", "model directories"),
    "transformers": ("transformers", "the Qwen2 LLM body"),
    "tokenizers": ("tokenizers", "make-model's tokenizer"),
    "onnx": ("onnx", "make-model's toy ONNX models"),
    "onnxruntime": ("onnxruntime", "speech tokenizer and speaker encoder"),
    "safetensors": ("safetensors", "the Qwen folder"),
    "regex": ("regex", "text frontend"),
    "wetext": ("wetext", "text normaliser"),
    "soundfile": ("soundfile", "audio frontend"),
    "soxr": ("soxr", "audio resampling"),
    "matplotlib": ("matplotlib", "the PNG"),
}
# The wheels the lent GPU machine lacks (Python 3.12, x86-64), with their own requirements; the
# versions are the ones this project's venv runs. About 9 MB together.
CARRY_WHEELS = (
    "wetext==0.1.8", "kaldifst==1.8.3", "contractions==0.1.73", "textsearch==0.0.24", "anyascii==0.3.3",
    "pyahocorasick==2.3.1", "soundfile==0.14.0", "cffi==2.1.1", "pycparser==3.12", "soxr==1.1.0",
    "inflect==7.6.0", "typeguard==4.6.1", "more-itertools==11.2.1", "jaraco.functools==4.6.0",
)
CARRY_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_5_x86_64")
CARRY_PYTHON = "3.12"
PARITY_PROMPT_S = 3              # seconds of the synthetic prompt in the parity part

# Our performance goals (issue 18): first chunk <= 70 ms p50 at c=1 and <= 300 ms p95 at c=8,
# at least 50x realtime in aggregate at c=16.
GOALS = (("first chunk p50 at c=1 (ms)", 1, ("first_chunk_ms", "p50"), "<=", 70.0),
         ("first chunk p95 at c=8 (ms)", 8, ("first_chunk_ms", "p95"), "<=", 300.0),
         ("aggregate x realtime at c=16", 16, ("x_realtime",), ">=", 50.0))


@dataclass(frozen=True)
class Mode:
    """What a run measures with: the GPU run's sizes, or the dry run's."""
    device: str
    perf_size: str
    dtype: str
    levels: tuple[int, ...]
    tokens: int
    llm_tokens: int
    min_requests: int
    budget_s: float
    min_perf_s: float            # a generation's performance part starts only with this much left


GPU_MODE = Mode("cuda", "full", "bfloat16", (1, 8, 16), 150, 150, 16, 400, 75)
DRY_MODE = Mode("cpu", "tiny", "bfloat16", (1, 2), 30, 12, 2, 300, 5)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for gpu-check.json and .png (required unless "
                                                 "--prepare-carry)")
    parser.add_argument("--dry", action="store_true", help="CPU, tiny models, small levels (what CI runs)")
    parser.add_argument("--workdir", type=Path, help="where models are built (default /tmp/gpu-check-models); "
                                                     "finished models there are reused")
    parser.add_argument("--parts", default="parity,second_device,performance",
                        help="comma-separated parts to run (default all)")
    parser.add_argument("--generations", default=",".join(GENERATIONS), help="3, 2 or 3,2")
    parser.add_argument("--device", help="override: cuda, cuda:N or cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="performance dtype (default bfloat16)")
    parser.add_argument("--levels", help="concurrency levels, e.g. 1,8,16")
    parser.add_argument("--tokens", type=int, help="speech tokens per streaming request (default 150: 6 s of audio)")
    parser.add_argument("--llm-tokens", type=int, help="speech tokens per request in the LLM tokens/s part")
    parser.add_argument("--min-requests", type=int, help="requests per level at least (default 16)")
    parser.add_argument("--flow-batch", type=int, help="flow batch (default: the runtime's, 8 on a GPU)")
    parser.add_argument("--budget-s", type=float, help="stop starting parts after this many seconds; a part "
                                                       "still running 20 s later is stopped (default 400; the dry run 300)")
    parser.add_argument("--prepare-carry", nargs="?", const=CARRY_DIR, type=Path, metavar="DIR",
                        help=f"download the wheels the GPU machine lacks to DIR (default {CARRY_DIR}) and exit")
    parser.add_argument("--label", help="a note kept in the report (the commit, say: the GPU machine's copy of "
                                        "the tree may have no git history)")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="run each part in its own process (default: on a GPU yes, in the dry mode no)")
    parser.add_argument("--child", help=argparse.SUPPRESS)   # one part, for --isolate
    args = parser.parse_args(argv)
    if args.out is None and args.prepare_carry is None and args.child is None:
        parser.error("--out is required")
    return args


def mode_of(args: argparse.Namespace) -> Mode:
    base = DRY_MODE if args.dry else GPU_MODE
    levels = tuple(int(x) for x in args.levels.split(",")) if args.levels else base.levels
    return Mode(device=args.device or base.device, perf_size=base.perf_size, dtype=args.dtype or base.dtype,
                levels=levels, tokens=args.tokens or base.tokens, llm_tokens=args.llm_tokens or base.llm_tokens,
                min_requests=args.min_requests or base.min_requests,
                budget_s=args.budget_s if args.budget_s is not None else base.budget_s, min_perf_s=base.min_perf_s)


# ---- dependencies and carried wheels -----------------------------------------------------------------

def check_dependencies(modules: dict | None = None) -> tuple[dict, list[str]]:
    """Imports every module (default REQUIRED_MODULES); ({module: version},
    ["module (pip: distribution; needed for why): error", ...])."""
    versions, missing = {}, []
    for module, (distribution, why) in (REQUIRED_MODULES if modules is None else modules).items():
        try:
            imported = importlib.import_module(module)
        except Exception as error:   # ImportError, or a library the wheel needs failing to load
            missing.append(f"{module} (pip: {distribution}; needed for {why}): {type(error).__name__}: {error}")
            continue
        versions[module] = getattr(imported, "__version__", "?")
    return versions, missing


def missing_message(missing: list[str]) -> str:
    return ("gpu_check cannot start, modules missing:\n  " + "\n  ".join(missing) +
            "\nOn a lent GPU machine, carry the wheels (here: python -m bench.gpu_check --prepare-carry, "
            "about 9 MB into bench/gpu_carry) and begin the command with\n  python3 -m pip install -q "
            "--no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
            "bench/gpu_carry/*.whl && export PYTHONPATH=/tmp/site\n(bench/README.md, 'GPU check').")


def carry_command(directory: Path) -> list[str]:
    """The pip download of CARRY_WHEELS for the GPU machine's Python and platform."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", CARRY_PYTHON, "--implementation", "cp", "-d", str(directory)]
    for platform in CARRY_PLATFORMS:
        command += ["--platform", platform]
    return command + list(CARRY_WHEELS)


def prepare_carry(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(carry_command(directory))
    if result.returncode != 0:
        return result.returncode
    wheels = sorted(directory.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2 ** 20:7.2f} MB  {wheel.name}")
    print(f"{total / 2 ** 20:7.2f} MB  in {len(wheels)} wheels in {directory}")
    return 0


# ---- time and model builds ---------------------------------------------------------------------------

class Budget:
    """The run's time: parts start only while enough is left."""

    def __init__(self, seconds: float, clock=time.monotonic):
        self.clock = clock
        self.started = clock()
        self.deadline = self.started + seconds

    def left(self) -> float:
        return self.deadline - self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.started


def make_model_command(generation: str, size: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "cosyvoice", "make-model", "--generation", generation, "--size", size,
            "--out", str(out)]


class ModelBuilds:
    """Random-weight model directories under `workdir`, built by `python -m cosyvoice make-model` in
    background processes (into DIR.partial, renamed when complete; a complete DIR is reused).

    `in_process`: built by calling make_model when waited for instead (the dry run: on two cores a
    process per build costs more in imports than the tiny build itself)."""

    def __init__(self, workdir: Path, in_process: bool = False, command=make_model_command):
        self.workdir = workdir
        self.in_process = in_process
        self.command = command
        self.processes: dict[Path, tuple[subprocess.Popen, float, Path]] = {}
        self.seconds: dict[str, float] = {}

    def path(self, generation: str, size: str) -> Path:
        return self.workdir / f"cv{generation}-{size}"

    def start(self, generation: str, size: str) -> Path:
        final = self.path(generation, size)
        if final.is_dir() or final in self.processes or self.in_process:
            return final
        partial = self._partial(final)
        log = open(final.with_name(final.name + ".log"), "wb")
        process = subprocess.Popen(self.command(generation, size, partial), cwd=REPO_ROOT, stdout=log,
                                   stderr=subprocess.STDOUT)
        log.close()
        self.processes[final] = (process, time.monotonic(), partial)
        return final

    def _partial(self, final: Path) -> Path:
        partial = final.with_name(final.name + ".partial")
        if partial.exists():
            _remove_tree(partial)
        self.workdir.mkdir(parents=True, exist_ok=True)
        return partial

    def wait(self, generation: str, size: str, timeout_s: float) -> Path:
        """The finished directory (started now if it was not); raises if the build failed."""
        final = self.start(generation, size)
        if final.is_dir():
            return final
        if self.in_process:
            from cosyvoice.tools.make_model import make_model

            started, partial = time.monotonic(), self._partial(final)
            make_model(partial, size=size, generation=generation)
            partial.rename(final)
            self.seconds[final.name] = round(time.monotonic() - started, 1)
            return final
        process, started, partial = self.processes[final]
        try:
            code = process.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"make-model {final.name} still running after the time left ({timeout_s:.0f} s)")
        log = final.with_name(final.name + ".log").read_text(errors="replace")
        if code != 0:
            raise RuntimeError(f"make-model {final.name} failed ({code}):\n{log[-2000:]}")
        partial.rename(final)
        del self.processes[final]
        self.seconds[final.name] = round(time.monotonic() - started, 1)
        return final

    def stop(self) -> None:
        for process, _, _ in self.processes.values():
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=30)


def _remove_tree(path: Path) -> None:
    import shutil
    shutil.rmtree(path, ignore_errors=True)


# ---- parts ---------------------------------------------------------------------------------------------

def run_parity(generation: str, model_dir: Path, device, dtype, checks, label: str) -> dict:
    """bench.cuda_checks on one tiny model; every step's failure is a row, and the next one runs."""
    import torch

    import cosyvoice
    from bench import cuda_checks
    from cosyvoice.loading.model_dir import load_stage

    report: dict = {"model": str(model_dir)}
    inputs = parity_inputs(model_dir)
    half_name = str(dtype).replace("torch.", "")

    def step(name, work):
        started = time.perf_counter()
        try:
            report[name] = work()
        except Exception as error:
            traceback.print_exc()
            checks.error(f"{label} {name}", error)
            report[name] = {"error": f"{type(error).__name__}: {error}"}
        report.setdefault("seconds", {})[name] = round(time.perf_counter() - started, 2)

    step("stage_errors", lambda: cuda_checks.stage_errors(model_dir, device, inputs, checks, label))

    def graphs():
        out = {}
        for dt in dict.fromkeys((torch.float32, dtype)):
            llm = load_stage(model_dir, "llm", device, dt)
            out[str(dt).replace("torch.", "")] = cuda_checks.decode_graphs(llm, inputs, checks, label)
        return out
    step("decode_graphs", graphs)
    step("batched_tokens", lambda: cuda_checks.batched_tokens(load_stage(model_dir, "llm", device),
                                                              inputs, checks, label))

    def flows():
        return {str(dt).replace("torch.", ""): cuda_checks.flow_batching(load_stage(model_dir, "flow", device, dt),
                                                                          inputs, checks, label)
                for dt in dict.fromkeys((torch.float32, dtype))}
    step("flow_batching", flows)
    step(f"streaming_output_{half_name}", lambda: cuda_checks.streaming_output(
        cosyvoice.load(model_dir, device=device, dtype=dtype), inputs.request, checks, label))
    return report


def parity_inputs(model_dir: Path):
    """bench.cuda_checks.StageInputs of a model, from its CPU fp32 load and a 3 s synthetic prompt."""
    import cosyvoice
    from bench import cuda_checks
    from bench.profile_stages import prompt_audio

    tts_cpu = cosyvoice.load(model_dir, device="cpu", llm_backend="torch-serial")
    samples, rate = prompt_audio(None)
    return cuda_checks.stage_inputs(tts_cpu, (samples[:PARITY_PROMPT_S * rate], rate))


def second_device_missing(device) -> str | None:
    """Why there is no second device to check, or None."""
    import torch

    if device.type != "cuda":
        return "not a GPU run"
    count = torch.cuda.device_count()
    return f"{count} GPU on this machine" if count < 2 else None


def run_second_device(model_dir: Path, device, dtype, checks, label: str) -> dict:
    missing = second_device_missing(device)
    if missing:
        checks.skipped(f"{label} second device", missing)
        return {"skipped": missing}
    import torch

    import cosyvoice
    from bench import cuda_checks

    primary = torch.device("cuda", device.index or 0)
    secondary = torch.device("cuda", 1 if primary.index != 1 else 0)
    return cuda_checks.second_device(lambda d: cosyvoice.load(model_dir, device=d, dtype=dtype),
                                     parity_inputs(model_dir).request, primary, secondary, checks, label)


def run_performance(generation: str, model_dir: Path, device, dtype, mode: Mode, flow_batch: int | None,
                    checks, label: str, budget: Budget) -> dict:
    """The full model loaded as the server loads it: streaming latency and speed per level, LLM
    tokens/s with and without CUDA graphs, peak memory."""
    import torch

    import cosyvoice
    from bench import llm_concurrency, streaming_load
    from bench.environment import model_info
    from bench.profile_stages import DEFAULT_TEXT, DEFAULT_PROMPT_TEXT, prompt_audio
    from bench.stage_timers import ForcedLength
    from cosyvoice.backends import torch_backend
    from cosyvoice.concurrency.llm_scheduler import BatchedLLM
    from cosyvoice.inference.synthesis import ModelInput

    max_level = max(mode.levels)
    report: dict = {"model": model_info(model_dir), "dtype": str(dtype).replace("torch.", ""),
                    "levels": list(mode.levels), "tokens_per_request": mode.tokens}
    streaming_load.reset_peak(device)
    started = time.perf_counter()
    tts = cosyvoice.load(model_dir, device=device, dtype=dtype,
                         llm_backend=functools.partial(torch_backend, max_batch=max_level), flow_batch=flow_batch)
    report["load_s"] = round(time.perf_counter() - started, 2)
    report["memory_after_load"] = streaming_load.memory(device)
    samples, rate = prompt_audio(None)
    voice = tts.prepare_voice(samples, DEFAULT_PROMPT_TEXT, sample_rate=rate)
    text_ids = torch.tensor([tts.tokenizer.encode(DEFAULT_TEXT)], dtype=torch.int32)
    request = ModelInput(text_ids, voice.prompt_text_ids, voice.speech_tokens, voice.speech_tokens,
                         voice.speech_feat, voice.embedding)
    report["flow_batch"] = getattr(tts.synthesizer.flow_decoder, "max_batch", 1)

    # First request: allocates the batched LLM's cache and records its CUDA graphs.
    started = time.perf_counter()
    streaming_load.measure_level(tts, request, min(mode.tokens, 30), 1, 1)
    report["first_request_s"] = round(time.perf_counter() - started, 2)
    decode = getattr(tts.synthesizer.llm, "_decode", None)
    report["graphs"] = len(getattr(decode, "_graphs", {}))
    if device.type == "cuda":
        checks.at_least(f"{label} serving LLM recorded CUDA graphs", report["graphs"], 1,
                        detail=f"batch x span buckets up to batch {max_level}")
    streaming_load.measure_level(tts, request, min(mode.tokens, 30), max_level, 1)   # every batch size once

    report["streaming"] = streaming_load.sweep(tts, request, mode.tokens, list(mode.levels), mode.min_requests,
                                               deadline=time.monotonic() + max(0.0, budget.left() - 30))
    bad = sum(level["nonfinite_chunks"] for level in report["streaming"])
    checks.equal(f"{label} streaming under concurrency: non-finite chunks", bad, 0)
    report["memory_serving"] = streaming_load.memory(device)

    if budget.left() < 30:
        report["llm_tokens_per_s"] = {"skipped": "time budget"}
        checks.skipped(f"{label} LLM tokens/s", "time budget")
        return report
    llm = streaming_load.speech_lm(tts)
    backends = {"cuda_graphs": BatchedLLM(llm, max_batch=max_level, static_decode=True),
                "eager": BatchedLLM(llm, max_batch=max_level, static_decode=False)}
    first_request = {}
    for name, backend in backends.items():
        started = time.perf_counter()
        list(backend.generate(request.text_ids, request.prompt_text_ids, request.llm_prompt_tokens,
                              sampling=ForcedLength(llm.sampling, 2, llm.speech_token_size)))
        first_request[name] = round(time.perf_counter() - started, 2)
    forced = ForcedLength(llm.sampling, mode.llm_tokens, llm.speech_token_size)
    measured = llm_concurrency.compare(backends, request, forced, list(mode.levels), device)
    measured["first_request_s"] = first_request   # the cache allocation and (graphs) the recording
    measured["graphs"] = len(getattr(backends["cuda_graphs"]._decode, "_graphs", {}))
    measured["graphs_over_eager"] = [
        round(g["tokens_per_s"] / e["tokens_per_s"], 2)
        for g, e in zip(measured["backends"]["cuda_graphs"], measured["backends"]["eager"])]
    if device.type != "cuda":
        measured["note"] = "no GPU: the 'cuda_graphs' backend ran the same static decode step without graphs"
    report["llm_tokens_per_s"] = measured
    report["memory_peak"] = streaming_load.memory(device)
    return report


def evaluate_goals(performance: dict, applicable: bool) -> list[dict]:
    """The goals per generation: met / missed / not measured (None)."""
    rows = []
    for generation, perf in performance.items():
        levels = {level["concurrency"]: level for level in perf.get("streaming", [])} if isinstance(perf, dict) else {}
        for name, concurrency, path, op, target in GOALS:
            value = levels.get(concurrency)
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            met = None
            if applicable and value is not None:
                met = value <= target if op == "<=" else value >= target
            rows.append({"generation": generation, "goal": name, "value": value, "target": f"{op} {target:g}",
                         "met": met, "note": "" if applicable else "dry run: not the GPU sizes"})
    return rows


# ---- report ------------------------------------------------------------------------------------------

def device_block(device, versions: dict) -> dict:
    import torch

    from bench.environment import cpu_model
    block = {"type": device.type, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
             "module_versions": versions}
    if device.type == "cuda":
        block.update(name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                     gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                     capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                     tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32)
    else:
        block["name"] = f"cpu ({cpu_model()})"
    return block


def environment(device: dict) -> dict:
    """bench.environment.describe_run's block; without a git binary (a bare GPU machine) the commit
    is None, as it is without a checkout."""
    from bench import environment as env

    try:
        return env.describe_run(None, device)
    except OSError:
        return {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": env.machine(),
                "device": device, "model": None, "git": {"commit": None, "dirty": None},
                "load_average_start": env.load_average()}


def format_table(report: dict) -> str:
    lines = [f"{'result':7} {'check':78} {'value':>11} {'bound':>10}"]
    for row in report["checks"]:
        value = "" if row["value"] is None else str(row["value"])
        bound = "" if row["bound"] is None else str(row["bound"])
        lines.append(f"{row['result']:7} {row['name'][:78]:78} {value:>11} {bound:>10}"
                     + (f"  {row['detail']}" if row["result"] != "pass" and row["detail"] else ""))
    if report.get("goals"):
        lines.append("")
        lines.append(f"{'goal':7} {'generation / goal':78} {'value':>11} {'target':>10}")
        for goal in report["goals"]:
            met = {True: "met", False: "MISSED", None: "n/a"}[goal["met"]]
            value = "" if goal["value"] is None else str(goal["value"])
            lines.append(f"{met:7} {goal['generation'] + ' ' + goal['goal']:78} {value:>11} {goal['target']:>10}")
    for generation, perf in report.get("performance", {}).items():
        for level in perf.get("streaming", []) if isinstance(perf, dict) else []:
            lines.append(f"{generation} c={level['concurrency']}: first chunk p50 {level['first_chunk_ms']['p50']} "
                         f"/ p95 {level['first_chunk_ms']['p95']} ms, {level['x_realtime']}x realtime, "
                         f"{level['requests']} requests")
        llm = perf.get("llm_tokens_per_s", {}) if isinstance(perf, dict) else {}
        for name, rows in llm.get("backends", {}).items():
            rates = ", ".join(f"{row['tokens_per_s']} at c={row['concurrency']}" for row in rows)
            lines.append(f"{generation} LLM tokens/s {name}: {rates}")
        if isinstance(perf, dict) and "memory_peak" in perf:
            lines.append(f"{generation} memory: {perf['memory_peak']}")
    failed = sum(row["result"] == "FAIL" for row in report["checks"])
    lines.append(f"{len(report['checks'])} checks: {failed} failed, "
                 f"{sum(row['result'] == 'skipped' for row in report['checks'])} skipped; "
                 f"{report['elapsed_s']} s")
    return "\n".join(lines)


def write(report: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{REPORT_NAME}.json"
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return path


# ---- parts, in this process or a child one -------------------------------------------------------

def run_part(spec: dict, checks, budget: Budget) -> dict:
    """One part: spec {kind: parity | second_device | performance, generation, model_dir, device,
    mode (Mode's fields), flow_batch}."""
    import torch

    mode = Mode(**{**spec["mode"], "levels": tuple(spec["mode"]["levels"])})
    device, dtype = torch.device(spec["device"]), getattr(torch, mode.dtype)
    model_dir, generation, kind = Path(spec["model_dir"]), spec["generation"], spec["kind"]
    if kind == "parity":
        return run_parity(generation, model_dir, device, dtype, checks, f"cv{generation} tiny")
    if kind == "second_device":
        return run_second_device(model_dir, device, dtype, checks, f"cv{generation} tiny")
    if kind == "performance":
        return run_performance(generation, model_dir, device, dtype, mode, spec["flow_batch"], checks,
                               f"cv{generation} {mode.perf_size}", budget)
    raise ValueError(f"unknown part {kind!r}")


def run_isolated(spec: dict, checks, budget: Budget, name: str) -> dict:
    """run_part in a child process (`--child`): a crash, a hung kernel or a CUDA error that poisons
    the context costs that part only, and each part's GPU memory counters start from nothing.
    The child prints to this process's output and hands back its result and rows in a file."""
    import tempfile

    from bench.cuda_checks import Row

    with tempfile.TemporaryDirectory(prefix="gpu-check-part-") as scratch:
        out = Path(scratch) / "part.json"
        child = {**spec, "seconds": budget.left(), "out": str(out)}
        command = [sys.executable, "-m", "bench.gpu_check", "--child", json.dumps(child)]
        try:
            code = subprocess.run(command, cwd=REPO_ROOT, timeout=max(30.0, budget.left() + 20)).returncode
        except subprocess.TimeoutExpired:
            checks.error(name, TimeoutError("the part's process ran past the time budget and was killed"))
            return {"error": "timed out"}
        if not out.is_file():
            checks.error(name, RuntimeError(f"the part's process exited with status {code} and no result "
                                            "(crashed: see the output above)"))
            return {"error": f"process exited {code}"}
        handed = json.loads(out.read_text(encoding="utf-8"))
    checks.rows.extend(Row(**row) for row in handed["rows"])
    return handed["result"]


def child_main(spec_json: str) -> int:
    """The child of run_isolated: runs its part, writes {result, rows} to spec["out"]."""
    import dataclasses

    from bench.cuda_checks import Checks

    spec = json.loads(spec_json)
    checks = Checks()
    try:
        result = run_part(spec, checks, Budget(spec["seconds"]))
    except Exception as error:
        traceback.print_exc()
        checks.error(f"{spec['kind']} cv{spec['generation']}", error)
        result = {"error": f"{type(error).__name__}: {error}"}
    Path(spec["out"]).write_text(json.dumps({"result": result, "rows": [dataclasses.asdict(r) for r in checks.rows]},
                                            default=str), encoding="utf-8")
    return 0


# ---- main ----------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    mode = mode_of(args)
    budget = Budget(mode.budget_s)
    versions, missing = check_dependencies()
    if missing:
        print(missing_message(missing), file=sys.stderr)
        return 2
    import torch

    device = torch.device(mode.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible to PyTorch here; on a CPU run the dry mode (--dry)",
              file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if args.dry:
        # Tiny models gain nothing from a second thread, and on a shared box a thread waiting at
        # every small op's barrier for a time slice makes the run many times slower.
        torch.set_num_threads(1)
    parts = set(args.parts.split(","))
    generations = [g.strip() for g in args.generations.split(",") if g.strip()]
    builds = ModelBuilds(args.workdir or Path("/tmp/gpu-check-models"), in_process=args.dry)
    for generation in generations:   # at once, in the background: the full-size ones during the parity part
        builds.start(generation, "tiny")
        if "performance" in parts:
            builds.start(generation, mode.perf_size)
    try:
        return _run(args, mode, budget, parts, generations, builds, device, versions)
    finally:
        builds.stop()   # a build still running when a part failed or the time ran out


def plan(parts: set[str], generations: list[str], perf_size: str) -> list[tuple[str, str, str]]:
    """(kind, generation, model size) of every part to run, in order."""
    steps = [("parity", g, "tiny") for g in generations if "parity" in parts]
    if "second_device" in parts and generations:
        steps.append(("second_device", generations[0], "tiny"))
    steps += [("performance", g, perf_size) for g in generations if "performance" in parts]
    return steps


def _run(args: argparse.Namespace, mode: Mode, budget: Budget, parts: set[str], generations: list[str],
         builds: ModelBuilds, device, versions: dict) -> int:
    import dataclasses

    from bench.cuda_checks import Checks
    from bench.environment import load_average

    isolate = args.isolate if args.isolate is not None else not args.dry
    checks = Checks()
    report: dict = {"kind": "gpu_check", "dry_run": bool(args.dry),
                    "environment": environment(device_block(device, versions)),
                    "settings": {"device": str(device), "dtype": mode.dtype, "levels": list(mode.levels),
                                 "tokens_per_request": mode.tokens, "llm_tokens_per_request": mode.llm_tokens,
                                 "min_requests_per_level": mode.min_requests, "perf_size": mode.perf_size,
                                 "flow_batch": args.flow_batch, "budget_s": mode.budget_s,
                                 "parts": sorted(parts), "generations": generations,
                                 "workdir": str(builds.workdir), "isolated_parts": isolate,
                                 "label": args.label},
                    "parity": {}, "second_device": None, "performance": {}, "timings_s": {}, "cpu_s": {}}

    def save() -> None:
        report["checks"] = [row.as_dict() for row in checks.rows]
        report["goals"] = evaluate_goals(report["performance"], applicable=not args.dry and device.type == "cuda")
        report["builds_s"] = builds.seconds
        report["elapsed_s"] = round(budget.elapsed(), 1)
        report["cpu_total_s"] = round(cpu_seconds(), 1)
        report["passed"] = not checks.failed
        write(report, args.out)

    def cpu_seconds() -> float:   # this process and its finished children (isolated parts, builds)
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def timed(name: str, work):
        started, cpu_started = time.monotonic(), cpu_seconds()
        try:
            return work()
        except Exception as error:
            traceback.print_exc()
            checks.error(name, error)
            return {"error": f"{type(error).__name__}: {error}"}
        finally:
            report["timings_s"][name] = round(time.monotonic() - started, 1)
            report["cpu_s"][name] = round(cpu_seconds() - cpu_started, 1)
            print(f"[gpu_check] {name}: {report['timings_s'][name]} s, CPU {report['cpu_s'][name]} s "
                  f"({budget.elapsed():.0f} s in)", flush=True)
            save()

    try:
        for kind, generation, size in plan(parts, generations, mode.perf_size):
            name = f"{kind} cv{generation} {size}"
            needed = mode.min_perf_s if kind == "performance" else 10
            if budget.left() < needed:
                checks.skipped(name, f"time budget: {budget.left():.0f} s left")
                result = {"skipped": "time budget"}
            else:
                model_dir = builds.path(generation, size)
                if not model_dir.is_dir():
                    model_dir = timed(f"build cv{generation} {size}",
                                      lambda g=generation, z=size: builds.wait(g, z, budget.left() - needed / 2))
                if not isinstance(model_dir, Path):
                    result = model_dir
                else:
                    spec = {"kind": kind, "generation": generation, "model_dir": str(model_dir),
                            "device": str(device), "mode": dataclasses.asdict(mode), "flow_batch": args.flow_batch}
                    # a second-device part that will only say why it skips needs no process of its own
                    alone = isolate and not (kind == "second_device" and second_device_missing(device))
                    result = timed(name, lambda s=spec, n=name, a=alone: run_isolated(s, checks, budget, n) if a
                                   else run_part(s, checks, budget))
            key = GENERATION_NAMES.get(generation, generation)
            if kind == "second_device":
                report["second_device"] = result
            else:
                report[kind][key] = result
    finally:
        report["load_average_end"] = load_average()
        save()
    try:
        from bench.gpu_plots import plot_gpu_check
        plot_gpu_check(report, args.out / f"{REPORT_NAME}.png")
    except Exception:   # the JSON is what matters; a plot failure is shown, not fatal
        traceback.print_exc()
    print(format_table(report))
    print(f"wrote {args.out / (REPORT_NAME + '.json')} and .png")
    return 0 if report["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child is not None:
        return child_main(args.child)
    if args.prepare_carry is not None:
        return prepare_carry(args.prepare_carry)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
