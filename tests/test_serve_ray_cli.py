"""serve_ray's command line and the RayService manifest's arguments (no Ray needed)."""
from pathlib import Path

import pytest
import yaml

from cosyvoice.serve_ray import Scale, flags_of, parse_args, proxy_queue_limit

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse(*flags: str, environ: dict | None = None):
    return parse_args(["--model-dir", "models/x", *flags], environ or {})


def test_fixed_replicas_on_cpu_by_default_with_the_servers_own_settings():
    settings, scale = parse("--replicas", "2", "--workers", "3", "--max-queue", "5", "--port", "7000")
    assert scale == Scale(replicas=2, max_ongoing_requests=3, target_ongoing_requests=3.0)
    assert settings.device == "cpu" and settings.port == 7000 and settings.model_dir.is_absolute()
    assert proxy_queue_limit(settings, scale) == 5 + 2 * 3


def test_a_gpu_per_replica_means_cuda_and_the_gpu_worker_default():
    settings, scale = parse("--device", "cuda:1", "--min-replicas", "1", "--max-replicas", "4")
    assert (settings.device, settings.workers) == ("cuda", 8)
    assert scale.gpus_per_replica == 1.0 and scale.autoscaling and (scale.min_replicas, scale.max_replicas) == (1, 4)
    assert proxy_queue_limit(settings, scale) == 16 + 4 * 8
    settings, scale = parse("--gpus-per-replica", "0.5", environ={"COSYVOICE_WORKERS": "4"})
    assert (settings.device, settings.workers, scale.gpus_per_replica) == ("cuda", 4, 0.5)


@pytest.mark.parametrize("flags, message", [
    (("--replicas", "2", "--max-replicas", "3"), "not both"),
    (("--grpc-port", "6007"), "--grpc-port"),
    (("--device", "cuda", "--gpus-per-replica", "0"), "--gpus-per-replica above 0"),
    (("--min-replicas", "3", "--max-replicas", "2"), "--min-replicas"),
    (("--detach",), "--detach needs --address"),
])
def test_contradictions_are_refused_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse(*flags)
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_the_rayservice_manifest_names_the_builder_with_valid_flags():
    manifest = yaml.safe_load((REPO_ROOT / "deploy" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    application, metrics = serve_config["applications"]
    assert application["import_path"] == "cosyvoice.serve_ray:app_builder"
    assert (metrics["import_path"], metrics["route_prefix"]) == ("cosyvoice.serve_ray:metrics_builder", "/metrics")
    settings, scale = parse_args(flags_of(application["args"]), {})
    assert settings.device == "cuda" and scale.autoscaling and scale.gpus_per_replica == 1
    assert str(settings.voices_dir) == "/voices"
