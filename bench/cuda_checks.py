"""Correctness of the CUDA paths, measured on one model directory (bench.gpu_check runs them).

Every function takes the device to check and returns plain numbers (errors, token counts), and
`Checks` turns them into pass/fail rows against a bound. On a CPU (gpu_check's dry mode, CI) the
same functions run with device "cpu": the comparisons are then trivially equal, but every line of
the code that produces them runs, so the GPU run cannot fail on a typo.

  stage_errors      each stage on `device` in fp32 against the CPU fp32 run of the same weights,
                    and in fp16/bf16 against `device` fp32: LLM next-token distributions (teacher
                    forced, total variation), flow mel (non-streaming and chunk-causal), vocoder audio
  decode_graphs     the static decode step (decode_graphs.StaticDecodeStep), recorded as CUDA graphs
                    on a GPU, against the eager step: log-probabilities over several steps, batch
                    buckets 1 and 4, span buckets 256 and 512
  batched_tokens    greedy tokens of concurrent requests: one request at a time vs BatchedLLM with
                    static (CUDA-graph) decoding vs BatchedLLM eager
  flow_batching     a padded batch of flow decoder calls (BatchedFlowDecoder) vs each call alone
  streaming_output  one streaming synthesis through the whole runtime on `device`: finite audio
  second_device     the model on a second device: same audio as on the first, nothing allocated on
                    the first
The CPU fp32 path itself is checked against the upstream reference by the parity tests in CI, so a
device run that equals it is checked against the reference too.
"""
from __future__ import annotations

import copy
import inspect
import math
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cosyvoice.concurrency.decode_graphs import StaticDecodeStep, eager_decode_step
from cosyvoice.concurrency.flow_batching import BatchedFlowDecoder, FlowCall
from cosyvoice.concurrency.llm_scheduler import BatchedLLM
from cosyvoice.inference.synthesis import ModelInput
from cosyvoice.loading.model_dir import load_stage
from cosyvoice.models.hift import SourceNoise
from cosyvoice.models.qwen_slots import SlotKVCache, forward_slots
from cosyvoice.models.sampling import greedy_sampling

from .stage_timers import ForcedLength, synchronize
from .streaming_load import speech_lm

HALF_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
FLOW_STEPS = 10
TEACHER_FORCED_TOKENS = 40
PROMPT_TEXT = "This is what the speaker says in the prompt recording."
TEXTS = ("The quick brown fox jumps over the lazy dog.",
         "A short one.",
         "Then it runs back home before dark, where a warm fire waits.")

# Bounds. Device fp32 vs CPU fp32: cuDNN convolutions use TF32 by default on Ampere and later (the
# runtime keeps that default), so mel and audio differ by about 1e-3 relative. Half precision: as
# tests/test_half_precision.py and tests/test_cv3_flow_parity.py (dtype bugs give errors of order 1).
DEVICE_LLM_TV = 5e-3
DEVICE_REL = 2e-2
EXACT_LLM_TV = 1e-3            # TF32 off: only the order of float32 sums differs
EXACT_REL = 1e-3
EXACT_AUDIO_REL = 1e-2         # the vocoder's phase is a long float32 cumulative sum
HALF_LLM_TV = 5e-2
HALF_UNET_REL = 5e-2
GRAPH_FP32_ABS = 1e-4          # static/graph vs eager log-probabilities, fp32
GRAPH_HALF_TV = 1e-2           # half precision: total variation (other kernels, other rounding)
FLOW_BATCH_FP32_REL = 1e-3
FLOW_BATCH_HALF_REL = 5e-2
NEAR_TIE = 1e-3                # greedy tokens may part where two log-probabilities are this close
GREEDY_TOKEN_TEXT_RATIO = 8    # random weights rarely stop: at most 8 tokens per text token


@dataclass
class Row:
    """One checked quantity: passes when `value` is within `bound` (`<=`, or `==` for counts)."""
    name: str
    value: float | int | bool | None
    bound: float | int | bool | None
    passed: bool | None              # None: skipped
    detail: str = ""

    def as_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "bound": self.bound,
                "result": "skipped" if self.passed is None else ("pass" if self.passed else "FAIL"),
                "detail": self.detail}


