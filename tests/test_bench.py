"""The benchmark tools: the load generator against real servers on 127.0.0.1 (the shared test
server, and one it starts itself) and the stage profiler, on the tiny fixture model with a few
requests and a small forced token count. Reports are checked for their documented keys and
sane values; wall-clock times are never asserted."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server_harness import API_KEY, REPO_ROOT, prompt_files

sys.path.insert(0, str(REPO_ROOT))   # `bench` is not installed: import it from the checkout
from bench.llm_concurrency import steady_decode_rate  # noqa: E402
from bench.load import main as load_main  # noqa: E402
from bench.stage_timers import ForcedLength  # noqa: E402
from bench.stats import summary  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_TIMEOUT_S = 400
PERCENTILE_KEYS = {"n", "mean", "min", "max", "p50", "p90", "p99"}
LEVEL_KEYS = {"concurrency", "requests", "ok", "errors", "error_samples", "wall_s", "audio_s_total",
              "throughput_audio_s_per_s", "requests_per_s", "first_chunk_ms", "total_ms", "audio_s", "rtf"}


def read_report(path: Path) -> dict:
    assert path.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)
    return json.loads(path.read_text(encoding="utf-8"))


def check_environment(report: dict, model_dir: Path) -> None:
    env = report["environment"]
    assert env["machine"]["cores"] >= 1 and env["machine"]["cpu_model"]
    assert len(env["load_average_start"]) == 3 and len(report["load_average_end"]) == 3
    assert env["model"]["path"] == str(model_dir.resolve()) and env["model"]["size_class"] == "reduced"
    assert env["device"]["name"] and env["timestamp"]
    assert set(env["git"]) == {"commit", "dirty"}


def check_levels(report: dict, concurrency: list[int]) -> None:
    assert [level["concurrency"] for level in report["levels"]] == concurrency
    for level in report["levels"]:
        assert LEVEL_KEYS <= set(level)
        assert level["ok"] == level["requests"] >= 2 and level["errors"] == {}
        for key in ("first_chunk_ms", "total_ms", "audio_s", "rtf"):
            assert set(level[key]) == PERCENTILE_KEYS and level[key]["n"] == level["ok"]
            assert 0 < level[key]["p50"] <= level[key]["p99"] <= level[key]["max"]
        assert level["first_chunk_ms"]["max"] <= level["total_ms"]["max"]
        assert level["audio_s_total"] > 0 and level["throughput_audio_s_per_s"] > 0


def test_load_sweep_against_a_running_server(server, model_dir, tmp_path):
    out = tmp_path / "load.json"
    status = load_main(["--url", server.url, "--api", "openai", "--header", f"X-API-Key: {API_KEY}",
                        "--voice", "alice", "--text", "Hello there.", "--concurrency", "1,2",
                        "--requests", "2", "--model-dir", str(model_dir), "--out", str(out)])
    assert status == 0
    report = read_report(out)
    check_environment(report, model_dir)
    check_levels(report, [1, 2])
    assert report["target"]["path"] == "/v1/audio/speech" and report["server"]["started_here"] is False
    for level in report["levels"]:   # the LLM's batch sizes from /metrics: every request decoded
        steps = level["batch_sizes"]["llm"]
        assert steps and all(int(size) >= 1 and runs > 0 for size, runs in steps.items())


def test_a_duration_run_records_no_request_count(server, tmp_path):
    out = tmp_path / "duration.json"
    status = load_main(["--url", server.url, "--header", f"X-API-Key: {API_KEY}", "--voice", "alice",
                        "--text", "Hi.", "--warmup", "0", "--concurrency", "1", "--duration", "1",
                        "--out", str(out)])
    assert status == 0
    settings = read_report(out)["settings"]
    assert settings["requests_per_level"] is None and settings["duration_s_per_level"] == 1


def test_failed_requests_are_counted_by_status(server, tmp_path):
    out = tmp_path / "errors.json"
    status = load_main(["--url", server.url, "--header", f"X-API-Key: {API_KEY}", "--voice", "nobody",
                        "--warmup", "0", "--concurrency", "2", "--requests", "3", "--out", str(out)])
    assert status == 0
    level = read_report(out)["levels"][0]
    assert level["ok"] == 0 and level["errors"] == {"400": 3}
    assert "nobody" in level["error_samples"][0] and level["rtf"]["p50"] is None


def test_a_failed_warm_up_stops_the_run(server, tmp_path, capsys):
    status = load_main(["--url", server.url, "--header", f"X-API-Key: {API_KEY}", "--voice", "nobody",
                        "--concurrency", "1", "--out", str(tmp_path / "never.json")])
    assert status == 2 and "warm-up request failed (400)" in capsys.readouterr().err
    assert not (tmp_path / "never.json").exists()


def test_load_starts_and_stops_its_own_server(model_dir, fixture_dir, tmp_path):
    voices = tmp_path / "voices"
    voices.mkdir()
    prompt_wav, transcript = prompt_files(fixture_dir)
    shutil.copy(prompt_wav, voices / f"[alice]{transcript}.wav")
    out = tmp_path / "own.json"
    result = subprocess.run([sys.executable, "-m", "bench.load", "--start-server", str(model_dir),
                             "--voices-dir", str(voices), "--voice", "alice", "--text", "Hi.",
                             "--api", "upstream-zero-shot", "--concurrency", "1,2", "--requests", "2",
                             "--out", str(out)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_report(out)
    check_environment(report, model_dir)
    check_levels(report, [1, 2])
    assert report["server"] == {"started_here": True, "workers": 2, "max_queue": 2}
    assert report["target"]["url"].startswith("http://127.0.0.1:")


def test_profiler_on_the_tiny_model(model_dir, tmp_path):
    out = tmp_path / "profile.json"
    tokens = 30
    result = subprocess.run([sys.executable, "bench/profile_stages.py", "--model-dir", str(model_dir),
                             "--tokens", str(tokens), "--repeats", "1", "--concurrency", "2",
                             "--out", str(out)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_report(out)
    check_environment(report, model_dir)
    assert report["settings"]["tokens"] == tokens and report["settings"]["device"] == "cpu"
    frontend, llm, streaming = report["frontend"], report["llm"], report["streaming"]
    assert frontend["prompt_features_ms"] > 0 and frontend["prompt_speech_tokens"] > 0
    assert llm["decode_tokens"] == tokens and llm["decode_tokens_per_s"] > 0
    assert llm["prefill_positions"] > tokens // 2 and llm["prefill_ms"]["p50"] > 0
    assert streaming["chunks"] >= 2 and streaming["audio_s"] > 0 and streaming["rtf"] > 0
    assert 0 < streaming["first_chunk_ms"] <= streaming["total_ms"]
    for stage, size in (("flow", "tokens"), ("vocoder", "mel_frames")):
        calls = report[stage]["calls"]
        assert len(calls) >= streaming["chunks"] - 1 and all(c["ms"] > 0 and c[size] > 0 for c in calls)
    assert report["flow"]["calls"][-1]["tokens"] == tokens   # the final call renders every token
    concurrency = report["llm_concurrency"]
    assert concurrency["levels"] == [1, 2] and set(concurrency["backends"]) == {"torch", "torch-serial"}
    for rows in concurrency["backends"].values():
        assert [row["tokens_total"] for row in rows] == [tokens, 2 * tokens]
        assert all(row["tokens_per_s"] > 0 for row in rows)
    assert all(ratio > 0 for ratio in concurrency["scaling"].values())


def test_streaming_overhead_on_the_tiny_model(model_dir, tmp_path):
    out = tmp_path / "overhead.json"
    result = subprocess.run([sys.executable, "-m", "bench.profile_stages", "--model-dir", str(model_dir),
                             "--streaming-overhead", "--seconds", "4", "--repeats", "1", "--out", str(out)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_report(out)
    check_environment(report, model_dir)
    length = report["lengths"][0]
    assert report["kind"] == "streaming_overhead" and report["settings"]["carried_state"] is True
    assert length["tokens"] == 100 and report["streaming_overhead"] == length["streaming_overhead"] > 0
    stream, whole = length["streaming"], length["non_streaming"]
    assert stream["chunks"] >= 3 and whole["chunks"] == 1 and stream["audio_s"] == whole["audio_s"] == 4.0
    flow, prompt = length["streaming_calls"]["flow"], length["prompt_tokens"]
    # two carried chunks of new frames only (the voice prompt's state was computed before), the
    # final call over everything
    assert length["voice_prompt_state_s"] > 0 and len(flow) == 3
    assert flow[-1]["frames_computed"] == 2 * (length["tokens"] + prompt)
    prompt_pad = -prompt % 25   # aligns the first chunk's end with an attention chunk
    held_prompt = (prompt - 3) // 25 * 25
    assert [call["frames_computed"] for call in flow[:-1]] == [2 * (prompt + prompt_pad + 25 - held_prompt), 2 * 50]


def test_batch_sizes_are_read_from_prometheus_buckets():
    from bench.load import parse_batch_sizes
    text = ('cosyvoice_llm_batch_size_bucket{le="1.0"} 4.0\ncosyvoice_llm_batch_size_bucket{le="2.0"} 4.0\n'
            'cosyvoice_llm_batch_size_bucket{le="3.0"} 10.0\ncosyvoice_llm_batch_size_bucket{le="+Inf"} 10.0\n'
            'cosyvoice_llm_batch_size_count 10.0\n')
    assert parse_batch_sizes(text) == {"llm": {1: 4, 2: 0, 3: 6}}


def test_forced_length_never_stops_early_and_always_stops_on_time():
    speech_tokens = 10
    logp = torch.full((speech_tokens + 3,), -10.0)
    logp[speech_tokens] = 0.0                                  # EOS is by far the likeliest
    forced = ForcedLength(lambda lp, decoded, generator=None: int(lp.argmax()), 3, speech_tokens)
    assert [forced(logp, [0] * n) < speech_tokens for n in range(3)] == [True] * 3
    assert forced(logp, [0] * 3) == speech_tokens
    assert logp[speech_tokens] == 0.0                          # the caller's logp is left alone


def test_forced_length_check_says_the_text_is_too_short():
    forced = ForcedLength(lambda lp, decoded, generator=None: 0, 3, 10)
    forced.check([3, 3])
    with pytest.raises(RuntimeError, match="too short for --tokens"):
        forced.check([3, 2])


def test_steady_decode_rate_counts_only_the_overlap():
    arrivals = [[0.0, 1.0, 2.0, 3.0, 4.0], [2.0, 2.5, 3.0, 3.5, 5.0]]
    # all decode in (2, 4]: 3.0 and 4.0 of the first, 2.5, 3.0 and 3.5 of the second
    assert steady_decode_rate(arrivals) == pytest.approx(5 / 2)
    assert steady_decode_rate([[0.0, 1.0], [2.0, 3.0]]) is None


def test_summary_of_nothing_has_no_statistics():
    assert summary([])["p50"] is None and summary([])["n"] == 0
    stats = summary([1.0, 2.0, 3.0, 4.0])
    assert stats["p50"] == 2.5 and stats["max"] == 4.0 and not math.isnan(stats["p99"])
