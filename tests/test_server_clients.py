"""The clients people already run, replayed against `server.py` started with its defaults (no API
key, CORS for any origin) on 127.0.0.1: each test sends the requests one client sends, in its
shape (written from the clients' documented and observed behaviour), and reads the answer the way
that client reads it. One row of the README's client table per test. The last test stops this
server with SIGTERM in the middle of a stream.
"""
from __future__ import annotations

import io
import signal
import struct
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

from server_harness import RATE, assert_json_error, prompt_files, run_test_server, wait_for

BROWSER_ORIGIN = "http://localhost:8000"   # SillyTavern's default address
SAY = {"text": "Hello there.", "seed": 7}
# long enough (about 1500 characters) to still be speaking when SIGTERM comes
LONG_TEXT = " ".join(["The server should stop in the middle of this very long sentence, chunk after chunk."] * 17)


@pytest.fixture(scope="module")
def default_server(model_dir, fixture_dir):
    with run_test_server(model_dir, fixture_dir, flags=()) as running:
        yield running


@pytest.fixture(scope="module")
def http(default_server):
    with httpx.Client(base_url=default_server.url, timeout=120) as client:
        yield client


def assert_whole_wav(response: httpx.Response) -> np.ndarray:
    """A complete WAV file: RIFF and data sizes match the bytes (a client saving it keeps a file
    every reader takes), and soundfile decodes it at the model's rate."""
    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-type"].startswith("audio/")
    data = response.content
    assert data[:4] == b"RIFF" and struct.unpack("<I", data[4:8])[0] == len(data) - 8
    assert data[36:40] == b"data" and struct.unpack("<I", data[40:44])[0] == len(data) - 44
    samples, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == RATE and len(samples) > RATE * 0.1
    return samples


def preflight(http: httpx.Client, path: str, method: str, headers: str) -> httpx.Response:
    return http.options(path, headers={"Origin": BROWSER_ORIGIN, "Access-Control-Request-Method": method,
                                       "Access-Control-Request-Headers": headers})


# ---- upstream CosyVoice runtime/python/fastapi/client.py ------------------------------------------

def test_upstream_client_py_sends_its_form_in_the_body_of_a_get(http, fixture_dir):
    """client.py calls requests.request("GET", url, data=..., files=...): a urlencoded or
    multipart body on a GET, and reads raw s16le PCM."""
    prompt_wav, transcript = prompt_files(fixture_dir)
    upload = {"prompt_wav": ("prompt_wav", prompt_wav.read_bytes(), "application/octet-stream")}
    calls = [("sft", {"tts_text": SAY["text"], "spk_id": "alice"}, None),
             ("zero_shot", {"tts_text": SAY["text"], "prompt_text": transcript}, upload),
             ("cross_lingual", {"tts_text": SAY["text"]}, upload),
             ("instruct", {"tts_text": SAY["text"], "spk_id": "alice", "instruct_text": "Speak softly."}, None)]
    for mode, form, files in calls:
        response = http.request("GET", f"/inference_{mode}", data=form, files=files)
        assert response.status_code == 200, (mode, response.text[:300])
        assert response.headers["x-sample-rate"] == str(RATE)
        assert len(response.content) > 0 and len(response.content) % 2 == 0, mode


# ---- SillyTavern, XTTSv2 provider (in the browser) ------------------------------------------------