class Checks:
    """Collects the pass/fail rows of a run."""

    def __init__(self):
        self.rows: list[Row] = []

    def at_most(self, name: str, value: float, bound: float, detail: str = "") -> bool:
        passed = value is not None and math.isfinite(value) and value <= bound
        self.rows.append(Row(name, _round(value), bound, passed, detail))
        return passed

    def at_least(self, name: str, value: float, bound: float, detail: str = "") -> bool:
        passed = value is not None and math.isfinite(value) and value >= bound
        self.rows.append(Row(name, _round(value), bound, passed, detail))
        return passed

    def equal(self, name: str, value, expected, detail: str = "") -> bool:
        passed = value == expected
        self.rows.append(Row(name, value, expected, passed, detail))
        return passed

    def skipped(self, name: str, reason: str) -> None:
        self.rows.append(Row(name, None, None, None, reason))

    def error(self, name: str, error: BaseException) -> None:
        self.rows.append(Row(name, None, None, False, f"error: {type(error).__name__}: {error}"[:500]))

    @property
    def failed(self) -> list[Row]:
        return [row for row in self.rows if row.passed is False]


def _round(value):
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.4g}")
    return value


# ---- inputs ------------------------------------------------------------------------------------

@dataclass
class StageInputs:
    """What every stage check feeds the stages: a zero-shot request, teacher-forced tokens, and
    the CPU fp32 stages that give the reference outputs."""
    request: ModelInput               # CPU tensors
    forced_tokens: torch.Tensor       # [n] speech tokens
    requests: list[ModelInput]        # three requests of different lengths (batching checks)
    cpu_stages: dict                  # "llm", "flow", "hift" in fp32 on the CPU


