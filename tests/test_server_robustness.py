"""Bad input, load, disconnects and memory, against a real server process on 127.0.0.1."""
from __future__ import annotations

import io
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import soundfile as sf

from server_harness import (API_KEY, MAX_QUEUE, MAX_TEXT_CHARS, MAX_UPLOAD_MB, SHORT, WORKERS,
                            assert_json_error, prompt_files, wait_for, wav_bytes)

# zero_shot in 'alice' with this seed runs long (many chunks): time enough to walk away mid-stream
LONG = {"text": "This sentence is long enough to keep the model busy for a good while, chunk after "
                "chunk, so that a client can hang up in the middle of it.", "seed": 5}


@pytest.fixture(scope="module")
def prompts(fixture_dir) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    good, transcript = prompt_files(fixture_dir)
    return {
        "good": good.read_bytes(),
        "corrupt": rng.integers(0, 256, 20000, dtype=np.uint8).tobytes(),
        "silent": wav_bytes(np.zeros(16000 * 3, dtype=np.float32), 16000),
        "ten_minutes": wav_bytes(rng.uniform(-0.3, 0.3, 16000 * 600).astype(np.float32), 16000),
        "too_short": wav_bytes(rng.uniform(-0.3, 0.3, 1600).astype(np.float32), 16000),
        "empty": b"",
        "transcript": transcript.encode("utf-8"),
    }


def upload(prompts, name: str) -> dict:
    return {"prompt_wav": ("prompt.wav", prompts[name], "audio/wav")}


def openai(**fields) -> dict:
    return {"model": "tts-1", "input": "Hello.", "voice": "alice", **fields}


def raw_json(client: httpx.Client, path: str, text: str) -> httpx.Response:
    """POSTs JSON written by hand, so it can hold escapes json.dumps would not write."""
    return client.post(path, content=text.encode("ascii"), headers={"content-type": "application/json"})


# A lone UTF-16 surrogate: a valid JSON escape that no UTF-8 text can hold
LONE = "\\ud800"
SURROGATE_BODIES = [
    ("openai-input", "/v1/audio/speech", f'{{"input": "Hi {LONE}", "voice": "alice"}}'),
    ("openai-voice", "/v1/audio/speech", f'{{"input": "Hi.", "voice": "x{LONE}"}}'),
    ("openai-voice-id", "/v1/audio/speech", f'{{"input": "Hi.", "voice": {{"id": "x{LONE}"}}}}'),
    ("openai-model", "/v1/audio/speech", f'{{"input": "Hi.", "voice": "alice", "model": "{LONE}"}}'),
    ("openai-format", "/v1/audio/speech", f'{{"input": "Hi.", "voice": "alice", "response_format": "{LONE}"}}'),
    ("openai-instructions", "/v1/audio/speech", f'{{"input": "Hi.", "voice": "alice", "instructions": "{LONE}"}}'),
    ("openai-stream-format", "/v1/audio/speech", f'{{"input": "Hi.", "voice": "alice", "stream_format": "{LONE}"}}'),
    ("openai-key", "/v1/audio/speech", f'{{"input": "Hi.", "voice": "alice", "{LONE}": 1}}'),
    ("xtts-text", "/tts_to_audio/", '{"text": "Hi \\udc00", "speaker_wav": "alice", "language": "en"}'),
    ("xtts-speaker", "/tts_to_audio/", f'{{"text": "Hi.", "speaker_wav": "al{LONE}", "language": "en"}}'),
    ("xtts-language", "/tts_to_audio/", f'{{"text": "Hi.", "speaker_wav": "alice", "language": "{LONE}"}}'),
    ("st-cosyvoice-text", "/", f'{{"text": "Hi {LONE}", "speaker": "alice"}}'),
    ("st-cosyvoice-speaker", "/", f'{{"text": "Hi.", "speaker": "{LONE}"}}'),
]


