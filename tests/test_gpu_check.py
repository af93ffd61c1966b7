"""bench.gpu_check, the one-call GPU verification: its dry mode end to end (CPU, tiny models: the
same code as the GPU run, which CI cannot do), and each step that only a GPU run would otherwise
reach (a second device, the part in a child process, the background builds, the missing-module
stop, the goals) on the CPU. Wall-clock numbers are never asserted."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))   # `bench` is not installed: import it from the checkout
from bench import cuda_checks, gpu_check  # noqa: E402
from bench.cuda_checks import Checks  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DRY_TIMEOUT_S = 600
STAGES = {"llm_total_variation", "flow_final_rel", "flow_streaming_rel"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run, as CI runs it: (exit status, report, printed output, seconds)."""
    out = tmp_path_factory.mktemp("gpu-check")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry", "--out", str(out),
                             "--workdir", str(out / "models")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=DRY_TIMEOUT_S)
    seconds = time.monotonic() - started
    print(f"[gpu_check] dry run: {seconds:.1f} s")
    report_path = out / "gpu-check.json"
    assert report_path.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "gpu-check.png").read_bytes().startswith(PNG_MAGIC)
    return result.returncode, json.loads(report_path.read_text(encoding="utf-8")), result.stdout, seconds


def test_dry_run_passes_every_check(dry_run):
    code, report, stdout, _ = dry_run
    failed = [row for row in report["checks"] if row["result"] == "FAIL"]
    assert code == 0 and report["passed"] and not failed, failed
    assert report["kind"] == "gpu_check" and report["dry_run"] is True
    assert report["settings"]["device"] == "cpu" and report["settings"]["isolated_parts"] is False
    assert "checks: 0 failed" in stdout and "wrote" in stdout
    skipped = [row["name"] for row in report["checks"] if row["result"] == "skipped"]
    assert skipped == ["cv3 tiny second device"]      # no second device on a CPU run
    assert report["environment"]["device"]["module_versions"]["torch"] == torch.__version__


def test_dry_run_checks_every_stage_of_both_generations(dry_run):
    report = dry_run[1]
    assert set(report["parity"]) == {"cosyvoice2", "cosyvoice3"}
    for generation, parity in report["parity"].items():
        errors = parity["stage_errors"]
        assert set(errors) == {"cpu_fp32_vs_cpu", "float16_vs_fp32", "bfloat16_vs_fp32"}, generation
        for name in ("float16_vs_fp32", "bfloat16_vs_fp32"):
            assert STAGES <= set(errors[name]) and errors[name]["hift_from_half_mel_finite"] is True
            assert 0 < errors[name]["flow_final_rel"] < errors[name]["flow_bound_rel"]
        assert set(parity["decode_graphs"]) == {"float32", "bfloat16"}
        assert parity["decode_graphs"]["float32"]["graphs"] == 0          # no graphs without a GPU
        assert parity["batched_tokens"]["static"]["identical"] == 3
        assert parity["batched_tokens"]["static"]["step_sizes"][-1] == 3   # the three requests shared steps
        assert set(parity["flow_batching"]) == {"float32", "bfloat16"}
        assert parity["streaming_output_bfloat16"]["finite"] is True
        assert not any("error" in value for value in parity.values() if isinstance(value, dict))
    names = [row["name"] for row in report["checks"]]
    for label in ("cv2 tiny", "cv3 tiny"):
        for part in ("llm total variation", "flow final mel", "hift audio", "decode step static vs eager",
                     "batched greedy tokens (static)", "flow batch of 4 vs solo", "streaming synthesis"):
            assert any(name.startswith(label) and part in name for name in names), (label, part)


