"""Upstream's gRPC service (`server.py --grpc-port`), against the shared server on 127.0.0.1.

The client is generated from upstream's service definition (below, as upstream ships it) and run
in a subprocess (grpc_upstream_client.py), so it is independent of our generated modules: the
same message names, field numbers and method path are all that connect the two.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from google.protobuf import descriptor_pb2

from server_harness import API_KEY, MAX_UPLOAD_MB, RATE, prompt_files

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO = REPO_ROOT / "cosyvoice" / "server" / "cosyvoice.proto"
CLIENT = Path(__file__).with_name("grpc_upstream_client.py")

# upstream CosyVoice's runtime/python/grpc service definition, as its clients are generated from it
UPSTREAM_PROTO = """
syntax = "proto3";
package cosyvoice;
service CosyVoice { rpc Inference(Request) returns (stream Response) {} }
message Request {
  oneof RequestPayload {
    sftRequest sft_request = 1;
    zeroshotRequest zero_shot_request = 2;
    crosslingualRequest cross_lingual_request = 3;
    instructRequest instruct_request = 4;
  }
}
message sftRequest { string spk_id = 1; string tts_text = 2; }
message zeroshotRequest { string tts_text = 1; string prompt_text = 2; bytes prompt_audio = 3; }
message crosslingualRequest { string tts_text = 1; bytes prompt_audio = 2; }
message instructRequest { string tts_text = 1; string spk_id = 2; string instruct_text = 3; }
message Response { bytes tts_audio = 1; }
"""
KEY = [["x-api-key", API_KEY]]
TEXT = "One two three four five six."
LONG = "Streaming keeps the queue busy for a while, " * 3


def protoc(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", *args], check=True, cwd=REPO_ROOT,
                   capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def upstream_stubs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("upstream-grpc")
    (folder / "cosyvoice.proto").write_text(UPSTREAM_PROTO)
    protoc("-I", str(folder), f"--python_out={folder}", f"--grpc_python_out={folder}",
           f"--descriptor_set_out={folder / 'upstream.pb'}", str(folder / "cosyvoice.proto"))
    return folder


def grpc_cases(transcript: str) -> list[dict]:
    speak = {"tts_text": TEXT}
    return [
        {"name": "sft", "kind": "sft", "fields": {**speak, "spk_id": "alice"}, "metadata": KEY},
        {"name": "zero_shot", "kind": "zero_shot", "fields": {**speak, "prompt_text": transcript},
         "prompt": "file", "metadata": KEY},
        {"name": "cross_lingual", "kind": "cross_lingual", "fields": speak, "prompt": "file",
         "metadata": KEY},
        {"name": "instruct", "kind": "instruct", "metadata": KEY,
         "fields": {**speak, "spk_id": "alice", "instruct_text": "Speak slowly."}},
        {"name": "bearer-key", "kind": "sft", "fields": {**speak, "spk_id": "alice"},
         "metadata": [["authorization", f"Bearer {API_KEY}"]]},
        {"name": "unknown-spk-id", "kind": "sft", "fields": {**speak, "spk_id": "nobody"}, "metadata": KEY},
        {"name": "empty-request", "kind": "none", "metadata": KEY},
        {"name": "empty-text", "kind": "sft", "fields": {"spk_id": "alice"}, "metadata": KEY},
        {"name": "no-prompt-audio", "kind": "cross_lingual", "fields": speak, "metadata": KEY},
        {"name": "odd-prompt-bytes", "kind": "cross_lingual", "fields": speak, "prompt": "odd",
         "metadata": KEY},
        {"name": "silent-prompt", "kind": "cross_lingual", "fields": speak, "prompt": 32000, "metadata": KEY},
        {"name": "instruct-without-instruction", "kind": "instruct", "metadata": KEY,
         "fields": {**speak, "spk_id": "alice"}},
        {"name": "zero-shot-without-transcript", "kind": "zero_shot", "fields": speak, "prompt": "file",
         "metadata": KEY},
        {"name": "missing-key", "kind": "sft", "fields": {**speak, "spk_id": "alice"}},
        {"name": "wrong-key", "kind": "sft", "fields": {**speak, "spk_id": "alice"},
         "metadata": [["x-api-key", "wrong"]]},
        {"name": "queue-full", "kind": "sft", "fields": {"tts_text": LONG, "spk_id": "alice"},
         "metadata": KEY, "parallel": 12},
        {"name": "prompt-over-upload-limit", "kind": "cross_lingual", "fields": speak,
         "prompt": (MAX_UPLOAD_MB + 1) * 1024 * 1024, "metadata": KEY, "own_channel": True},
    ]


@pytest.fixture(scope="module")
def results(server, upstream_stubs, fixture_dir, tmp_path_factory) -> dict[str, dict]:
    """Every case, run once by the upstream-style client."""
    prompt_wav, transcript = prompt_files(fixture_dir)
    samples, rate = sf.read(prompt_wav, dtype="float32")
    if samples.ndim > 1:
        samples = samples.mean(axis=1)
    samples = soxr.resample(samples, rate, 16000)   # as upstream's client loads it: 16 kHz mono
    pcm_file = tmp_path_factory.mktemp("grpc-prompt") / "prompt.pcm"
    pcm_file.write_bytes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    spec = {"target": f"127.0.0.1:{server.grpc_port}", "prompt_pcm_file": str(pcm_file),
            "cases": grpc_cases(transcript)}
    started = time.perf_counter()
    run = subprocess.run([sys.executable, str(CLIENT), str(upstream_stubs)], input=json.dumps(spec),
                         capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    print(f"[grpc] {len(spec['cases'])} cases in {time.perf_counter() - started:.1f} s")
    return {result["name"]: result for result in json.loads(run.stdout)}


@pytest.mark.parametrize("name", ["sft", "zero_shot", "cross_lingual", "instruct", "bearer-key"])
def test_every_request_kind_streams_int16_pcm(results, name):
    result = results[name]
    assert result["code"] == "OK", result
    assert result["sample_rate"] == str(RATE)
    assert result["bytes"] > RATE and result["bytes"] % 2 == 0   # over half a second of int16
    assert result["messages"] >= 1


@pytest.mark.parametrize("name,code", [
    ("unknown-spk-id", "NOT_FOUND"),
    ("empty-request", "INVALID_ARGUMENT"),
    ("empty-text", "INVALID_ARGUMENT"),
    ("no-prompt-audio", "INVALID_ARGUMENT"),
    ("odd-prompt-bytes", "INVALID_ARGUMENT"),
    ("silent-prompt", "INVALID_ARGUMENT"),
    ("instruct-without-instruction", "INVALID_ARGUMENT"),
    ("zero-shot-without-transcript", "INVALID_ARGUMENT"),
    ("prompt-over-upload-limit", "RESOURCE_EXHAUSTED"),
    ("missing-key", "UNAUTHENTICATED"),
    ("wrong-key", "UNAUTHENTICATED"),
])
def test_bad_calls_get_a_clear_status(results, name, code):
    result = results[name]
    assert result["code"] == code, result
    assert len(result["details"]) > 10 and "Traceback" not in result["details"]


def test_a_full_queue_is_resource_exhausted_with_retry_after(results, server):
    codes = results["queue-full"]["codes"]
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, results["queue-full"]
    assert "OK" in codes and "RESOURCE_EXHAUSTED" in codes, codes
    retry_after = results["queue-full"]["retry_after"]
    assert retry_after and all(value == "1" for value in retry_after)   # the server's --retry-after-s


def test_no_call_is_unknown_or_internal_and_calls_are_counted(results, server):
    codes = [result.get("code") for result in results.values()]
    codes += [code for result in results.values() for code in result.get("codes", [])]
    assert not {"UNKNOWN", "INTERNAL"} & set(codes), codes
    metrics = server.client().get("/metrics").text
    route = 'route="/cosyvoice.CosyVoice/Inference"'
    assert f'cosyvoice_requests_total{{method="GRPC",{route},status="OK"}}' in metrics
    assert f'cosyvoice_errors_total{{{route},status="NOT_FOUND"}}' in metrics
    assert "Traceback" not in server.stderr()


def test_committed_modules_match_the_proto_and_upstream(upstream_stubs, tmp_path):
    """The generated modules are committed (no build step on the box): they must be what
    cosyvoice.proto compiles to, and that must carry upstream's names and field numbers."""
    from cosyvoice.server import cosyvoice_pb2

    protoc("-I", ".", f"--descriptor_set_out={tmp_path / 'ours.pb'}", "cosyvoice/server/cosyvoice.proto")
    ours = descriptor_pb2.FileDescriptorSet.FromString((tmp_path / "ours.pb").read_bytes()).file[0]
    for message in ours.message_type:   # protoc fills json_name only in descriptor sets
        for field in message.field:
            field.ClearField("json_name")
    committed = descriptor_pb2.FileDescriptorProto.FromString(cosyvoice_pb2.DESCRIPTOR.serialized_pb)
    assert committed == ours, "cosyvoice_pb2.py is stale: regenerate it (see cosyvoice.proto)"
    upstream_set = (upstream_stubs / "upstream.pb").read_bytes()
    upstream = descriptor_pb2.FileDescriptorSet.FromString(upstream_set).file[0]

    def shape(file):
        messages = {m.name: sorted((f.name, f.number, f.type, f.type_name, f.oneof_index if f.HasField(
            "oneof_index") else -1) for f in m.field) for m in file.message_type}
        services = [(s.name, [(m.name, m.input_type, m.output_type, m.server_streaming, m.client_streaming)
                              for m in s.method]) for s in file.service]
        return file.package, messages, services
    assert shape(ours) == shape(upstream)