# (id, function(client, prompts) -> response, expected status or None for "some 4xx")
BAD_INPUTS = [
    ("tts-empty-text", lambda c, p: c.post("/tts", data={"text": ""}), None),
    ("tts-blank-text", lambda c, p: c.post("/tts", data={"text": "   \n "}), 400),
    ("tts-huge-text", lambda c, p: c.post("/tts", data={"text": "a" * (MAX_TEXT_CHARS + 1)}), 400),
    ("tts-binary-text", lambda c, p: c.post("/tts", data={"text": "\x00\x01\x02\x7f binary"}), 400),
    ("tts-only-punctuation", lambda c, p: c.post("/tts", data={"text": "!!! ... ???"}), 400),
    ("tts-unknown-voice", lambda c, p: c.post("/tts", data={"text": "Hi.", "speaker": "nobody"}), 400),
    ("tts-bad-format", lambda c, p: c.post("/tts", data={"text": "Hi.", "format": "wma"}), 400),
    ("tts-speed-zero", lambda c, p: c.post("/tts", data={"text": "Hi.", "speed": "0"}), 400),
    ("tts-speed-huge", lambda c, p: c.post("/tts", data={"text": "Hi.", "speed": "100"}), 400),
    ("tts-speed-not-a-number", lambda c, p: c.post("/tts", data={"text": "Hi.", "speed": "fast"}), 422),
    ("tts-seed-not-a-number", lambda c, p: c.post("/tts", data={"text": "Hi.", "seed": "abc"}), 422),
    ("tts-missing-text", lambda c, p: c.post("/tts", data={"speaker": "alice"}), 422),
    ("tts-json-instead-of-form", lambda c, p: c.post("/tts", json={"text": "Hi."}), 422),
    ("tts-wrong-method", lambda c, p: c.delete("/tts"), 405),
    ("openai-bad-json", lambda c, p: c.post("/v1/audio/speech", content=b"{not json",
                                            headers={"content-type": "application/json"}), 400),
    ("openai-missing-input", lambda c, p: c.post("/v1/audio/speech", json={"voice": "alice"}), 400),
    ("openai-input-not-text", lambda c, p: c.post("/v1/audio/speech", json=openai(input=12345)), 400),
    ("openai-empty-input", lambda c, p: c.post("/v1/audio/speech", json=openai(input="")), 400),
    ("openai-huge-input", lambda c, p: c.post("/v1/audio/speech",
                                              json=openai(input="word " * MAX_TEXT_CHARS)), 400),
    ("openai-binary-input", lambda c, p: c.post("/v1/audio/speech", json=openai(input="\x00\x1b[2J")), 400),
    ("openai-bad-format", lambda c, p: c.post("/v1/audio/speech", json=openai(response_format="wma")), 400),
    ("openai-negative-speed", lambda c, p: c.post("/v1/audio/speech", json=openai(speed=-1)), 400),
    ("openai-unknown-voice", lambda c, p: c.post("/v1/audio/speech", json=openai(voice="nobody")), 400),
    ("openai-text-plain", lambda c, p: c.post("/v1/audio/speech", content=b"Hello.",
                                              headers={"content-type": "text/plain"}), 400),
    ("upstream-corrupt-wav", lambda c, p: c.post("/inference_cross_lingual", data={"tts_text": "Hi."},
                                                 files=upload(p, "corrupt")), 400),
    ("upstream-silent-wav", lambda c, p: c.post("/inference_cross_lingual", data={"tts_text": "Hi."},
                                                files=upload(p, "silent")), 400),
    ("upstream-ten-minute-wav", lambda c, p: c.post("/inference_cross_lingual", data={"tts_text": "Hi."},
                                                    files=upload(p, "ten_minutes")), 400),
    ("upstream-too-short-wav", lambda c, p: c.post("/inference_cross_lingual", data={"tts_text": "Hi."},
                                                   files=upload(p, "too_short")), 400),
    ("upstream-empty-wav", lambda c, p: c.post("/inference_cross_lingual", data={"tts_text": "Hi."},
                                               files=upload(p, "empty")), 400),
    ("upstream-no-prompt", lambda c, p: c.post("/inference_cross_lingual", data={"tts_text": "Hi."}), 400),
    ("upstream-zero-shot-no-transcript", lambda c, p: c.post("/inference_zero_shot", data={"tts_text": "Hi."},
                                                             files=upload(p, "good")), 400),
    ("upstream-instruct2-no-instruction", lambda c, p: c.post("/inference_instruct2", data={"tts_text": "Hi."},
                                                              files=upload(p, "good")), 400),
    ("upstream-json-content-type", lambda c, p: c.post("/inference_sft", json={"tts_text": "Hi."}), 415),
    ("upstream-unknown-speaker", lambda c, p: c.get("/inference_sft",
                                                    params={"tts_text": "Hi.", "spk_id": "nobody"}), 400),
    ("upstream-negative-seed", lambda c, p: c.get("/inference_sft", params={
        "tts_text": "Hi.", "spk_id": "alice", "seed": "-1"}), 400),
    ("upstream-missing-text", lambda c, p: c.get("/inference_sft", params={"spk_id": "alice"}), 422),
    ("upstream-speed-not-a-number", lambda c, p: c.get("/inference_sft", params={
        "tts_text": "Hi.", "spk_id": "alice", "speed": "fast"}), 422),
    ("voice-name-traversal", lambda c, p: c.post("/api/voices", data={"name": "../../etc/evil"},
                                                 files={"audio": ("a.wav", p["good"])}), 400),
    ("voice-name-separator", lambda c, p: c.post("/api/voices", data={"name": "a\\b"},
                                                 files={"audio": ("a.wav", p["good"])}), 400),
    ("voice-name-hidden", lambda c, p: c.post("/api/voices", data={"name": ".store"},
                                              files={"audio": ("a.wav", p["good"])}), 400),
    ("voice-corrupt-audio", lambda c, p: c.post("/api/voices", data={"name": "broken"},
                                                files={"audio": ("a.wav", p["corrupt"])}), 400),
    ("voice-silent-audio", lambda c, p: c.post("/api/voices", data={"name": "quiet"},
                                               files={"audio": ("a.wav", p["silent"])}), 400),
    ("voice-missing-audio", lambda c, p: c.post("/api/voices", data={"name": "nothing"}), 422),
    ("voice-delete-traversal", lambda c, p: c.delete("/api/voices/..%2F..%2Fetc%2Fpasswd"), None),
    ("voice-delete-unknown", lambda c, p: c.delete("/api/voices/nobody"), 404),
    ("voice-audio-traversal", lambda c, p: c.get("/api/voices/..%2Fserver.py/audio"), None),
    ("upload-too-large", lambda c, p: c.post("/inference_cross_lingual", data={"tts_text": "Hi."}, files={
        "prompt_wav": ("big.wav", b"\0" * (MAX_UPLOAD_MB * 1024 * 1024 + 1))}), 413),
    ("xtts-bad-json", lambda c, p: c.post("/tts_to_audio/", content=b"[1, 2",
                                          headers={"content-type": "application/json"}), 422),
    ("xtts-unknown-speaker", lambda c, p: c.post("/tts_to_audio/", json={
        "text": "Hi.", "speaker_wav": "nobody.wav", "language": "en"}), 400),
    ("xtts-stream-missing-text", lambda c, p: c.get("/tts_stream", params={"speaker_wav": "alice"}), 422),
    ("unknown-endpoint", lambda c, p: c.get("/no/such/thing"), 404),
    *[(f"surrogate-{name}", (lambda path, body: lambda c, p: raw_json(c, path, body))(path, body), 400)
      for name, path, body in SURROGATE_BODIES],
    ("form-not-utf8", lambda c, p: c.post("/tts", content=b"text=caf%E9", headers={
        "content-type": "application/x-www-form-urlencoded"}), 400),
    ("query-not-utf8", lambda c, p: c.get("/inference_sft?tts_text=caf%E9&spk_id=alice"), 400),
    ("json-not-utf8", lambda c, p: c.post("/v1/audio/speech", content='{"input": "caf\xe9"}'.encode("latin-1"),
                                          headers={"content-type": "application/json"}), 400),
    ("xtts-no-speaker-wav", lambda c, p: c.post("/tts_to_audio/", json={"text": "Hi.", "language": "en"}), 422),
    ("xtts-sample-traversal", lambda c, p: c.get("/sample/..%2F..%2Fetc%2Fpasswd"), None),
    ("xtts-sample-unknown", lambda c, p: c.get("/sample/nobody.wav"), 404),
    ("xtts-speed-huge", lambda c, p: c.post("/set_tts_settings", json={"speed": 100}), 400),
    ("xtts-speed-not-a-number", lambda c, p: c.post("/set_tts_settings", json={"speed": "fast"}), 422),
    ("xtts-set-output-elsewhere", lambda c, p: c.post("/set_output", json={"output_folder": "/etc"}), 400),
    ("xtts-switch-model", lambda c, p: c.post("/switch_model", json={"model_name": "v2.0.2"}), 400),
    ("xtts-file-name-traversal", lambda c, p: c.post("/tts_to_file", json={
        "text": "Hi.", "speaker_wav": "alice", "language": "en", "file_name_or_path": "../.."}), 400),
    ("st-cosyvoice-empty-text", lambda c, p: c.post("/", json={"text": "", "speaker": "alice"}), 400),
    ("st-cosyvoice-unknown-speaker", lambda c, p: c.post("/", json={"text": "Hi.", "speaker": "nobody"}), 400),
    ("st-cosyvoice-bad-speed", lambda c, p: c.post("/?speed=fast", json={"text": "Hi.", "speaker": "alice"}), 422),
    ("upstream-get-json-body", lambda c, p: c.request("GET", "/inference_sft", json={"tts_text": "Hi."}), 422),
    ("json-nested-too-deeply", lambda c, p: c.post("/v1/audio/speech", content=b"[" * 200000 + b"]" * 200000,
                                                   headers={"content-type": "application/json"}), 400),
    ("xtts-settings-not-finite", lambda c, p: c.post("/set_tts_settings", content=b'{"temperature": Infinity}',
                                                     headers={"content-type": "application/json"}), 422),
    ("openai-speed-nan", lambda c, p: c.post("/v1/audio/speech", content=b'{"input": "Hi.", "speed": NaN}',
                                             headers={"content-type": "application/json"}), 400),
    ("openai-voice-object-without-id", lambda c, p: c.post("/v1/audio/speech", json=openai(voice={"name": "x"})), 400),
]