def test_dry_run_measures_performance_at_each_level(dry_run):
    report = dry_run[1]
    levels = report["settings"]["levels"]
    assert levels == [1, 2]
    for generation, perf in report["performance"].items():
        assert perf["model"]["size_class"] == "reduced" and perf["dtype"] == "bfloat16"
        assert [level["concurrency"] for level in perf["streaming"]] == levels
        for level in perf["streaming"]:
            assert level["requests"] >= 2 and level["nonfinite_chunks"] == 0
            assert 0 < level["first_chunk_ms"]["p50"] <= level["first_chunk_ms"]["p95"] <= level["total_ms"]["max"]
            assert level["x_realtime"] > 0 and level["audio_s_total"] > 0
        llm = perf["llm_tokens_per_s"]
        assert set(llm["backends"]) == {"cuda_graphs", "eager"} and llm["graphs"] == 0
        assert [row["concurrency"] for row in llm["backends"]["cuda_graphs"]] == levels
        assert all(row["tokens_per_s"] > 0 for rows in llm["backends"].values() for row in rows)
        assert "peak_rss_gib" in perf["memory_peak"]
    goals = report["goals"]
    assert len(goals) == 6 and all(goal["met"] is None for goal in goals)   # dry: sizes are not the GPU's
    assert report["elapsed_s"] < report["settings"]["budget_s"]


def test_isolated_part_in_a_child_process(tmp_path):
    """The GPU run's way of running a part (its own process, result handed back in a file)."""
    from cosyvoice.tools.make_model import make_model

    model = make_model(tmp_path / "cv3-tiny", size="tiny", generation="3")
    mode = gpu_check.mode_of(gpu_check.parse_args(["--dry", "--out", str(tmp_path)]))
    spec = {"kind": "second_device", "generation": "3", "model_dir": str(model), "device": "cpu",
            "mode": {**mode.__dict__, "levels": list(mode.levels)}, "flow_batch": None}
    checks = Checks()
    result = gpu_check.run_isolated(spec, checks, gpu_check.Budget(120), "second_device cv3 tiny")
    assert result == {"skipped": "not a GPU run"}
    assert [(row.name, row.passed) for row in checks.rows] == [("cv3 tiny second device", None)]
    spec["kind"] = "no-such-part"
    result = gpu_check.run_isolated(spec, checks, gpu_check.Budget(120), "broken")
    assert "error" in result and checks.rows[-1].passed is False and "no-such-part" in checks.rows[-1].detail


def test_second_device_compares_two_placements(tmp_path):
    """The cuda:1 check on two CPU placements: same audio, the check rows it writes."""
    import cosyvoice
    from cosyvoice.tools.make_model import make_model

    model = make_model(tmp_path / "cv3-tiny", size="tiny", generation="3")
    request = gpu_check.parity_inputs(model).request
    checks = Checks()
    cpu = torch.device("cpu")
    report = cuda_checks.second_device(lambda d: cosyvoice.load(model, device=d), request, cpu, cpu, checks, "cv3")
    assert report["audio_rel_err"] == 0 and report["chunks"] >= 2
    assert [row.passed for row in checks.rows] == [True]


def test_divergence_reports_where_tokens_part_and_the_gap(model_dir):
    from cosyvoice.loading.model_dir import load_stage

    llm = load_stage(model_dir, "llm")
    request = gpu_check.parity_inputs(model_dir).request
    expected = [int(t) for t in torch.randint(0, llm.speech_token_size, (6,), generator=torch.Generator().manual_seed(0))]
    assert cuda_checks.divergence(llm, request, expected, list(expected)) is None
    changed = expected[:3] + [(expected[3] + 1) % llm.speech_token_size] + expected[4:]
    found = cuda_checks.divergence(llm, request, expected, changed)
    assert found["index"] == 3 and found["solo_token"] == expected[3] and found["gap"] >= 0
    shorter = cuda_checks.divergence(llm, request, expected, expected[:4])   # took a stop token at 4
    assert shorter["index"] == 4 and shorter["batched_token"] == llm.speech_token_size


