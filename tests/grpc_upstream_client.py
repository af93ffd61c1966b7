"""An upstream-style gRPC client, run as a subprocess by test_server_grpc.py: it imports
`cosyvoice_pb2` and `cosyvoice_pb2_grpc` generated from upstream's service definition (not from
our .proto) and calls `CosyVoiceStub.Inference` the way upstream's runtime/python/grpc/client.py
does, so the server is shown to be wire-compatible with the clients people already have.

    python grpc_upstream_client.py STUBS_DIR < cases.json > results.json

cases.json: {"target": "127.0.0.1:PORT", "prompt_pcm_file": path of int16 16 kHz PCM,
             "cases": [{"name", "kind": sft|zero_shot|cross_lingual|instruct|none, "fields": {...},
                        "prompt": "file"|"odd"|BYTES_OF_ZEROS, "metadata": [[key, value]],
                        "parallel": N (N calls at once, each cancelled after its first message),
                        "own_channel": true (a connection of its own)}]}
Each result: {"name", "code" (StatusCode name), "details", "bytes", "messages", "sample_rate",
"retry_after"}; for a parallel case, "codes": the code of each call.
"""
from __future__ import annotations

import json
import sys
import threading

import grpc

sys.path.insert(0, sys.argv[1])
import cosyvoice_pb2  # noqa: E402  (generated into STUBS_DIR)
import cosyvoice_pb2_grpc  # noqa: E402


def build_request(case: dict, prompt_pcm: bytes):
    request = cosyvoice_pb2.Request()
    fields = case.get("fields", {})
    prompt = case.get("prompt")
    audio = prompt_pcm if prompt == "file" else b"\x01\x02\x03" if prompt == "odd" \
        else bytes(prompt) if isinstance(prompt, int) else b""
    kind = case["kind"]
    if kind == "sft":
        body = cosyvoice_pb2.sftRequest()
        body.spk_id, body.tts_text = fields.get("spk_id", ""), fields.get("tts_text", "")
        request.sft_request.CopyFrom(body)
    elif kind == "zero_shot":
        body = cosyvoice_pb2.zeroshotRequest()
        body.tts_text, body.prompt_text = fields.get("tts_text", ""), fields.get("prompt_text", "")
        body.prompt_audio = audio
        request.zero_shot_request.CopyFrom(body)
    elif kind == "cross_lingual":
        body = cosyvoice_pb2.crosslingualRequest()
        body.tts_text = fields.get("tts_text", "")
        body.prompt_audio = audio
        request.cross_lingual_request.CopyFrom(body)
    elif kind == "instruct":
        body = cosyvoice_pb2.instructRequest()
        body.tts_text, body.spk_id = fields.get("tts_text", ""), fields.get("spk_id", "")
        body.instruct_text = fields.get("instruct_text", "")
        request.instruct_request.CopyFrom(body)
    return request   # kind "none": an empty Request


def call(stub, request, metadata, first_only: bool = False) -> dict:
    result = {"code": "OK", "details": "", "bytes": 0, "messages": 0, "sample_rate": None,
              "retry_after": None}
    responses = stub.Inference(request, metadata=metadata, timeout=120)
    try:
        for response in responses:
            result["bytes"] += len(response.tts_audio)
            result["messages"] += 1
            if first_only:
                responses.cancel()
                break
        if not first_only:
            result["sample_rate"] = dict(responses.initial_metadata() or ()).get("x-sample-rate")
    except grpc.RpcError as error:
        result["code"], result["details"] = error.code().name, error.details()
        result["retry_after"] = dict(error.trailing_metadata() or ()).get("retry-after")
    return result


def main() -> None:
    spec = json.load(sys.stdin)
    with open(spec["prompt_pcm_file"], "rb") as file:
        prompt_pcm = file.read()
    results = []
    with grpc.insecure_channel(spec["target"]) as shared_channel:
        for case in spec["cases"]:
            # a message over the server's limit ends its connection too: such a case gets its own
            channel = grpc.insecure_channel(spec["target"]) if case.get("own_channel") else shared_channel
            stub = cosyvoice_pb2_grpc.CosyVoiceStub(channel)
            request = build_request(case, prompt_pcm)
            metadata = [tuple(pair) for pair in case.get("metadata", [])]
            if case.get("parallel"):
                outcomes: list[dict] = []
                threads = [threading.Thread(target=lambda: outcomes.append(
                    call(stub, request, metadata, first_only=True))) for _ in range(case["parallel"])]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(timeout=300)
                result = {"codes": sorted(outcome["code"] for outcome in outcomes),
                          "details": sorted({o["details"] for o in outcomes if o["details"]}),
                          "retry_after": [o["retry_after"] for o in outcomes if o["retry_after"]]}
            else:
                result = call(stub, request, metadata)
            results.append({"name": case["name"], **result})
            if channel is not shared_channel:
                channel.close()
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