@pytest.mark.parametrize("call,status", [(call, status) for _, call, status in BAD_INPUTS],
                         ids=[name for name, _, _ in BAD_INPUTS])
def test_bad_input_gets_a_clear_4xx(client, prompts, call, status):
    assert_json_error(call(client, prompts), status)


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": "Basic dGVzdA=="}],
                         ids=["missing-key", "wrong-x-api-key", "wrong-bearer", "not-bearer"])
def test_api_key_is_required(server, headers):
    for path in ("/tts", "/v1/audio/speech"):
        response = httpx.post(server.url + path, headers=headers, data={"text": "Hi."})
        assert "key" in assert_json_error(response, 401).lower()
    assert_json_error(httpx.get(server.url + "/metrics", headers=headers), 401)


def test_the_server_keeps_serving_after_bad_input(server, client):
    assert httpx.get(server.url + "/health").status_code == 200
    response = client.post("/tts", data=SHORT)
    assert response.status_code == 200 and len(response.content) > 0
    assert "Traceback" not in server.stderr()


def test_32_concurrent_clients_get_audio_or_503(server):
    statuses: Counter = Counter()
    problems: list[str] = []
    lock = threading.Lock()

    def one_client(index: int) -> None:
        with server.client(timeout=300) as client:
            for attempt in range(2):
                response = client.post("/tts", data={"text": "Hi.", "seed": str(100 + 2 * index + attempt)})
                with lock:
                    statuses[response.status_code] += 1
                    if response.status_code == 200 and (len(response.content) == 0 or len(response.content) % 2):
                        problems.append(f"client {index}: bad body of {len(response.content)} bytes")
                    if response.status_code == 503 and not response.headers.get("retry-after"):
                        problems.append(f"client {index}: 503 without Retry-After")

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    print(f"[concurrency] 32 clients x 2 requests: {dict(statuses)} "
          f"(workers {WORKERS}, queue {MAX_QUEUE})")
    assert not any(thread.is_alive() for thread in threads)
    assert set(statuses) <= {200, 503} and not problems, (statuses, problems)
    assert statuses[200] >= WORKERS and statuses[503] > 0
    assert wait_for(lambda: server.metric("cosyvoice_queue_depth") == 0
                    and server.metric("cosyvoice_active_generations") == 0)


