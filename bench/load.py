"""HTTP load generator for TTS servers: a concurrency sweep, one JSON report and one PNG plot.

    python -m bench.load --url http://127.0.0.1:6006 --api native --voice demo --concurrency 1,2,4,8
    python -m bench.load --start-server models/demo-tiny --voice demo --concurrency 1,2,4,8
    python -m bench.load --url http://host:50000 --api upstream-sft --voice 中文女 --sample-rate 24000

Each level runs `concurrency` clients back to back, for --requests requests (default twice the
concurrency, at least 4) or for --duration seconds. Every request gets its own seed ({seed}
counts up from --seed), so a response cache never answers. See bench/README.md for the report.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys
import threading
from pathlib import Path

if __package__ in (None, ""):   # run as `python bench/load.py`: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from bench.endpoints import BODY_KINDS, PRESETS, Endpoint, customised, preset, request_options  # noqa: E402
from bench.environment import cpu_model, describe_run, gpu_names, load_average  # noqa: E402
from bench.http_runner import BenchSetupError, run_level, send  # noqa: E402
from bench.plots import plot_load  # noqa: E402
from bench.report import default_path, write_report  # noqa: E402
from bench.server_process import local_server  # noqa: E402

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog, then runs back home before dark."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_argument_group("target")
    target.add_argument("--url", default="http://127.0.0.1:6006", help="server base URL")
    target.add_argument("--api", choices=sorted(PRESETS), default="native", help="request preset")
    target.add_argument("--method", help="override the preset's HTTP method")
    target.add_argument("--path", help="override the preset's path")
    target.add_argument("--body", choices=BODY_KINDS, help="override the body kind")
    target.add_argument("--field", action="append", default=[], metavar="NAME=TEMPLATE",
                        help="add or replace a body field; templates: {text} {voice} {seed} {index} "
                             "{prompt_text} {instruct}")
    target.add_argument("--json", dest="json_body", metavar="OBJECT", help="the whole JSON body template")
    target.add_argument("--file", action="append", default=[], metavar="FIELD=PATH",
                        help="upload a file in a multipart field with every request")
    target.add_argument("--prompt-wav", type=Path, help="same as --file prompt_wav=PATH")
    target.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'")
    target.add_argument("--sample-rate", type=int,
                        help="PCM rate of the responses (default: the X-Sample-Rate header)")
    values = parser.add_argument_group("request values")
    values.add_argument("--text", action="append", help="text to speak (repeat: used in turn)")
    values.add_argument("--voice", default="default", help="voice/speaker name ({voice})")
    values.add_argument("--prompt-text", default="", help="{prompt_text}")
    values.add_argument("--instruct", default="", help="{instruct}")
    values.add_argument("--seed", type=int, default=1000, help="seed of the first request")
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--concurrency", default="1,2,4,8", help="comma-separated levels")
    amount = sweep.add_mutually_exclusive_group()
    amount.add_argument("--requests", type=int, help="requests per level (default 2x concurrency, >= 4)")
    amount.add_argument("--duration", type=float, help="seconds per level")
    sweep.add_argument("--warmup", type=int, default=1, help="unrecorded requests first")
    sweep.add_argument("--timeout", type=float, default=300, help="seconds per request")
    server = parser.add_argument_group("local server (--start-server)")
    server.add_argument("--start-server", type=Path, metavar="MODEL_DIR",
                        help="run server.py on 127.0.0.1 with this model for the sweep")
    server.add_argument("--server-device", help="its --device (default cpu); for a remote server, "
                                                "what it runs on (recorded only)")
    server.add_argument("--server-dtype", default="float32")
    server.add_argument("--server-workers", type=int, help="default: the highest concurrency")
    server.add_argument("--server-defaults", action="store_true",
                        help="start it with its default admission settings (workers, queue), as "
                             "deployed; --server-workers and the queue of the highest level are not passed")
    server.add_argument("--voices-dir", type=Path, help="its --voices-dir (default: an empty one)")
    server.add_argument("--ready-timeout", type=float, default=600)
    parser.add_argument("--model-dir", type=Path, help="model the remote server runs (recorded only)")
    parser.add_argument("--out", type=Path, help="report path (default bench/results/load-<time>.json)")
    args = parser.parse_args(argv)
    args.levels = [int(level) for level in args.concurrency.split(",")]
    if not args.levels or min(args.levels) < 1:
        parser.error("--concurrency needs levels of at least 1")
    args.text = args.text or [DEFAULT_TEXT]
    return args


def build_endpoint(args: argparse.Namespace) -> Endpoint:
    files = [*args.file, *([f"prompt_wav={args.prompt_wav}"] if args.prompt_wav else [])]
    return customised(preset(args.api), method=args.method, path=args.path, body=args.body,
                      fields=args.field, json_body=args.json_body, files=files)


def parse_headers(items: list[str]) -> dict[str, str]:
    headers = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep:
            raise ValueError(f"--header {item!r}: expected 'Name: value'")
        headers[name.strip()] = value.strip()
    return headers


def device_block(args: argparse.Namespace) -> dict:
    device = args.server_device or ("cpu" if args.start_server else "unknown")
    gpus = gpu_names()
    if device.startswith("cuda") and gpus:
        name = gpus[0]
    elif device == "cpu":
        name = f"cpu ({cpu_model()})"
    else:
        name = device
    return {"name": name, "server_device": device, "server_dtype": args.server_dtype,
            "gpus_on_this_machine": gpus}


async def sweep(args: argparse.Namespace, url: str, endpoint: Endpoint) -> list[dict]:
    uploads = {name: path.read_bytes() for name, path in endpoint.files.items()}
    request_index = itertools.count()

    def make_values() -> dict:
        index = next(request_index)
        return {"text": args.text[index % len(args.text)], "voice": args.voice, "seed": args.seed + index,
                "index": index, "prompt_text": args.prompt_text, "instruct": args.instruct}

    request_options(endpoint, make_values(), uploads)   # a template error shows before any request
    limits = httpx.Limits(max_connections=max(args.levels), max_keepalive_connections=max(args.levels))
    async with httpx.AsyncClient(base_url=url, headers=parse_headers(args.header), limits=limits,
                                 timeout=args.timeout) as client:
        def send_one(values: dict):
            return send(client, endpoint, values, uploads, args.sample_rate)

        for _ in range(args.warmup):
            outcome = await send_one(make_values())
            if not outcome.ok:
                raise BenchSetupError(f"the warm-up request failed ({outcome.status}): {outcome.detail}")
        levels = []
        batches = await scrape_batch_sizes(client)
        for concurrency in args.levels:
            requests = None if args.duration else (args.requests or max(4, 2 * concurrency))
            level = await run_level(concurrency, requests, args.duration, make_values, send_one)
            after = await scrape_batch_sizes(client)
            if after is not None and batches is not None:   # runs of this level: the counts' increase
                level["batch_sizes"] = {stage: _increase(counts, batches.get(stage, {}))
                                        for stage, counts in after.items()}
            batches = after
            print(format_level(level), flush=True)
            levels.append(level)
        return levels


BATCH_METRICS = {"llm": "cosyvoice_llm_batch_size", "flow": "cosyvoice_flow_batch_size"}


async def scrape_batch_sizes(client: httpx.AsyncClient) -> dict[str, dict[int, int]] | None:
    """The server's batch-size histograms from /metrics ({stage: {batch size: runs}}, stages our
    server batches), or None where there is no such endpoint (another server)."""
    try:
        response = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return parse_batch_sizes(response.text)


def parse_batch_sizes(text: str) -> dict[str, dict[int, int]]:
    """Prometheus histogram buckets (cumulative, le = batch size) -> runs per batch size."""
    found = {}
    for stage, metric in BATCH_METRICS.items():
        cumulative = []
        for line in text.splitlines():
            if line.startswith(f"{metric}_bucket{{") and 'le="+Inf"' not in line:
                bound = line.split('le="', 1)[1].split('"', 1)[0]
                cumulative.append((int(float(bound)), float(line.rsplit(" ", 1)[1])))
        if cumulative:
            cumulative.sort()
            counts, previous = {}, 0.0
            for size, total in cumulative:
                counts[size] = int(total - previous)
                previous = total
            found[stage] = counts
    return found


def _increase(after: dict[int, int], before: dict[int, int]) -> dict[int, int]:
    return {size: runs - before.get(size, 0) for size, runs in after.items() if runs - before.get(size, 0)}


def format_level(level: dict) -> str:
    first, rtf = level["first_chunk_ms"], level["rtf"]
    return (f"concurrency {level['concurrency']:>3}: {level['ok']}/{level['requests']} ok, "
            f"first chunk p50 {first['p50']} ms p90 {first['p90']} ms, RTF p50 {rtf['p50']}, "
            f"throughput {level['throughput_audio_s_per_s']} audio s/s, errors {level['errors'] or 'none'}")


def run(args: argparse.Namespace) -> dict:
    endpoint = build_endpoint(args)
    model_dir = args.start_server or args.model_dir
    report = {"kind": "http_load", "environment": describe_run(model_dir, device_block(args))}

    def measure(url: str) -> list[dict]:
        report["target"] = {"url": url, "api": args.api, "method": endpoint.method, "path": endpoint.path,
                            "body": endpoint.body, "fields": endpoint.fields,
                            "files": {name: str(path) for name, path in endpoint.files.items()}}
        return asyncio.run(sweep(args, url, endpoint))

    if args.start_server:
        if args.server_defaults:
            workers = max_queue = None
        else:
            workers, max_queue = args.server_workers or max(args.levels), max(args.levels)
        with local_server(args.start_server, workers=workers, max_queue=max_queue,
                          device=args.server_device or "cpu", dtype=args.server_dtype,
                          voices_dir=args.voices_dir, ready_timeout_s=args.ready_timeout) as url:
            report["server"] = {"started_here": True, "workers": workers or "server default",
                                "max_queue": max_queue if max_queue is not None else "server default"}
            levels = measure(url)
    else:
        report["server"] = {"started_here": False}
        levels = measure(args.url)
    report["settings"] = {"concurrency": args.levels,
                          # a --duration run counts no requests: only duration_s_per_level is set
                          "requests_per_level": None if args.duration else (
                              args.requests or "2x concurrency, at least 4"),
                          "duration_s_per_level": args.duration, "warmup": args.warmup,
                          "texts": args.text, "voice": args.voice, "first_seed": args.seed,
                          "sample_rate": args.sample_rate}
    report["levels"] = levels
    report["load_average_end"] = load_average()
    return report


def stop_on_sigterm(signum, frame) -> None:
    """SIGTERM unwinds like Ctrl-C, so a server started here is stopped too."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or default_path("load")
    if args.start_server and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        report = run(args)
    except (BenchSetupError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    png = write_report(report, out, plot_load)
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
