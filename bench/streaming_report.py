"""One model, one text set: what streaming costs and what concurrency pays, in one report.

    python -m bench.streaming_report --model-dir /tmp/full-cv2 --seconds 5,20 --concurrency 1,4,8 \\
        --out bench/results/cpu-full-cv2-streaming.json

Two parts, run one after the other (never at once: each would disturb the other's timings):
  in-process  about --seconds S of audio from the same speech tokens streaming and not
              (bench.streaming_overhead): token-to-waveform compute per audio second, first-chunk
              time, streaming_overhead (streaming time / non-streaming time)
  HTTP        server.py started with its default admission settings (as deployed), then a
              concurrency sweep (bench.load) of zero-shot requests in upstream's request shape
              with a prompt upload: first audio byte, aggregate audio seconds per second, errors,
              and per level the LLM and flow batch-size histograms read from /metrics
The default text is short (with random weights the LLM runs to its length limit, 20 speech
tokens per text token: about 2.4 s of audio). Add 16 to --concurrency on a GPU.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import soundfile as sf  # noqa: E402

from bench import load, profile_stages  # noqa: E402
from bench.environment import describe_run, load_average  # noqa: E402
from bench.plots import plot_streaming_report  # noqa: E402
from bench.report import default_path, write_report  # noqa: E402

DEFAULT_TEXT = "今天天气很好。"
DEFAULT_PROMPT_TEXT = "这是提示音频里说的话。"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.streaming_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--seconds", default="5,20", help="audio lengths of the streaming-overhead part")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each mode per length")
    parser.add_argument("--concurrency", default="1,4,8", help="levels of the HTTP sweep")
    parser.add_argument("--requests", type=int, help="requests per level (default 2x concurrency, >= 4)")
    parser.add_argument("--text", action="append", help="text of the HTTP requests (repeat: used in turn)")
    parser.add_argument("--prompt-wav", type=Path, help="voice prompt (default: 5 s of synthetic sound)")
    parser.add_argument("--prompt-text", default=DEFAULT_PROMPT_TEXT)
    parser.add_argument("--skip-streaming", action="store_true", help="only the HTTP sweep")
    parser.add_argument("--streaming-from", type=Path,
                        help="take the in-process part from this earlier `profile_stages "
                             "--streaming-overhead` report of the same model instead of measuring it")
    parser.add_argument("--skip-load", action="store_true", help="only the in-process part")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    args.text = args.text or [DEFAULT_TEXT]
    return args


def streaming_part(args: argparse.Namespace, prompt_wav: Path) -> dict:
    profile_args = profile_stages.parse_args([
        "--model-dir", str(args.model_dir), "--device", args.device, "--dtype", args.dtype,
        "--streaming-overhead", "--seconds", args.seconds, "--repeats", str(args.repeats),
        "--prompt-wav", str(prompt_wav), "--prompt-text", args.prompt_text, "--concurrency", "0"])
    report = profile_stages.run(profile_args)
    gc.collect()   # the model goes before the server loads its own
    return report


def load_part(args: argparse.Namespace, prompt_wav: Path) -> dict:
    load_argv = ["--start-server", str(args.model_dir), "--server-defaults",
                 "--server-device", args.device, "--server-dtype", args.dtype,
                 "--api", "upstream-zero-shot", "--prompt-wav", str(prompt_wav),
                 "--prompt-text", args.prompt_text, "--concurrency", args.concurrency,
                 *(["--requests", str(args.requests)] if args.requests else [])]
    for text in args.text:
        load_argv += ["--text", text]
    return load.run(load.parse_args(load_argv))


def summarize(report: dict) -> dict:
    summary = {}
    if "streaming" in report:
        summary["streaming_overhead"] = {f"{length['non_streaming']['audio_s']:.1f}s": length["streaming_overhead"]
                                         for length in report["streaming"]["lengths"]}
    if "load" in report:
        levels = report["load"]["levels"]
        rates = {level["concurrency"]: level["throughput_audio_s_per_s"] for level in levels}
        lowest = min(rates)
        summary["throughput_audio_s_per_s"] = rates
        summary["throughput_over_lowest_level"] = {c: round(rate / rates[lowest], 2) if rates[lowest] else None
                                                   for c, rate in rates.items()}
        summary["first_chunk_ms_p50"] = {level["concurrency"]: level["first_chunk_ms"]["p50"] for level in levels}
        summary["failed_requests"] = sum(level["requests"] - level["ok"] for level in levels)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or default_path("streaming-report")
    report = {"kind": "streaming_report", "environment": describe_run(args.model_dir, {"name": args.device}),
              "settings": {"device": args.device, "dtype": args.dtype, "seconds": args.seconds,
                           "concurrency": args.concurrency, "texts": args.text,
                           "prompt_wav": str(args.prompt_wav) if args.prompt_wav else "synthetic 5 s"}}
    with tempfile.TemporaryDirectory(prefix="streaming-report-") as scratch:
        prompt_wav = args.prompt_wav
        if prompt_wav is None:
            prompt_wav = Path(scratch) / "prompt.wav"
            samples, rate = profile_stages.prompt_audio(None)
            sf.write(prompt_wav, samples, rate)
        if args.streaming_from:
            report["streaming"] = json.loads(args.streaming_from.read_text())
            report["streaming"]["taken_from"] = str(args.streaming_from)
        elif not args.skip_streaming:
            report["streaming"] = streaming_part(args, prompt_wav)
        if "streaming" in report:
            print(profile_stages.format_overhead_summary(report["streaming"]), flush=True)
        if not args.skip_load:
            report["load"] = load_part(args, prompt_wav)
    report["summary"] = summarize(report)
    report["load_average_end"] = load_average()
    png = write_report(report, out, plot_streaming_report)
    print(report["summary"])
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