def test_a_client_that_hangs_up_stops_its_generation(server):
    cancelled_before = server.metric("cosyvoice_cancelled_generations_total")
    with server.client() as client, client.stream("POST", "/tts", data={**LONG, "speaker": "alice"}) as response:
        assert response.status_code == 200
        first = next(response.iter_raw())
        assert len(first) > 0
    # leaving the block closed the connection after the first chunk
    assert wait_for(lambda: server.metric("cosyvoice_cancelled_generations_total") == cancelled_before + 1
                    and server.metric("cosyvoice_active_generations") == 0), \
        "the generation should stop once the client has gone"
    chunks_after_stop = server.metric("cosyvoice_audio_chunks_total")
    assert not wait_for(lambda: server.metric("cosyvoice_audio_chunks_total") > chunks_after_stop, timeout_s=2)


def test_memory_is_flat_over_1000_small_requests(server):
    requests = [("POST", "/tts", {"data": {**SHORT, "text": f"Memory {i}."}}) for i in range(3)]
    requests += [("POST", "/v1/audio/speech", {"json": openai(input="Memory 0.", response_format="wav",
                                                              seed=SHORT["seed"])}),
                 ("GET", "/api/voices", {}), ("GET", "/v1/models", {}), ("GET", "/health", {})]
    with server.client() as client:
        def run(count: int) -> None:
            for i in range(count):
                method, path, kwargs = requests[i % len(requests)]
                response = client.request(method, path, **kwargs)
                assert response.status_code == 200, response.text
        run(100)       # the synthesis requests are cached from here on
        rss_100 = server.rss_kb()
        run(900)
        rss_1000 = server.rss_kb()
    print(f"[memory] RSS after 100 requests {rss_100} KiB, after 1000 {rss_1000} KiB "
          f"({100 * (rss_1000 - rss_100) / rss_100:+.2f}%)")
    assert abs(rss_1000 - rss_100) <= 0.05 * rss_100


