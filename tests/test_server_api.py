"""Every endpoint of every API family, against a real server process on 127.0.0.1."""
from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
import soundfile as sf

from cosyvoice.server.routers.xtts import guess_language

from server_harness import (ALLOWED_ORIGIN, API_KEY, RATE, SHORT, STREAMING, assert_json_error, decode,
                            prompt_files, wait_for)


def stream_pieces(client: httpx.Client, method: str, path: str, **kwargs) -> tuple[httpx.Response, list[bytes]]:
    """The response and its body as the separate pieces the socket delivered."""
    with client.stream(method, path, **kwargs) as response:
        pieces = [piece for piece in response.iter_raw() if piece] if response.status_code == 200 else []
        if response.status_code != 200:
            response.read()
    return response, pieces


# ---- operations ---------------------------------------------------------------------------------

def test_health_ready_and_banner_need_no_key(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "model": "ready",
                                                        "generation": "CosyVoice2"}
    ready = httpx.get(server.url + "/ready")
    assert ready.status_code == 200 and ready.json()["sample_rate"] == RATE
    assert ready.json()["generation"] == "CosyVoice2"
    banner = server.stdout().splitlines()[0]
    assert f"http://127.0.0.1:{server.port}" in banner and str(server.port) in banner


def test_metrics_are_prometheus_text(server, client):
    steps_before = server.metric("cosyvoice_llm_batch_size_count")
    # a text no other test sends, so the response cache cannot answer it without the LLM
    spoken = client.post("/tts", data={**SHORT, "text": "Metrics count this."})
    assert spoken.status_code == 200, spoken.text
    text = client.get("/metrics").text
    for name in ("cosyvoice_requests_total", "cosyvoice_errors_total", "cosyvoice_first_chunk_seconds_bucket",
                 "cosyvoice_rtf_bucket", "cosyvoice_queue_depth", "cosyvoice_active_generations",
                 "cosyvoice_ready 1.0"):
        assert name in text, name
    assert server.metric("cosyvoice_llm_batch_size_count") > steps_before   # that request's LLM steps


def test_access_log_is_json_lines(server, client):
    client.get("/speakers_list")

    def logged() -> bool:   # the line is written just after the response is sent
        lines = [json.loads(line) for line in server.stdout().splitlines()[1:]]
        return any(line["path"] == "/speakers_list" and line["status"] == 200 for line in lines)
    assert wait_for(logged)


