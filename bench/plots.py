"""PNG plots of the reports (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _title(report: dict) -> str:
    env = report["environment"]
    model = env["model"]
    model_text = f"{Path(model['path']).name} ({model['size_class']}, {model['size_mb']} MB)" if model else "model ?"
    machine = f"{env['machine']['cpu_model']} x{env['machine']['cores']}"
    commit = (env["git"]["commit"] or "no git")[:10]
    return f"{model_text} on {env['device']['name']} | {machine} | {commit} | {env['timestamp']}"


def _percentile_lines(axis, levels: list[dict], key: str, label: str) -> None:
    x = [level["concurrency"] for level in levels]
    for p in ("p50", "p90", "p99"):
        axis.plot(x, [level[key][p] for level in levels], marker="o", label=p)
    axis.set_xlabel("concurrency")
    axis.set_ylabel(label)
    axis.set_xscale("log", base=2)
    axis.set_xticks(x, [str(c) for c in x])
    axis.grid(alpha=0.3)
    axis.legend()


def plot_load(report: dict, path: Path) -> None:
    levels = report["levels"]
    x = [level["concurrency"] for level in levels]
    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    _percentile_lines(axes[0, 0], levels, "first_chunk_ms", "first audio byte (ms)")
    _percentile_lines(axes[0, 1], levels, "rtf", "RTF per request (lower is faster)")
    throughput = axes[1, 0]
    throughput.plot(x, [level["throughput_audio_s_per_s"] for level in levels], marker="o")
    throughput.set_xlabel("concurrency")
    throughput.set_ylabel("audio seconds per wall second")
    throughput.set_xscale("log", base=2)
    throughput.set_xticks(x, [str(c) for c in x])
    throughput.grid(alpha=0.3)
    errors = axes[1, 1]
    failed = [level["requests"] - level["ok"] for level in levels]
    errors.bar([str(c) for c in x], failed, color="tab:red")
    errors.set_ylim(0, max(1, *failed))
    errors.set_xlabel("concurrency")
    errors.set_ylabel("failed requests")
    figure.suptitle(f"{report['target']['api']} {report['target']['url']}\n{_title(report)}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def plot_profile(report: dict, path: Path) -> None:
    panels = 3 if report.get("llm_concurrency") else 2
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 5))
    stages = {
        "prompt features": report["frontend"]["prompt_features_ms"],
        "text frontend": report["frontend"]["text_ms"],
        "LLM prefill": report["llm"]["prefill_ms"]["p50"],
        "LLM decode x10 tokens": 10 * report["llm"]["decode_ms_per_token"],
        "flow chunk 0": report["flow"]["calls"][0]["ms"],
        "vocoder chunk 0": report["vocoder"]["calls"][0]["ms"],
        "first chunk": report["streaming"]["first_chunk_ms"],
    }
    axes[0].barh(list(stages), list(stages.values()))
    axes[0].invert_yaxis()
    axes[0].set_xlabel("ms")
    axes[0].set_title("stage times (streaming, median where repeated)")
    chunks = axes[1]
    chunks.plot([c["ms"] for c in report["flow"]["calls"]], marker="o", label="flow")
    chunks.plot([c["ms"] for c in report["vocoder"]["calls"]], marker="o", label="vocoder")
    chunks.xaxis.set_major_locator(MaxNLocator(integer=True))
    chunks.set_xlabel("chunk")
    chunks.set_ylabel("ms")
    chunks.set_title("per chunk (the flow recomputes all tokens so far)")
    chunks.grid(alpha=0.3)
    chunks.legend()
    if panels == 3:
        _plot_concurrency(axes[2], report["llm_concurrency"])
    settings = report["settings"]
    figure.suptitle(f"{settings['device']} {settings['dtype']}, {settings['tokens']} forced tokens\n"
                    f"{_title(report)}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def _plot_concurrency(axis, measured: dict) -> None:
    backends = list(measured["backends"])
    levels = [row["concurrency"] for row in measured["backends"][backends[0]]]
    width = 0.8 / len(backends)
    for index, backend in enumerate(backends):
        rows = measured["backends"][backend]
        positions = [i + index * width for i in range(len(levels))]
        axis.bar(positions, [row["tokens_per_s"] for row in rows], width,
                 label=f"{backend}, prefills included")
        axis.plot(positions, [row["decode_tokens_per_s"] for row in rows], "k_", markersize=20,
                  label="while all decode" if index == 0 else None)
    axis.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(levels))],
                    [f"concurrency {c}" for c in levels])
    axis.set_ylabel("speech tokens/s, summed over requests")
    axis.set_title(f"LLM stage, {measured['tokens_per_request']} tokens per request")
    axis.legend()


def plot_streaming_overhead(report: dict, path: Path) -> None:
    """Per length: streaming vs non-streaming compute per audio second; per flow call of the
    longest streaming run: frames computed and milliseconds."""
    lengths = report["lengths"]
    figure, axes = plt.subplots(1, 2, figsize=(12, 5))
    _plot_streaming_vs_not(axes[0], lengths)
    calls = lengths[-1]["streaming_calls"]
    flow = calls.get("flow", [])
    axes[1].bar(range(len(flow)), [c["ms"] / 1000 for c in flow], label="flow s")
    axes[1].plot(range(len(flow)), [c["frames_computed"] / 100 for c in flow], "k.-",
                 label="flow frames computed / 100")
    axes[1].plot(range(len(calls.get("vocoder", []))), [c["ms"] / 1000 for c in calls.get("vocoder", [])],
                 "r.-", label="vocoder s")
    axes[1].set_xlabel("call (last: final, full attention)")
    axes[1].set_title(f"streaming calls, {lengths[-1]['non_streaming']['audio_s']:.1f} s of audio")
    axes[1].legend()
    axes[1].grid(alpha=0.3)
    settings = report["settings"]
    figure.suptitle(f"{settings['generation']} {settings['device']} {settings['dtype']}, carried state "
                    f"{settings['carried_state']}\n{_title(report)}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def plot_streaming_report(report: dict, path: Path) -> None:
    """Streaming vs not per length; throughput and first audio per concurrency; batch sizes."""
    streaming, loaded = report.get("streaming"), report.get("load")
    figure, axes = plt.subplots(1, 3, figsize=(16, 5))
    if streaming:
        _plot_streaming_vs_not(axes[0], streaming["lengths"])
    if loaded:
        levels = loaded["levels"]
        x = [level["concurrency"] for level in levels]
        axes[1].plot(x, [level["throughput_audio_s_per_s"] for level in levels], "o-", label="audio s per s")
        twin = axes[1].twinx()
        twin.plot(x, [level["first_chunk_ms"]["p50"] for level in levels], "s--", color="tab:orange",
                  label="first audio p50 (ms)")
        twin.set_ylabel("first audio byte p50 (ms)")
        axes[1].set_xlabel("concurrency")
        axes[1].set_ylabel("aggregate audio seconds per second")
        axes[1].set_xscale("log", base=2)
        axes[1].set_xticks(x, [str(c) for c in x])
        axes[1].set_title("HTTP sweep, default server settings")
        axes[1].grid(alpha=0.3)
        width = 0.8 / max(1, len(levels))
        for index, level in enumerate(levels):
            llm = level.get("batch_sizes", {}).get("llm", {})
            if llm:
                sizes = sorted(int(size) for size in llm)
                axes[2].bar([s + index * width for s in sizes], [llm[size] if size in llm else llm[str(size)]
                                                                  for size in sizes], width,
                            label=f"LLM steps, concurrency {level['concurrency']}")
        axes[2].set_xlabel("requests per batched LLM decode step")
        axes[2].set_ylabel("steps")
        axes[2].set_title("LLM batch sizes per level (/metrics)")
        axes[2].legend(fontsize=8)
    figure.suptitle(_title(report), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def _plot_streaming_vs_not(axis, lengths: list[dict]) -> None:
    """Per length of a streaming-overhead report: compute per audio second of each mode, the
    streaming bar labelled with streaming_overhead and the first chunk's time."""
    positions = range(len(lengths))
    for offset, mode in ((-0.2, "non_streaming"), (0.2, "streaming")):
        axis.bar([p + offset for p in positions], [length[mode]["compute_s_per_audio_s"] for length in lengths],
                 0.4, label=mode.replace("_", "-"))
    for p, length in zip(positions, lengths):
        streamed = length["streaming"]
        axis.annotate(f"x{length['streaming_overhead']}\nfirst chunk {streamed['first_chunk_ms']['p50']:.0f} ms",
                      (p + 0.2, streamed["compute_s_per_audio_s"]), ha="center", va="bottom", fontsize=8)
    axis.set_xticks(list(positions), [f"{length['non_streaming']['audio_s']:.1f} s" for length in lengths])
    axis.set_ylabel("token-to-waveform compute s per audio s")
    axis.set_title("streaming vs not (label: streaming_overhead)")
    axis.legend()