# ---- hardening ------------------------------------------------------------------------------------

def flac_bomb(minutes: int = 30) -> bytes:
    """A FLAC of silence, 48 kHz stereo: about 0.3 MB that decodes to `minutes` of audio (about
    1 GB as float32 at 30 minutes), written block by block."""
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", 48000, 2, format="FLAC", subtype="PCM_16") as file:
        block = np.zeros((48000 * 60, 2), dtype=np.int16)
        for _ in range(minutes):
            file.write(block)
    return buffer.getvalue()


def peak_rss_rise_kb(server, action) -> int:
    """How far the server's resident memory rose above its level before `action` at its peak:
    the kernel's high-water mark, reset first (clear_refs 5), and a 5 ms sampler as a second look."""
    pid = server.process.pid
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    before = server.rss_kb()
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], server.rss_kb())
            time.sleep(0.005)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        action()
    finally:
        done.set()
        sampler.join()
    if hwm_reset:
        status = Path(f"/proc/{pid}/status").read_text()
        peak[0] = max(peak[0], int(next(line for line in status.splitlines()
                                        if line.startswith("VmHWM:")).split()[1]))
    return peak[0] - before


def test_a_decompression_bomb_is_refused_without_decoding_it(server, client):
    bomb = flac_bomb()
    assert len(bomb) < 1024 * 1024
    responses = []

    def send() -> None:
        responses.append(client.post("/inference_cross_lingual", data={"tts_text": "Hi."},
                                     files={"prompt_wav": ("bomb.flac", bomb, "audio/flac")}))
    rise_kb = peak_rss_rise_kb(server, send)
    print(f"[bomb] {len(bomb) / 1e6:.2f} MB FLAC of 30 min (48 kHz stereo): refused with "
          f"{responses[0].status_code}; peak RSS rise {rise_kb / 1024:.1f} MB")
    assert "30 s" in assert_json_error(responses[0], 400)
    assert rise_kb < 200 * 1024