def test_cors_only_for_the_configured_origin(server):
    allowed = httpx.options(server.url + "/v1/audio/speech", headers={
        "Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    other = httpx.get(server.url + "/health", headers={"Origin": "http://other.example"})
    assert "access-control-allow-origin" not in other.headers


# ---- native -------------------------------------------------------------------------------------

def test_native_tts_streams_pcm_in_several_chunks(client):
    response, pieces = stream_pieces(client, "POST", "/tts", data={**STREAMING, "speaker": "alice"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/pcm"
    assert response.headers["x-sample-rate"] == str(RATE) and response.headers["x-sample-format"] == "s16le"
    assert len(pieces) >= 2, "the audio should arrive in several pieces, as the model makes it"
    samples, _ = decode("pcm", b"".join(pieces), streamed=True)
    assert len(samples) > RATE and np.abs(samples).max() > 0


def test_native_speakers_lists_voices(client):
    listing = client.get("/api/speakers").json()
    assert "alice" in listing["speakers"]   # names, as the replaced server's page reads them
    assert {"name": "alice", "voice_id": "alice", "kind": "voice"} in listing["details"]


def test_identical_requests_are_answered_from_the_cache(client):
    request = {**SHORT, "text": "Cache me."}
    first = client.post("/tts", data=request)
    second = client.post("/tts", data=request)
    assert first.status_code == second.status_code == 200
    assert second.headers["x-cache"] == "hit" and first.content == second.content


# ---- voices -------------------------------------------------------------------------------------

def test_voice_lifecycle_register_use_list_delete(server, client, fixture_dir):
    prompt_wav, transcript = prompt_files(fixture_dir)
    created = client.post("/api/voices", data={"name": "bob", "prompt_text": transcript},
                          files={"audio": ("bob.wav", prompt_wav.read_bytes(), "audio/wav")})
    assert created.status_code == 201, created.text
    assert created.json()["name"] == "bob" and created.json()["prompt_text"] == transcript
    assert (server.voices_dir / ".store" / "bob.voice").is_file()
    assert "bob" in [v["name"] for v in client.get("/api/voices").json()]
    assert "bob" in client.get("/speakers_list").json()
    audio = client.get("/api/voices/bob/audio")
    assert audio.status_code == 200 and sf.read(io.BytesIO(audio.content))[1] == sf.info(prompt_wav).samplerate
    spoken = client.post("/tts", data={**SHORT, "speaker": "bob", "format": "wav", "stream": "false"})
    assert spoken.status_code == 200 and sf.read(io.BytesIO(spoken.content))[1] == RATE
    again = client.post("/api/voices", data={"name": "bob"}, files={"audio": ("b.wav", prompt_wav.read_bytes())})
    assert_json_error(again, 409)
    assert client.delete("/api/voices/bob").json() == {"deleted": "bob"}
    assert "bob" not in [v["name"] for v in client.get("/api/voices").json()]
    assert not list((server.voices_dir / ".store").glob("bob.*"))


def test_default_voice_answers_when_none_is_named(client):
    # 'alice' is the only imported voice, so it is the default
    for speaker in ("", "default"):
        response = client.post("/tts", data={**SHORT, "speaker": speaker})
        assert response.status_code == 200 and len(response.content) > 0


# ---- every audio format, streamed and whole -----------------------------------------------------

@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize("fmt", ["wav", "pcm", "mp3", "opus", "flac", "aac"])
def test_every_format_decodes_at_the_model_rate(client, fmt, stream):
    response = client.post("/v1/audio/speech", json={
        "model": "tts-1", "input": "Every format.", "voice": "alice", "response_format": fmt,
        "stream": stream, "seed": 3})
    assert response.status_code == 200, response.text
    assert response.headers["x-audio-format"] == fmt and response.headers["x-sample-rate"] == str(RATE)
    samples, rate = decode(fmt, response.content, stream)
    assert rate == RATE
    assert len(samples) > RATE * 0.1 and np.isfinite(samples).all()


# ---- upstream CosyVoice -------------------------------------------------------------------------

def upstream_pcm(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["x-sample-rate"] == str(RATE)
    samples, _ = decode("pcm", response.content, streamed=True)
    assert len(samples) > 0
    return samples


def test_upstream_endpoints_with_uploaded_prompts(client, fixture_dir):
    prompt_wav, transcript = prompt_files(fixture_dir)
    upload = {"prompt_wav": ("prompt.wav", prompt_wav.read_bytes(), "audio/wav")}
    base = {"tts_text": SHORT["text"], "seed": SHORT["seed"]}
    upstream_pcm(client.post("/inference_zero_shot", data={**base, "prompt_text": transcript}, files=upload))
    upstream_pcm(client.post("/inference_cross_lingual", data=base, files=upload))
    upstream_pcm(client.post("/inference_instruct2", data={**base, "instruct_text": "Speak softly."},
                             files=upload))


def test_upstream_endpoints_with_a_registered_voice_by_get_and_post(client):
    base = {"tts_text": SHORT["text"], "seed": SHORT["seed"], "spk_id": "alice"}
    upstream_pcm(client.get("/inference_sft", params=base))
    upstream_pcm(client.post("/inference_sft", data=base))
    upstream_pcm(client.get("/inference_zero_shot", params=base))
    upstream_pcm(client.get("/inference_cross_lingual", params=base))
    upstream_pcm(client.get("/inference_instruct", params={**base, "instruct_text": "Speak softly."}))
    upstream_pcm(client.get("/inference_instruct2", params={**base, "instruct_text": "Speak softly."}))


# ---- xtts-api-server ----------------------------------------------------------------------------

def test_xtts_speakers(server, client, fixture_dir):
    prompt_wav, transcript = prompt_files(fixture_dir)   # alice's
    assert "alice" in client.get("/speakers_list").json()
    speaker = next(s for s in client.get("/speakers").json() if s["name"] == "alice")
    # the preview link is built from the server's own address (not the Host header) and works
    assert speaker["voice_id"] == "alice" and speaker["preview_url"] == f"{server.url}/sample/alice.wav"
    assert speaker["lang"] == guess_language(transcript) != "auto"
    preview = client.get(speaker["preview_url"])
    assert preview.status_code == 200 and sf.read(io.BytesIO(preview.content))[1] == sf.info(prompt_wav).samplerate


def test_xtts_tts_to_audio_returns_a_wav(client):
    response = client.post("/tts_to_audio/", json={**SHORT, "speaker_wav": "alice.wav", "language": "en"})
    assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
    samples, rate = sf.read(io.BytesIO(response.content))
    assert rate == RATE and len(samples) > 0


def test_xtts_tts_stream_streams_a_wav(client):
    response, pieces = stream_pieces(client, "GET", "/tts_stream", params={
        **STREAMING, "speaker_wav": "alice", "language": "en"})
    assert response.status_code == 200 and len(pieces) >= 2
    samples, rate = sf.read(io.BytesIO(b"".join(pieces)))
    assert rate == RATE and len(samples) > 0


# ---- OpenAI -------------------------------------------------------------------------------------

def test_openai_models_and_voices(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]][:2] == ["cosyvoice2", "tts-1"]
    assert {m["generation"] for m in models["data"]} == {"CosyVoice2"}
    assert {"id": "alice", "name": "alice"} in client.get("/v1/audio/voices").json()["voices"]


def test_openai_voice_names_mean_the_default_voice_and_instructions_work(client):
    response = client.post("/v1/audio/speech", json={
        "model": "tts-1", "input": SHORT["text"], "voice": "alloy", "response_format": "wav",
        "instructions": "Speak slowly.", "seed": SHORT["seed"]})
    assert response.status_code == 200, response.text
    assert sf.read(io.BytesIO(response.content))[1] == RATE


def test_openai_speed_changes_the_length(client):
    def seconds(speed: float) -> float:
        response = client.post("/v1/audio/speech", json={
            "input": "Speed test.", "voice": "alice", "response_format": "pcm", "speed": speed, "seed": 4,
            "stream": False})
        assert response.status_code == 200, response.text
        return len(response.content) / 2 / RATE
    assert seconds(2.0) < seconds(1.0) * 0.7


def test_a_seed_beyond_64_bits_is_a_400_in_each_familys_shape(client):
    native = client.post("/tts", data={**SHORT, "seed": str(2**64)})
    assert "seed" in assert_json_error(native, 400) and "detail" in native.json()
    openai = client.post("/v1/audio/speech", json={"input": SHORT["text"], "voice": "alice", "seed": 2**64})
    assert "seed" in assert_json_error(openai, 400)
    assert openai.json()["error"]["type"] == "invalid_request_error"


def test_a_body_of_the_wrong_kind_is_named(client):
    """JSON to the form endpoints, a form or untyped body to the JSON ones: the error says which
    kind the endpoint reads before the field it missed."""
    json_to_form = client.post("/tts", json={"text": SHORT["text"], "speaker": "alice"})
    assert "reads form fields" in assert_json_error(json_to_form, 422)
    form_to_json = client.post("/v1/audio/speech", data={"input": SHORT["text"], "voice": "alice"})
    assert "Content-Type: application/json" in assert_json_error(form_to_json, 400)
    untyped = client.post("/tts_to_audio/", content=json.dumps({"text": SHORT["text"], "speaker_wav": "alice"}),
                          headers={"content-type": "text/plain"})
    assert "Content-Type: application/json" in assert_json_error(untyped, 422)
    right_kind = client.post("/v1/audio/speech", json={"voice": "alice"})
    assert "reads" not in assert_json_error(right_kind, 400)


def test_api_key_is_accepted_as_bearer(server):
    response = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200


def test_api_key_in_the_query_for_media_links_and_never_logged(server):
    """<audio src=...> cannot send headers, so a link may carry ?api_key=KEY."""
    assert httpx.get(server.url + "/sample/alice.wav", params={"api_key": API_KEY}).status_code == 200
    streamed = httpx.get(server.url + "/tts_stream", params={**SHORT, "speaker_wav": "alice", "api_key": API_KEY},
                         timeout=120)
    assert streamed.status_code == 200 and sf.read(io.BytesIO(streamed.content))[1] == RATE
    assert_json_error(httpx.get(server.url + "/speakers", params={"api_key": "wrong"}), 401)
    assert wait_for(lambda: "/tts_stream" in server.stdout())
    assert API_KEY not in server.stdout() + server.stderr()