def test_missing_modules_stop_the_run_and_name_the_wheels(tmp_path, monkeypatch, capsys):
    versions, missing = gpu_check.check_dependencies({"json": ("json", "x"),
                                                      "no_such_module_xyz": ("no-such-dist", "testing")})
    assert "json" in versions and len(missing) == 1 and "no-such-dist" in missing[0]
    monkeypatch.setattr(gpu_check, "REQUIRED_MODULES", {"no_such_module_xyz": ("no-such-dist", "testing")})
    assert gpu_check.main(["--dry", "--out", str(tmp_path), "--workdir", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "no-such-dist" in err and "--prepare-carry" in err and "PYTHONPATH=/tmp/site" in err
    assert not (tmp_path / "gpu-check.json").exists()


def test_a_gpu_run_without_a_gpu_stops_before_building(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code = gpu_check.main(["--out", str(tmp_path), "--workdir", str(tmp_path / "m"), "--parts", "parity",
                           "--isolate"])
    assert code == 2 and "--dry" in capsys.readouterr().err


def test_carry_lists_every_module_the_gpu_machine_lacks():
    command = gpu_check.carry_command(Path("/tmp/w"))
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in command and command[command.index("--python-version") + 1] == "3.12"
    assert "manylinux_2_28_x86_64" in command
    carried = {spec.split("==")[0] for spec in gpu_check.CARRY_WHEELS}
    assert {"wetext", "kaldifst", "soundfile", "cffi", "soxr"} <= carried
    assert all("==" in spec for spec in gpu_check.CARRY_WHEELS)      # pinned: one version each


def test_model_builds_run_in_the_background(tmp_path):
    def command(generation, size, out):
        script = (f"import pathlib, time, sys; time.sleep(0.2); p = pathlib.Path({str(out)!r}); "
                  f"p.mkdir(); (p / 'ok').write_text('{generation}{size}'); "
                  f"sys.exit(3 if '{size}' == 'broken' else 0)")
        return [sys.executable, "-c", script]

    builds = gpu_check.ModelBuilds(tmp_path, command=command)
    path = builds.start("3", "tiny")
    assert path == tmp_path / "cv3-tiny" and not path.exists()          # still building, in .partial
    assert builds.wait("3", "tiny", 30) == path and (path / "ok").read_text() == "3tiny"
    assert builds.start("3", "tiny") == path and builds.processes == {}  # a finished build is reused
    with pytest.raises(RuntimeError, match="failed"):
        builds.wait("2", "broken", 30)
    slow = gpu_check.ModelBuilds(tmp_path / "slow", command=lambda g, s, o: [sys.executable, "-c",
                                                                              "import time; time.sleep(60)"])
    slow.start("3", "full")
    with pytest.raises(TimeoutError):
        slow.wait("3", "full", 0.5)
    slow.stop()
    assert all(process.poll() is not None for process, _, _ in slow.processes.values())


def test_goals_are_met_missed_or_not_measured():
    level = lambda c, p50, p95, speed: {"concurrency": c, "first_chunk_ms": {"p50": p50, "p95": p95},  # noqa: E731
                                        "x_realtime": speed}
    performance = {"cosyvoice3": {"streaming": [level(1, 60, 90, 10), level(8, 200, 350, 40), level(16, 400, 900, 55)]},
                   "cosyvoice2": {"skipped": "time budget"}}
    goals = {(g["generation"], g["goal"]): g["met"] for g in gpu_check.evaluate_goals(performance, applicable=True)}
    assert goals[("cosyvoice3", "first chunk p50 at c=1 (ms)")] is True
    assert goals[("cosyvoice3", "first chunk p95 at c=8 (ms)")] is False
    assert goals[("cosyvoice3", "aggregate x realtime at c=16")] is True
    assert goals[("cosyvoice2", "aggregate x realtime at c=16")] is None
    assert all(g["met"] is None for g in gpu_check.evaluate_goals(performance, applicable=False))


def test_check_rows_and_budget():
    checks = Checks()
    assert checks.at_most("a", 1e-5, 1e-4) and not checks.at_most("nan", float("nan"), 1.0)
    assert not checks.at_least("graphs", 0, 1) and checks.equal("n", 3, 3)
    checks.skipped("s", "why")
    checks.error("e", RuntimeError("boom"))
    results = [row.as_dict()["result"] for row in checks.rows]
    assert results == ["pass", "FAIL", "FAIL", "pass", "skipped", "FAIL"]
    assert len(checks.failed) == 3 and "boom" in checks.rows[-1].detail
    now = [100.0]
    budget = gpu_check.Budget(60, clock=lambda: now[0])
    now[0] += 45
    assert budget.left() == 15 and budget.elapsed() == 45
    assert gpu_check.plan({"parity", "performance", "second_device"}, ["3", "2"], "full") == [
        ("parity", "3", "tiny"), ("parity", "2", "tiny"), ("second_device", "3", "tiny"),
        ("performance", "3", "full"), ("performance", "2", "full")]


def test_exact_fp32_switches_tf32_off_and_back():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with cuda_checks.exact_fp32():
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