def test_sillytavern_xtts_provider(http, default_server):
    """Voices from /speakers, settings sliders to /set_tts_settings (values as strings), speech
    from POST /tts_to_audio/ with Cache-Control: no-cache, streaming from /tts_stream/?..., all
    cross-origin from SillyTavern's page; previews play preview_url in an <audio> element."""
    for path, headers in (("/tts_to_audio/", "cache-control,content-type"),
                          ("/set_tts_settings", "cache-control,content-type")):
        allowed = preflight(http, path, "POST", headers)
        assert allowed.status_code == 200, allowed.text
        assert allowed.headers["access-control-allow-origin"] in ("*", BROWSER_ORIGIN)
        assert "cache-control" in allowed.headers["access-control-allow-headers"].lower()

    listed = http.get("/speakers", headers={"Origin": BROWSER_ORIGIN})
    assert listed.headers["access-control-allow-origin"] == "*"
    alice = next(voice for voice in listed.json() if voice["name"] == "alice")
    assert alice["voice_id"] == "alice" and alice["lang"]
    assert alice["preview_url"] == f"{default_server.url}/sample/alice.wav"
    preview = http.get(alice["preview_url"])
    assert preview.status_code == 200 and sf.read(io.BytesIO(preview.content))[1] > 0

    sliders = {"temperature": "0.75", "speed": "1", "length_penalty": "1", "repetition_penalty": "5",
               "top_p": "0.85", "top_k": "50", "enable_text_splitting": True, "stream_chunk_size": "100"}
    applied = http.post("/set_tts_settings", json=sliders,
                        headers={"Origin": BROWSER_ORIGIN, "Cache-Control": "no-cache"})
    assert applied.status_code == 200, applied.text

    spoken = http.post("/tts_to_audio/", json={"text": SAY["text"], "speaker_wav": "alice", "language": "en"},
                       headers={"Origin": BROWSER_ORIGIN, "Cache-Control": "no-cache"})
    assert spoken.headers["access-control-allow-origin"] == "*"
    assert_whole_wav(spoken)

    stream = http.get("/tts_stream/", params={"text": SAY["text"], "speaker_wav": "alice", "language": "en"})
    assert stream.status_code == 200 and stream.headers["content-type"].startswith("audio/")
    samples, rate = sf.read(io.BytesIO(stream.content))
    assert rate == RATE and len(samples) > RATE * 0.1


def test_xtts_speed_setting_is_honoured(http):
    def seconds(speed: str) -> float:
        assert http.post("/set_tts_settings", json={"speed": speed}).status_code == 200
        # `seed` (an extension) makes the two requests say the same thing
        return len(assert_whole_wav(http.post("/tts_to_audio/", json={
            "text": "Speed test.", "speaker_wav": "alice", "language": "en", "seed": 4}))) / RATE
    normal, fast = seconds("1.0"), seconds("2.0")
    settings = http.get("/get_tts_settings").json()
    assert settings["speed"] == 2.0 and "temperature" in settings["ignored"] and "speed" not in settings["ignored"]
    http.post("/set_tts_settings", json={"speed": 1})
    assert fast < normal * 0.7


# ---- SillyTavern, "CosyVoice (Unofficial)" provider -----------------------------------------------

def test_sillytavern_cosyvoice_provider(http):
    """GET /speakers, then POST / with JSON {text, speaker} (and streaming: 1 when enabled);
    the answer is read as an audio/* blob."""
    assert preflight(http, "/", "POST", "content-type").status_code == 200
    voice = next(voice for voice in http.get("/speakers").json() if voice["name"] == "alice")
    assert_whole_wav(http.post("/", json={"text": SAY["text"], "speaker": voice["voice_id"]},
                               headers={"Origin": BROWSER_ORIGIN}))
    streamed = http.post("/", json={"text": SAY["text"], "speaker": voice["voice_id"], "streaming": 1})
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("audio/")
    assert sf.read(io.BytesIO(streamed.content))[1] == RATE


# ---- Voxta and other xtts-api-server clients ------------------------------------------------------

def test_xtts_api_server_route_set(http, default_server):
    """The rest of xtts-api-server's routes, with its request and response shapes."""
    assert "alice" in http.get("/speakers_list").json()
    assert "en" in http.get("/languages").json()["languages"].values()
    models = http.get("/get_models_list").json()
    assert http.post("/switch_model", json={"model_name": models[0]}).status_code == 200
    assert_json_error(http.post("/switch_model", json={"model_name": "v2.0.2"}), 400)
    folders = http.get("/get_folders").json()
    assert set(folders) == {"speaker_folder", "output_folder", "model_folder"}
    assert http.post("/set_speaker_folder", json={"speaker_folder": folders["speaker_folder"]}).status_code == 200
    assert_json_error(http.post("/set_output", json={"output_folder": "/tmp"}), 400)
    assert http.get("/sample/alice.wav").status_code == 200
    # both slash forms are answered, neither redirects
    request = {"text": SAY["text"], "speaker_wav": "alice.wav", "language": "en"}
    assert_whole_wav(http.post("/tts_to_audio", json=request))
    stored = http.post("/tts_to_file", json={**request, "file_name_or_path": "reply.wav"})
    assert stored.status_code == 200, stored.text
    assert sf.read(stored.json()["output_path"])[1] == RATE
    # as in xtts-api-server, speaker_wav is required
    assert_json_error(http.post("/tts_to_audio/", json={"text": SAY["text"], "language": "en"}), 422)