def test_racing_registrations_of_one_name_give_one_201(server, fixture_dir):
    audio = prompt_files(fixture_dir)[0].read_bytes()
    start, statuses = threading.Barrier(4), []

    def register() -> None:
        with server.client() as client:
            start.wait()
            statuses.append(client.post("/api/voices", data={"name": "racer"},
                                        files={"audio": ("a.wav", audio, "audio/wav")}).status_code)
    threads = [threading.Thread(target=register) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    with server.client() as client:
        assert client.delete("/api/voices/racer").status_code == 200
    assert sorted(statuses) == [201, 409, 409, 409], statuses


def test_urls_of_a_voice_are_percent_encoded_and_not_built_from_the_host_header(server, client, fixture_dir):
    name = "x#y %"
    created = client.post("/api/voices", data={"name": name},
                          files={"audio": ("a.wav", prompt_files(fixture_dir)[0].read_bytes(), "audio/wav")})
    assert created.status_code == 201, created.text
    try:
        assert created.json()["audio_url"] == "/api/voices/x%23y%20%25/audio"
        assert client.get(created.json()["audio_url"]).status_code == 200
        speakers = client.get("/speakers", headers={"Host": "evil.example"}).json()
        preview = next(speaker["preview_url"] for speaker in speakers if speaker["name"] == name)
        assert preview == f"{server.url}/sample/x%23y%20%25.wav"
        assert client.get(preview).status_code == 200
    finally:
        assert client.delete(f"/api/voices/{quote(name, safe='')}").status_code == 200


def open_stream(server, text: str, seed: int) -> socket.socket:
    """POST /tts on a raw socket with a tiny receive buffer that is never read: once the socket
    buffers fill, the server's stream waits on the send and keeps its worker."""
    body = f"text={quote(text)}&seed={seed}&speaker=alice".encode()
    connection = socket.socket()
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    connection.connect(("127.0.0.1", server.port))
    connection.sendall(b"POST /tts HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: " + API_KEY.encode()
                       + b"\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: "
                       + str(len(body)).encode() + b"\r\n\r\n" + body)
    return connection


def test_a_request_whose_client_leaves_while_queued_is_dropped(server):
    first_chunks = server.metric("cosyvoice_first_chunk_seconds_count")
    long_text = ("Keep this worker busy with a long sentence that goes on and on, " * 7)[:MAX_TEXT_CHARS]
    holders = [open_stream(server, long_text, seed) for seed in (21, 22)]
    try:
        assert wait_for(lambda: server.metric("cosyvoice_active_generations") == WORKERS)
        queued = open_stream(server, "Nobody waits for this one.", 23)
        assert wait_for(lambda: server.metric("cosyvoice_queue_depth") == 1)
        queued.close()
        assert wait_for(lambda: server.metric("cosyvoice_queue_depth") == 0, timeout_s=10)
        assert server.metric("cosyvoice_active_generations") == WORKERS   # still streaming
    finally:
        for holder in holders:
            holder.close()
    assert wait_for(lambda: server.metric("cosyvoice_active_generations") == 0)
    # only the two streams computed a first chunk; the dropped request never reached the model
    assert server.metric("cosyvoice_first_chunk_seconds_count") == first_chunks + WORKERS
