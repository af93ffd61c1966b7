"""The PNG of a gpu_check report: latency and speed per concurrency against the goals, LLM tokens/s
with and without CUDA graphs, and every checked error against its bound."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

GOAL_STYLE = dict(color="tab:red", linestyle="--", linewidth=1)


def plot_gpu_check(report: dict, path: Path) -> None:
    figure, axes = plt.subplots(2, 2, figsize=(14, 10))
    performance = {name: perf for name, perf in report.get("performance", {}).items()
                   if isinstance(perf, dict) and perf.get("streaming")}
    _latency(axes[0, 0], performance)
    _speed(axes[0, 1], performance)
    _llm(axes[1, 0], performance)
    _errors(axes[1, 1], report.get("checks", []))
    env = report["environment"]
    settings = report["settings"]
    commit = (env["git"]["commit"] or "no git")[:10]
    passed = "all checks passed" if report.get("passed") else "CHECKS FAILED"
    figure.suptitle(f"gpu_check{' (dry run)' if report.get('dry_run') else ''}: {passed} | "
                    f"{env['device']['name']} | {settings['dtype']}, {settings['tokens_per_request']} tokens "
                    f"per request | {commit} | {env['timestamp']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def _levels_axis(axis, levels: list[int]) -> None:
    axis.set_xlabel("concurrent requests")
    if levels:
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(c) for c in levels])
    axis.grid(alpha=0.3)


def _latency(axis, performance: dict) -> None:
    levels = set()
    for name, perf in performance.items():
        rows = perf["streaming"]
        x = [row["concurrency"] for row in rows]
        levels.update(x)
        for p, marker in (("p50", "o"), ("p95", "^")):
            axis.plot(x, [row["first_chunk_ms"][p] for row in rows], marker=marker, label=f"{name} {p}")
    for level, goal, alpha, text in ((1, 70, 1.0, "goal p50 c=1 (70 ms)"), (8, 300, 0.5, "goal p95 c=8 (300 ms)")):
        if level in levels:
            axis.plot([level], [goal], "v", color="tab:red", alpha=alpha, label=text)
    axis.set_ylabel("first audio chunk (ms)")
    axis.set_title("streaming first-chunk latency")
    _levels_axis(axis, sorted(levels))
    axis.legend(fontsize=8)


def _speed(axis, performance: dict) -> None:
    levels = set()
    for name, perf in performance.items():
        rows = perf["streaming"]
        x = [row["concurrency"] for row in rows]
        levels.update(x)
        axis.plot(x, [row["x_realtime"] for row in rows], marker="o", label=name)
    axis.axhline(50, label="goal at c=16 (50x)", **GOAL_STYLE)
    axis.set_ylabel("audio seconds per wall second (x realtime)")
    axis.set_title("aggregate speed")
    _levels_axis(axis, sorted(levels))
    axis.legend(fontsize=8)


def _llm(axis, performance: dict) -> None:
    levels = set()
    for name, perf in performance.items():
        measured = perf.get("llm_tokens_per_s", {})
        for backend, rows in measured.get("backends", {}).items():
            x = [row["concurrency"] for row in rows]
            levels.update(x)
            axis.plot(x, [row["tokens_per_s"] for row in rows], marker="o", label=f"{name} {backend}")
    axis.set_ylabel("speech tokens/s, summed over requests")
    axis.set_title("LLM stage, with and without CUDA graphs")
    _levels_axis(axis, sorted(levels))
    if levels:
        axis.legend(fontsize=8)


def _errors(axis, checks: list[dict]) -> None:
    """Each bounded error (value / bound, log scale): below 1 passes."""
    rows = [row for row in checks if isinstance(row.get("value"), (int, float)) and not isinstance(row["value"], bool)
            and isinstance(row.get("bound"), (int, float)) and not isinstance(row["bound"], bool)
            and row["bound"] > 0 and ("err" in row["name"] or "variation" in row["name"] or "diff" in row["name"])]
    if not rows:
        axis.set_axis_off()
        return
    ratios = [max(row["value"] / row["bound"], 1e-6) if math.isfinite(row["value"]) else 1e3 for row in rows]
    colors = ["tab:green" if row["result"] == "pass" else "tab:red" for row in rows]
    axis.barh(range(len(rows)), ratios, color=colors)
    axis.set_yticks(range(len(rows)), [row["name"][:70] for row in rows], fontsize=6)
    axis.invert_yaxis()
    axis.set_xscale("log")
    axis.axvline(1, **GOAL_STYLE)
    axis.set_xlabel("error / bound (pass below 1)")
    axis.set_title("parity errors")