# ---- Open WebUI (Audio settings: engine OpenAI, base URL http://HOST:6006/v1) ---------------------

def test_open_webui(http):
    """Open WebUI lists voices and models without a key, as objects with id (and name), then posts
    {input, voice, model} and stores the answer as an .mp3 file."""
    voices = http.get("/v1/audio/voices").json()["voices"]
    assert {"id": "alice", "name": "alice"} in voices
    assert {"id": "tts-1"} in http.get("/v1/audio/models").json()["models"]
    spoken = http.post("/v1/audio/speech", json={"input": SAY["text"], "voice": "alice", "model": "tts-1"})
    assert spoken.status_code == 200 and spoken.headers["content-type"] == "audio/mpeg"
    samples, rate = sf.read(io.BytesIO(spoken.content))
    assert rate == RATE and len(samples) > RATE * 0.1


# ---- OpenAI SDK (base_url http://HOST:6006/v1, any api_key) ---------------------------------------

def sdk_request(**fields) -> dict:
    """POST /v1/audio/speech as openai.audio.speech.create sends it."""
    return {"url": "/v1/audio/speech", "json": {"model": "gpt-4o-mini-tts", "input": SAY["text"], **fields},
            "headers": {"Authorization": "Bearer sk-anything", "Accept": "application/octet-stream"}}


def test_openai_sdk_voices_every_built_in_name_and_the_object_form(http):
    spoken = {}
    for voice in ("marin", "cedar", "alloy", {"id": "alice"}):
        response = http.post(**sdk_request(voice=voice, response_format="wav", seed=SAY["seed"]))
        assert response.status_code == 200, (voice, response.text)
        spoken[str(voice)] = response.content
    # the built-in names mean the default voice, which here is alice (`seed`: the SDK's extra_body)
    assert len(set(spoken.values())) == 1
    unknown = http.post(**sdk_request(voice={"id": "voice_1234"}))
    assert "voice_1234" in assert_json_error(unknown, 400)
    assert unknown.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("fmt", ["flac", "wav", "mp3", "opus"])
def test_openai_sdk_files_of_a_streamed_request_are_complete(http, fmt):
    """The SDK saves what it receives (write_to_file / stream_to_file); soundfile reads it."""
    response = http.post(**sdk_request(voice="alice", response_format=fmt))
    assert response.status_code == 200, response.text
    samples, rate = sf.read(io.BytesIO(response.content), dtype="float32")
    assert rate == RATE and len(samples) > RATE * 0.1


# ---- the page and listing of the server this project replaces -------------------------------------

def test_the_replaced_servers_page_and_speaker_listing(http):
    assert "alice" in http.get("/api/speakers").json()["speakers"]
    for path in ("/static/", "/static/index.html", "/"):
        page = http.get(path)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


# ---- SIGTERM during a stream (stops this module's server: keep it last) ---------------------------

def test_sigterm_ends_a_stream_cleanly_and_exits_within_seconds(default_server):
    with httpx.Client(base_url=default_server.url, timeout=60) as client, \
            client.stream("POST", "/tts", data={"text": LONG_TEXT, "speaker": "alice", "seed": 1}) as response:
        assert response.status_code == 200
        pieces = response.iter_raw()
        received = len(next(pieces))
        default_server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        received += sum(len(piece) for piece in pieces)   # ends without a transport error
        stream_ended_s = time.monotonic() - signalled
    assert wait_for(lambda: default_server.process.poll() is not None, timeout_s=10)
    exit_s = time.monotonic() - signalled
    print(f"[sigterm] stream ended {stream_ended_s:.2f} s and the process exited {exit_s:.2f} s after "
          f"SIGTERM (status {default_server.process.returncode}); {received / 2 / RATE:.1f} s of audio sent")
    assert default_server.process.returncode in (0, -signal.SIGTERM)
    assert stream_ended_s < 5 and exit_s < 10
    with pytest.raises(httpx.TransportError):
        httpx.get(default_server.url + "/health", timeout=2)
