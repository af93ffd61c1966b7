"""In-process stage profiler: where the time of one streaming synthesis goes, stage by stage.

    python -m bench.profile_stages --model-dir /tmp/full --tokens 100 --concurrency 8
    python -m bench.profile_stages --model-dir DIR --device cuda --dtype bfloat16 --tokens 300

Measures, on a zero-shot request with a synthetic (or given) prompt:
  frontend   prompt feature extraction (speech tokens, speaker embedding, mel) and text frontend
  llm        prefill time over the prompt, first-token time, decode tokens/s
  flow       every flow call of a streaming run (it recomputes all tokens so far)
  vocoder    every vocoder call of that run
  streaming  first-chunk latency, total time, audio seconds and RTF of the streaming run
  llm_concurrency  speech tokens/s summed over N simultaneous requests at concurrency 1 and N,
             continuous batching (`torch`) vs one request at a time (`torch-serial`)
  flow_concurrency mel frames/s summed over N simultaneous flow calls at concurrency 1 and N,
             batched across requests vs each request's call on its own
Random weights do not stop on their own: every run generates exactly --tokens speech tokens
(bench.stage_timers.ForcedLength). See bench/README.md for the report's keys.

With --streaming-overhead only this is measured (bench.streaming_overhead): about --seconds S of
audio from the same speech tokens (LLM bypassed), streaming and not; the report's
`streaming_overhead` is streaming token-to-waveform time / non-streaming time.

    python -m bench.profile_stages --model-dir DIR --streaming-overhead --seconds 20 --out R.json
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

if __package__ in (None, ""):   # run as `python bench/profile_stages.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

import cosyvoice  # noqa: E402
from cosyvoice.concurrency.llm_scheduler import BatchedLLM  # noqa: E402
from cosyvoice.inference.synthesis import ModelInput  # noqa: E402

from bench import flow_concurrency, llm_concurrency, streaming_overhead  # noqa: E402
from bench.environment import cpu_model, describe_run, load_average  # noqa: E402
from bench.plots import plot_profile, plot_streaming_overhead  # noqa: E402
from bench.report import default_path, write_report  # noqa: E402
from bench.stage_timers import ForcedLength, TimedStage, flow_tokens, synchronize, vocoder_frames  # noqa: E402
from bench.stats import summary  # noqa: E402

DEFAULT_TEXT = ("The quick brown fox jumps over the lazy dog, then runs back home before dark, "
                "where a warm fire and a quiet evening wait.")
DEFAULT_PROMPT_TEXT = "This is what the speaker says in the prompt recording."
PROMPT_SECONDS, PROMPT_RATE = 5.0, 16000
WARMUP_TOKENS = 25


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_stages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--tokens", type=int, default=100, help="speech tokens every run generates")
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--prompt-wav", type=Path, help="voice prompt (default: 5 s of synthetic sound)")
    parser.add_argument("--prompt-text", default=DEFAULT_PROMPT_TEXT, help="its transcript")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the frontend and the prefill")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="N of the LLM concurrency measurement (1 vs N); 0 skips it")
    parser.add_argument("--concurrency-tokens", type=int, help="tokens per request there (default --tokens)")
    parser.add_argument("--flow-concurrency", type=int, default=0,
                        help="N of the flow concurrency measurement (1 vs N); 0 skips it")
    parser.add_argument("--streaming-overhead", action="store_true",
                        help="measure only streaming vs non-streaming token-to-waveform time")
    parser.add_argument("--seconds", default="20",
                        help="audio seconds of the --streaming-overhead runs (comma-separated: several)")
    parser.add_argument("--recompute", action="store_true",
                        help="stream without carried state (every chunk recomputes its prefix, as "
                             "the reference does), for comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="report path (default bench/results/profile-<time>.json)")
    args = parser.parse_args(argv)
    try:
        args.seconds = [float(value) for value in str(args.seconds).split(",")]
    except ValueError:
        parser.error("--seconds takes numbers, comma-separated")
    if args.tokens < 2 or args.repeats < 1 or args.concurrency < 0 or args.flow_concurrency < 0:
        parser.error("--tokens must be at least 2, --repeats at least 1, --concurrency and "
                     "--flow-concurrency at least 0")
    return args


def prompt_audio(path: Path | None) -> tuple[np.ndarray, int]:
    """The prompt recording, or a repeatable synthetic one (a gliding tone in noise)."""
    if path is not None:
        samples, rate = sf.read(path, dtype="float32", always_2d=True)
        return samples.mean(axis=1), rate
    t = np.arange(int(PROMPT_SECONDS * PROMPT_RATE)) / PROMPT_RATE
    tone = 0.3 * np.sin(2 * np.pi * (150 + 40 * np.sin(2 * np.pi * 0.5 * t)) * t)
    noise = 0.02 * np.random.default_rng(0).standard_normal(t.size)
    return (tone + noise).astype(np.float32), PROMPT_RATE


def timed_ms(work, repeats: int, device: torch.device) -> tuple[list[float], object]:
    """Runs `work()` `repeats` times; the durations in ms and the last result."""
    durations, result = [], None
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        result = work()
        synchronize(device)
        durations.append((time.perf_counter() - started) * 1000)
    return durations, result


def profile_frontend(tts, args: argparse.Namespace, device: torch.device):
    samples, rate = prompt_audio(args.prompt_wav)
    prompt_ms, voice = timed_ms(lambda: tts.prepare_voice(samples, args.prompt_text, sample_rate=rate),
                                args.repeats, device)
    text_ms, ids = timed_ms(lambda: [tts.tokenizer.encode(s) for s in tts.normalizer.split(args.text)],
                            args.repeats, device)
    report = {"prompt_audio_s": round(len(samples) / rate, 2),
              "prompt_speech_tokens": int(voice.speech_tokens.shape[1]),
              "prompt_features_ms": round(float(np.median(prompt_ms)), 2),
              "text_ms": round(float(np.median(text_ms)), 3),
              "text_segments": len(ids), "text_tokens": sum(len(segment) for segment in ids)}
    return report, voice


def profile_llm(llm, request: ModelInput, forced: ForcedLength, args, device: torch.device) -> dict:
    with torch.inference_mode():
        embeds = llm.prompt_embeddings(request.text_ids, request.prompt_text_ids, request.llm_prompt_tokens)
        prefill_ms, _ = timed_ms(lambda: llm.llm(embeds), args.repeats, device)
    generator = torch.Generator(device).manual_seed(args.seed)
    arrivals = []
    started = time.perf_counter()
    for _ in llm.generate(request.text_ids, request.prompt_text_ids, request.llm_prompt_tokens,
                          sampling=forced, generator=generator):
        arrivals.append(time.perf_counter() - started)
    forced.check([len(arrivals)])
    per_token_ms = (arrivals[-1] - arrivals[0]) * 1000 / (len(arrivals) - 1)
    return {"prefill_positions": int(embeds.shape[1]),
            "prefill_ms": summary(prefill_ms, 2),
            "prefill_positions_per_s": round(embeds.shape[1] * 1000 / float(np.median(prefill_ms)), 1),
            "first_token_ms": round(arrivals[0] * 1000, 2),
            "decode_tokens": len(arrivals),
            "decode_ms_per_token": round(per_token_ms, 3),
            "decode_tokens_per_s": round(1000 / per_token_ms, 2)}


def profile_streaming(tts, request: ModelInput, forced: ForcedLength, seed: int,
                      device: torch.device) -> dict:
    """One streaming synthesis with timed flow and vocoder calls."""
    flow = TimedStage(tts.synthesizer.flow, device, "tokens", flow_tokens)
    hift = TimedStage(tts.synthesizer.hift, device, "mel_frames", vocoder_frames)
    synthesizer = copy.copy(tts.synthesizer)   # the model's own vocoding and settings, timed stages
    synthesizer.flow, synthesizer.hift = flow, hift
    generator = torch.Generator(device).manual_seed(seed)
    arrivals, samples = [], 0
    started = time.perf_counter()
    for chunk in synthesizer.synthesize(request, stream=True, generator=generator, sampling=forced):
        arrivals.append(time.perf_counter() - started)
        samples += len(chunk)
    total_s = arrivals[-1]
    audio_s = samples / tts.sample_rate
    # A voice's first stream computes its prompt's flow state once (a call without new tokens).
    prompt_calls = [c for c in flow.calls if c["tokens"] == 0]
    calls = [c for c in flow.calls if c["tokens"] > 0]
    return {
        "streaming": {"first_chunk_ms": round(arrivals[0] * 1000, 2), "total_ms": round(total_s * 1000, 2),
                      "chunks": len(arrivals), "audio_s": round(audio_s, 3),
                      "rtf": round(total_s / audio_s, 4),
                      "first_chunk_tokens": calls[0]["tokens"]},
        "flow": {"calls": calls, "ms_per_chunk": summary([c["ms"] for c in calls], 2),
                 "voice_prompt_state_ms": prompt_calls[0]["ms"] if prompt_calls else None},
        "vocoder": {"calls": hift.calls, "ms_per_chunk": summary([c["ms"] for c in hift.calls], 2)},
    }


def warm_up(tts, request: ModelInput, forced: ForcedLength, device: torch.device) -> None:
    """Every stage once, on a short request without a flow prompt (cheap even on a CPU), so
    one-time costs (allocations, kernel selection, CUDA context) stay out of the measurements."""
    unprompted = ModelInput(request.text_ids, request.prompt_text_ids, request.llm_prompt_tokens,
                            request.flow_prompt_tokens[:, :0], request.prompt_feat[:, :0],
                            request.embedding)
    list(tts.synthesizer.synthesize(unprompted, stream=False, sampling=forced,
                                    generator=torch.Generator(device).manual_seed(0)))
    synchronize(device)


def device_block(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_model()})"
    return {"name": name, "type": device.type, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    report = {"kind": "stage_profile", "environment": describe_run(args.model_dir, device_block(device))}
    started = time.perf_counter()
    tts = cosyvoice.load(args.model_dir, device=device, dtype=getattr(torch, args.dtype),
                         llm_backend="torch-serial")
    load_s = time.perf_counter() - started
    if args.recompute:
        tts.synthesizer.carry_state = False
    llm = tts.synthesizer.llm                      # the SpeechLM itself (torch-serial)
    frontend, voice = profile_frontend(tts, args, device)
    text_ids = torch.tensor([tts.tokenizer.encode(args.text)], dtype=torch.int32)
    request = ModelInput(text_ids, voice.prompt_text_ids, voice.speech_tokens, voice.speech_tokens,
                         voice.speech_feat, voice.embedding)
    forced = ForcedLength(llm.sampling, args.tokens, llm.speech_token_size)
    warm_up(tts, request, ForcedLength(llm.sampling, WARMUP_TOKENS, llm.speech_token_size), device)
    if args.streaming_overhead:
        return run_streaming_overhead(tts, args, request, device, report, load_s, frontend)
    report["settings"] = {"device": str(device), "dtype": args.dtype, "tokens": args.tokens,
                          "text": args.text, "text_tokens": int(text_ids.shape[1]),
                          "prompt_wav": str(args.prompt_wav) if args.prompt_wav else "synthetic",
                          "repeats": args.repeats, "seed": args.seed, "load_s": round(load_s, 2),
                          "chunk_size_tokens": tts.settings.chunk_size}
    report["frontend"] = frontend
    phase_load = {"frontend": load_average()}   # 1-minute averages above the core count: disturbed
    report["llm"] = profile_llm(llm, request, forced, args, device)
    phase_load["llm"] = load_average()
    report.update(profile_streaming(tts, request, forced, args.seed, device))
    phase_load["streaming"] = load_average()
    report["load_average_after_phase"] = phase_load
    if args.concurrency:
        tokens = args.concurrency_tokens or args.tokens
        backends = {"torch": BatchedLLM(llm, max_batch=max(8, args.concurrency)), "torch-serial": llm}
        report["llm_concurrency"] = llm_concurrency.compare(
            backends, request, ForcedLength(llm.sampling, tokens, llm.speech_token_size),
            [1, args.concurrency], device)
    if args.flow_concurrency:
        report["flow_concurrency"] = flow_concurrency.compare(
            tts.synthesizer.flow, request, args.concurrency_tokens or args.tokens,
            [1, args.flow_concurrency], device, llm.speech_token_size)
    report["load_average_end"] = load_average()
    return report


def run_streaming_overhead(tts, args: argparse.Namespace, request: ModelInput, device: torch.device,
                           report: dict, load_s: float, frontend: dict) -> dict:
    report["kind"] = "streaming_overhead"
    report["settings"] = {"device": str(device), "dtype": args.dtype, "seconds": args.seconds,
                          "repeats": args.repeats, "seed": args.seed, "load_s": round(load_s, 2),
                          "carried_state": bool(getattr(tts.synthesizer, "carry_state", False)),
                          "generation": tts.generation,
                          "prompt_wav": str(args.prompt_wav) if args.prompt_wav else "synthetic"}
    report["frontend"] = frontend
    report["load_average_start"] = load_average()
    report["lengths"] = [streaming_overhead.measure(tts, request, seconds, args.repeats, device, args.seed)
                         for seconds in args.seconds]
    report["streaming_overhead"] = report["lengths"][-1]["streaming_overhead"]
    report["load_average_end"] = load_average()
    return report


def format_overhead_summary(report: dict) -> str:
    lines = []
    for length in report["lengths"]:
        stream, whole = length["streaming"], length["non_streaming"]
        lines.append(f"{length['tokens']} tokens ({whole['audio_s']} s of audio, {length['prompt_tokens']}-token "
                     f"prompt): streaming {stream['total_s']['p50']} s (first chunk "
                     f"{stream['first_chunk_ms']['p50']} ms, {stream['chunks']} chunks), non-streaming "
                     f"{whole['total_s']['p50']} s: streaming_overhead {length['streaming_overhead']} "
                     f"(best runs {length['streaming_overhead_best']}, CPU time {length['streaming_overhead_cpu']})")
    return "\n".join(lines)


def format_summary(report: dict) -> str:
    llm, streaming = report["llm"], report["streaming"]
    lines = [f"frontend: prompt features {report['frontend']['prompt_features_ms']} ms, "
             f"text {report['frontend']['text_ms']} ms",
             f"LLM: prefill {llm['prefill_ms']['p50']} ms over {llm['prefill_positions']} positions, "
             f"decode {llm['decode_tokens_per_s']} tokens/s",
             f"flow per chunk p50 {report['flow']['ms_per_chunk']['p50']} ms, vocoder per chunk p50 "
             f"{report['vocoder']['ms_per_chunk']['p50']} ms",
             f"streaming: first chunk {streaming['first_chunk_ms']} ms, RTF {streaming['rtf']} "
             f"({streaming['audio_s']} s of audio)"]
    concurrency = report.get("llm_concurrency")
    if concurrency:
        for backend, rows in concurrency["backends"].items():
            rates = ", ".join(f"{row['tokens_per_s']} ({row['decode_tokens_per_s']} decoding) at "
                              f"{row['concurrency']}" for row in rows)
            lines.append(f"LLM tokens/s summed, {backend}: {rates} (x{concurrency['scaling'][backend]}, "
                         f"decoding x{concurrency['decode_scaling'][backend]})")
    flows = report.get("flow_concurrency")
    if flows:
        for decoder, rows in flows["decoders"].items():
            rates = ", ".join(f"{row['mel_frames_per_s']} at {row['concurrency']}" for row in rows)
            lines.append(f"flow mel frames/s summed, {decoder}: {rates} (x{flows['scaling'][decoder]})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or default_path("profile")
    report = run(args)
    if args.streaming_overhead:
        print(format_overhead_summary(report))
        png = write_report(report, out, plot_streaming_overhead)
        print(f"wrote {out} and {png}")
        return 0
    print(format_summary(report))
    png = write_report(report, out, plot_profile)
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