def stage_inputs(tts_cpu, prompt: tuple[np.ndarray, int], seed: int = 0) -> StageInputs:
    """Inputs from a model loaded on the CPU in fp32 (`cosyvoice.load(dir, llm_backend="torch-serial")`)."""
    samples, rate = prompt
    voice = tts_cpu.prepare_voice(samples, PROMPT_TEXT, sample_rate=rate)
    ids = [torch.tensor([tts_cpu.tokenizer.encode(text)], dtype=torch.int32) for text in TEXTS]
    requests = [ModelInput(ids[0], voice.prompt_text_ids, voice.speech_tokens, voice.speech_tokens,
                           voice.speech_feat, voice.embedding),
                ModelInput(ids[1], voice.prompt_text_ids[:, :0], voice.speech_tokens[:, :0],
                           voice.speech_tokens, voice.speech_feat, voice.embedding),
                ModelInput(ids[2], voice.prompt_text_ids, voice.speech_tokens[:, : voice.speech_tokens.shape[1] // 2],
                           voice.speech_tokens, voice.speech_feat, voice.embedding)]
    llm = tts_cpu.synthesizer.llm
    generator = torch.Generator().manual_seed(seed)
    forced = torch.randint(0, llm.speech_token_size, (TEACHER_FORCED_TOKENS,), generator=generator)
    return StageInputs(requests[0], forced, requests,
                       {"llm": llm, "flow": tts_cpu.synthesizer.flow, "hift": tts_cpu.synthesizer.hift})


# ---- per-stage errors ----------------------------------------------------------------------------

def total_variation(logp: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest total variation distance between two rows of next-token distributions [n, V]."""
    p, q = logp.double().exp().cpu(), expected.double().exp().cpu()
    return float(0.5 * (p - q).abs().sum(dim=-1).max())


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float, bool]:
    """(max abs error, max abs error / max |expected|, actual all finite)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    finite = bool(torch.isfinite(actual).all())
    abs_err = float((actual - expected).abs().max()) if actual.numel() else 0.0
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return abs_err, abs_err / scale if scale > 0 else abs_err, finite


def llm_log_probs(llm, request: ModelInput, forced: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        prompt = llm.prompt_embeddings(request.text_ids, request.prompt_text_ids, request.llm_prompt_tokens)
        return llm.log_probs(prompt, forced).float().cpu()


def flow_mels(flow, request: ModelInput, forced: torch.Tensor) -> dict[str, torch.Tensor]:
    """The flow's mel for the forced tokens: the final full-attention call and a chunk-causal one."""
    device = flow.input_embedding.weight.device
    tokens = forced[None].to(device=device, dtype=torch.int32)
    args = (request.flow_prompt_tokens.to(device), request.prompt_feat.to(device), request.embedding.to(device))
    with torch.inference_mode():
        final = flow.inference(tokens, *args, streaming=False, finalize=True)
        chunk = flow.inference(tokens, *args, streaming=True, finalize=False)
    return {"final": final.float().cpu(), "streaming": chunk.float().cpu()}


def vocoder_audio(hift, mel: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The vocoder's audio for `mel`; CosyVoice2's HiFT gets its source noise drawn on the CPU, so
    every device sees the same draws (CosyVoice3's causal HiFT draws none)."""
    device = next(hift.parameters()).device
    mel = mel.to(device)
    with torch.inference_mode():
        if "noise" in inspect.signature(hift.inference).parameters:
            length = mel.shape[2] * hift.samples_per_frame
            noise = SourceNoise.draw(1, length, hift.m_source.l_linear.in_features, torch.device("cpu"),
                                     torch.Generator().manual_seed(seed))
            noise = SourceNoise(*(t.to(device) for t in (noise.rand_ini, noise.sine_noise, noise.source_noise)))
            speech, _ = hift.inference(mel, noise=noise)
        else:
            speech, _ = hift.inference(mel, finalize=True)
    return speech.float().cpu()


def half_flow_bound(flow, dtype: torch.dtype) -> float:
    """tests/test_cv3_flow_parity.py's bound for a DiT estimator (grows with depth and the CFG
    mix), tests/test_half_precision.py's for CosyVoice2's U-Net."""
    estimator = flow.decoder.estimator
    blocks = getattr(estimator, "transformer_blocks", None)
    if blocks is None:
        return HALF_UNET_REL
    eps = float(torch.finfo(dtype).eps)
    return 4 * eps * (len(blocks) * (1 + 2 * flow.decoder.cfg_rate) + FLOW_STEPS)


@contextmanager
def exact_fp32():
    """TF32 off for CUDA matmuls and cuDNN convolutions while inside (nothing changes on a CPU)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _stage_outputs(llm, flow, hift, inputs: StageInputs) -> dict:
    mels = flow_mels(flow, inputs.request, inputs.forced_tokens)
    return {"logp": llm_log_probs(llm, inputs.request, inputs.forced_tokens), "mels": mels,
            "audio": vocoder_audio(hift, mels["final"])}


def _compare_fp32(device_out: dict, hift, cpu_out: dict, checks: Checks, name: str, bounds: tuple) -> dict:
    """One fp32 variant on the device against the CPU; the vocoder gets the CPU mel on both sides,
    so its row is its own error."""
    tv_bound, rel_bound, audio_bound = bounds
    row = {"llm_total_variation": total_variation(device_out["logp"], cpu_out["logp"])}
    checks.at_most(f"{name}: llm total variation", row["llm_total_variation"], tv_bound)
    for mode in ("final", "streaming"):
        abs_err, rel, finite = relative_error(device_out["mels"][mode], cpu_out["mels"][mode])
        row[f"flow_{mode}_abs"], row[f"flow_{mode}_rel"] = abs_err, rel
        checks.at_most(f"{name}: flow {mode} mel rel err", rel if finite else math.inf, rel_bound)
    abs_err, rel, finite = relative_error(vocoder_audio(hift, cpu_out["mels"]["final"]), cpu_out["audio"])
    row["hift_abs"], row["hift_rel"] = abs_err, rel
    checks.at_most(f"{name}: hift audio rel err", rel if finite else math.inf, audio_bound)
    return _rounded(row)


def stage_errors(model_dir: Path, device: torch.device, inputs: StageInputs, checks: Checks, label: str,
                 half_dtypes: tuple[str, ...] = ("float16", "bfloat16"), compare_cpu: bool = True) -> dict:
    """Every stage in fp32 on `device` against the CPU (when `compare_cpu`): on a GPU twice, as the
    runtime runs (cuDNN's TF32 convolutions on) and exactly (TF32 off), so a TF32 rounding and a
    bug tell apart. Then each half dtype against exact fp32 on `device`. The vocoder always runs
    in fp32 (load_stage); its half rows feed it the half-precision flow's mel, and check the audio
    is finite (the error there is the mel's, already bounded)."""
    report: dict = {}
    llm = load_stage(model_dir, "llm", device, torch.float32)
    flow = load_stage(model_dir, "flow", device, torch.float32)
    hift = load_stage(model_dir, "hift", device, torch.float32)
    with exact_fp32():
        exact = _stage_outputs(llm, flow, hift, inputs)
    if compare_cpu:
        cpu = inputs.cpu_stages
        cpu_out = _stage_outputs(cpu["llm"], cpu["flow"], cpu["hift"], inputs)
        if device.type == "cuda":
            default = _stage_outputs(llm, flow, hift, inputs)
            report["cuda_fp32_tf32_vs_cpu"] = _compare_fp32(
                default, hift, cpu_out, checks, f"{label} {device.type} fp32 (TF32 convs) vs cpu",
                (DEVICE_LLM_TV, DEVICE_REL, DEVICE_REL))
            with exact_fp32():
                report["cuda_fp32_exact_vs_cpu"] = _compare_fp32(
                    exact, hift, cpu_out, checks, f"{label} {device.type} fp32 exact vs cpu",
                    (EXACT_LLM_TV, EXACT_REL, EXACT_AUDIO_REL))
        else:
            report["cpu_fp32_vs_cpu"] = _compare_fp32(exact, hift, cpu_out, checks, f"{label} cpu fp32 vs cpu",
                                                      (EXACT_LLM_TV, EXACT_REL, EXACT_AUDIO_REL))

    for name in half_dtypes:
        dtype = HALF_DTYPES[name]
        half_llm = copy.deepcopy(llm).to(dtype)
        half_flow = copy.deepcopy(flow).to(dtype)
        row = {"llm_total_variation": total_variation(llm_log_probs(half_llm, inputs.request,
                                                                    inputs.forced_tokens), exact["logp"])}
        checks.at_most(f"{label} {name} vs fp32: llm total variation", row["llm_total_variation"], HALF_LLM_TV)
        mels = flow_mels(half_flow, inputs.request, inputs.forced_tokens)
        bound = half_flow_bound(flow, dtype)
        row["flow_bound_rel"] = bound
        for mode in ("final", "streaming"):
            abs_err, rel, finite = relative_error(mels[mode], exact["mels"][mode])
            row[f"flow_{mode}_abs"], row[f"flow_{mode}_rel"], row[f"flow_{mode}_finite"] = abs_err, rel, finite
            checks.at_most(f"{label} {name} vs fp32: flow {mode} mel rel err", rel if finite else math.inf, bound)
        abs_err, rel, finite = relative_error(vocoder_audio(hift, mels["final"]), exact["audio"])
        row["hift_from_half_mel_abs"], row["hift_from_half_mel_rel"] = abs_err, rel
        row["hift_from_half_mel_finite"] = finite
        checks.equal(f"{label} {name}: hift audio from the {name} mel is finite", finite, True)
        report[f"{name}_vs_fp32"] = _rounded(row)
        del half_llm, half_flow
    del llm, flow, hift
    _free(device)
    return report


def _rounded(row: dict) -> dict:
    return {key: _round(value) for key, value in row.items()}


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- decode step: static shapes / CUDA graphs vs eager -------------------------------------------

def decode_graphs(llm, inputs: StageInputs, checks: Checks, label: str, steps: int = 4) -> dict:
    """tests/test_batching.py's static-vs-eager comparison on `llm`'s device and dtype, with the
    graphs recorded there when it is a GPU. Three requests (batch bucket 4; one of them far into
    the cache, span bucket 512), then one request alone (bucket 1)."""
    device = llm.speech_embedding.weight.device
    half = llm.speech_embedding.weight.dtype != torch.float32
    bound = GRAPH_HALF_TV if half else GRAPH_FP32_ABS
    body = llm.body
    report: dict = {}
    with torch.inference_mode(), (nullcontext() if half else exact_fp32()):
        prompts = [llm.prompt_embeddings(r.text_ids, r.prompt_text_ids, r.llm_prompt_tokens)
                   for r in inputs.requests]
        cache = SlotKVCache(body, slots=5, max_len=1024)
        static = StaticDecodeStep(body, llm.head_log_probs, cache, scratch_slot=4, max_batch=4,
                                  hidden_size=body.config.hidden_size)
        started = time.perf_counter()
        if device.type == "cuda":
            static.record()
        synchronize(device)
        report["record_s"] = round(time.perf_counter() - started, 3)
        report["graphs"] = len(static._graphs)
        eager = eager_decode_step(body, llm.head_log_probs, cache)
        slots = torch.tensor([3, 0, 1], device=device)
        positions = []
        for slot, prompt, start in zip(slots.tolist(), prompts, (0, 300, 40)):
            at = (start + torch.arange(prompt.shape[1], device=device))[None]
            forward_slots(body, prompt, at, torch.tensor([slot], device=device), cache)   # prefill
            positions.append(int(at[0, -1]) + 1)
        worst, worst_tv = 0.0, 0.0
        for rows in (3, 1):
            tokens = torch.arange(1, rows + 1, device=device)
            at_rows = positions[:rows]
            for _ in range(steps):
                step_inputs = llm.speech_embedding(tokens)[:, None]
                at = torch.tensor(at_rows, device=device)[:, None]
                expected = eager(step_inputs, at, slots[:rows], max(at_rows) + 1).clone()
                actual = static(step_inputs, at, slots[:rows], max(at_rows) + 1).clone()
                worst = max(worst, float((actual.float() - expected.float()).abs().max()))
                worst_tv = max(worst_tv, total_variation(actual, expected))
                tokens = expected.argmax(dim=-1)
                at_rows = [p + 1 for p in at_rows]
            positions[:rows] = at_rows
    report["max_abs_logp_diff"], report["total_variation"] = _round(worst), _round(worst_tv)
    mode = "CUDA graphs" if device.type == "cuda" else "static"
    if half:   # half rounding moves the far tail's log-probabilities most: bound the distribution
        checks.at_most(f"{label} decode step {mode} vs eager ({_dtype_name(llm)}): total variation",
                       worst_tv, bound)
    else:
        checks.at_most(f"{label} decode step {mode} vs eager ({_dtype_name(llm)}): max abs logp diff",
                       worst, bound)
    if device.type == "cuda":
        expected_graphs = len(static._buffers) * len(static._spans)
        checks.equal(f"{label} decode step: graphs recorded (batch x span buckets)", report["graphs"],
                     expected_graphs)
    del static, cache
    return report


def _dtype_name(llm) -> str:
    return str(llm.speech_embedding.weight.dtype).replace("torch.", "")


def _concurrently(jobs: list) -> list:
    """Runs each zero-argument job in its own thread, started together; results in order."""
    results, errors = [None] * len(jobs), []
    start = threading.Barrier(len(jobs))

    def run(index, job):
        try:
            start.wait()
            results[index] = job()
        except BaseException as error:   # re-raised below
            errors.append(error)

    threads = [threading.Thread(target=run, args=item, daemon=True) for item in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    if errors:
        raise errors[0]
    return results


def batched_tokens(llm, inputs: StageInputs, checks: Checks, label: str) -> dict:
    """Greedy tokens of three concurrent requests: solo (SpeechLM.generate) vs BatchedLLM static
    (recorded as CUDA graphs on a GPU) vs BatchedLLM eager. On a GPU the batched step's kernels are
    not the solo step's, so a request may take the other of two near-equal tokens and go on
    differently from there: that counts as agreeing when the solo distribution put the two within
    NEAR_TIE of each other (the divergence and its gap are reported). The scheduler falls back to
    eager decoding with only a log line when recording fails, so the graph count is checked too."""
    device = llm.speech_embedding.weight.device
    limit = dict(max_token_text_ratio=GREEDY_TOKEN_TEXT_RATIO)

    def args(r: ModelInput):
        return r.text_ids, r.prompt_text_ids, r.llm_prompt_tokens

    solo = [list(llm.generate(*args(r), sampling=greedy_sampling, **limit)) for r in inputs.requests]
    report = {"tokens_per_request": [len(t) for t in solo]}
    for name, static in (("static", True), ("eager", False)):
        batched = BatchedLLM(llm, max_batch=4, max_len=1024, static_decode=static)
        together = _concurrently([lambda r=r: list(batched.generate(*args(r), sampling=greedy_sampling, **limit))
                                  for r in inputs.requests])
        divergences = [divergence(llm, request, expected, actual)
                       for request, expected, actual in zip(inputs.requests, solo, together)]
        identical = sum(d is None for d in divergences)
        near_ties = sum(d is not None and d["gap"] <= NEAR_TIE for d in divergences)
        report[name] = {"identical": identical, "near_tie_divergences": near_ties,
                        "divergences": [d for d in divergences if d is not None],
                        "step_sizes": [n for n, count in enumerate(batched.step_sizes) if count]}
        checks.equal(f"{label} batched greedy tokens ({name}) == solo: requests agreeing", identical + near_ties,
                     len(solo), detail=f"{identical} identical, {near_ties} after a near tie; batches of "
                                       f"{report[name]['step_sizes']}")
        if static and device.type == "cuda":
            graphs = len(getattr(batched._decode, "_graphs", {}))
            report["graphs"] = graphs
            checks.at_least(f"{label} BatchedLLM recorded CUDA graphs", graphs, 1,
                            detail="0: recording failed and the scheduler decodes eagerly")
    return report


def divergence(llm, request: ModelInput, expected: list[int], actual: list[int]) -> dict | None:
    """None when the token lists are equal, else where they part and how far apart the two tokens
    were in the solo run's distribution there (log-probability gap; 0 = a tie)."""
    if actual == expected:
        return None
    index = next((i for i, (a, b) in enumerate(zip(actual, expected)) if a != b), min(len(actual), len(expected)))
    prefix = torch.tensor(expected[:index], dtype=torch.long)
    logp = llm_log_probs(llm, request, prefix)[index]
    stop = llm.speech_token_size                     # a list that ends early took a stop token there
    chosen = [tokens[index] if index < len(tokens) else stop for tokens in (expected, actual)]
    return {"index": index, "solo_token": chosen[0], "batched_token": chosen[1],
            "gap": _round(float(abs(logp[chosen[0]] - logp[chosen[1]])))}


# ---- flow batching ---------------------------------------------------------------------------------

def flow_batching(flow, inputs: StageInputs, checks: Checks, label: str) -> dict:
    """tests/test_flow_batching.py on `flow`'s device and dtype: four decoder calls of different
    lengths and attention modes, as one padded batch and one by one."""
    device = flow.input_embedding.weight.device
    half = flow.input_embedding.weight.dtype != torch.float32
    request = inputs.request
    prompt = (request.flow_prompt_tokens.to(device), request.prompt_feat.to(device))
    tokens = inputs.forced_tokens[None].to(device=device, dtype=torch.int32)
    calls = []
    # fp32 with TF32 off: what batching changes, not TF32 rounding (which differs per batch size)
    with torch.inference_mode(), (nullcontext() if half else exact_fp32()):
        for n_tokens, finalize in ((tokens.shape[1], True), (9, False), (tokens.shape[1] // 2, True), (14, False)):
            embedding = request.embedding.to(device) * (1 + 0.1 * len(calls))
            mu, spks, cond, mask = flow.prepare_cfm_inputs(tokens[:, :n_tokens], *prompt, embedding,
                                                           streaming=not finalize, finalize=finalize)
            calls.append((mu, mask, spks, cond, not finalize))
        solo = [flow.decoder(mu, mask, spks, cond, streaming=streaming) for mu, mask, spks, cond, streaming in calls]
        batched = BatchedFlowDecoder(flow.decoder)
        mels = batched.decode_batch([FlowCall(mu, spks, cond, FLOW_STEPS, streaming) for mu, _, spks, cond, streaming in calls])
    worst_rel, worst_abs = 0.0, 0.0
    for mel, expected in zip(mels, solo):
        abs_err, rel, finite = relative_error(mel, expected)
        worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel if finite else math.inf)
    name = str(flow.input_embedding.weight.dtype).replace("torch.", "")
    checks.at_most(f"{label} flow batch of 4 vs solo ({name}): rel err", worst_rel,
                   FLOW_BATCH_HALF_REL if half else FLOW_BATCH_FP32_REL)
    return {"frames": [int(m.shape[2]) for m in solo], "max_abs": _round(worst_abs), "max_rel": _round(worst_rel)}


# ---- whole runtime -------------------------------------------------------------------------------

def streaming_audio(tts, request: ModelInput, tokens: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """One seeded streaming synthesis of exactly `tokens` speech tokens: (audio, chunks)."""
    llm = speech_lm(tts)
    forced = ForcedLength(llm.sampling, tokens, llm.speech_token_size)
    generator = torch.Generator(tts.device).manual_seed(seed)
    chunks = list(tts.synthesizer.synthesize(request, stream=True, generator=generator, sampling=forced))
    return (np.concatenate(chunks) if chunks else np.zeros(0, np.float32)), len(chunks)


def streaming_output(tts, request: ModelInput, checks: Checks, label: str, tokens: int = 60) -> dict:
    audio, chunks = streaming_audio(tts, request, tokens)
    finite = bool(np.isfinite(audio).all()) and audio.size > 0
    checks.equal(f"{label} streaming synthesis on {tts.device}: finite audio in several chunks",
                 finite and chunks >= 2, True, detail=f"{chunks} chunks, {audio.size} samples")
    return {"chunks": chunks, "samples": int(audio.size), "finite": finite,
            "peak": _round(float(np.abs(audio).max())) if audio.size else None}


def second_device(load, request: ModelInput, primary: torch.device, secondary: torch.device, checks: Checks,
                  label: str, tokens: int = 60) -> dict:
    """The model loaded on `secondary` (`load(device)` -> a CosyVoice): the same seeded streaming
    audio as on `primary`, and (GPUs) no memory taken on `primary` meanwhile: every tensor, the
    batched LLM's cache and graphs and the flow batcher's work, stays on the device it was given."""
    first = load(primary)
    expected, _ = streaming_audio(first, request, tokens)
    del first
    _free(primary)
    before = torch.cuda.memory_allocated(primary) if primary.type == "cuda" else None
    second = load(secondary)
    audio, chunks = streaming_audio(second, request, tokens)
    after = torch.cuda.memory_allocated(primary) if primary.type == "cuda" else None
    report = {"primary": str(primary), "secondary": str(secondary), "chunks": chunks}
    abs_err, rel, finite = relative_error(torch.from_numpy(audio), torch.from_numpy(expected))
    report["audio_rel_err"] = _round(rel)
    checks.at_most(f"{label} on {secondary} vs {primary}: audio rel err", rel if finite else math.inf, DEVICE_REL)
    if before is not None:
        report["primary_bytes_allocated_meanwhile"] = after - before
        checks.at_most(f"{label} on {secondary}: bytes allocated on {primary} meanwhile", after - before, 0)
    llm = second.synthesizer.llm
    graphs = len(getattr(getattr(llm, "_decode", None), "_graphs", {}))
    report["graphs"] = graphs
    if secondary.type == "cuda":
        checks.at_least(f"{label} on {secondary}: BatchedLLM recorded CUDA graphs", graphs, 1)
    del second
    return report
