"""Server parts on their own, with a stand-in model: settings, audio encoding, voice store, modes,
the speech service, and model generations."""
from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import threading
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient

from cosyvoice import InputError, Voice
from cosyvoice.server import build_service, create_app
from cosyvoice.server.admission import WorkerPool
from cosyvoice.server.audio_encoding import available_formats, encode_whole, stream_encoder
from cosyvoice.server import responses
from cosyvoice.server.cache import ResponseCache
from cosyvoice.server.errors import ApiError, ClientGone, Overloaded, describe_validation_error
from cosyvoice.server.loader import ModelLoader
from cosyvoice.server.metrics import Metrics
from cosyvoice.server.modes import Job, Mode, PromptUpload, open_stream
from cosyvoice.server.responses import audio_response
from cosyvoice.server.routers.xtts import remove_oldest
from cosyvoice.server.service import SpeechService
from cosyvoice.server.settings import Settings
from cosyvoice.server.synthesis import CachedSynthesis
from cosyvoice.server.voices import VoiceStore, check_name

from server_harness import REPO_ROOT, free_port, wait_for, wav_bytes

RATE = 24000


class FakeModel:
    """Stands in for cosyvoice.CosyVoice2 (or, with generation="CosyVoice3", its successor):
    counts prepared voices, and makes `chunks` chunks of 0.1 s per request, waiting on `gate`
    before each one when it is given."""

    sample_rate = RATE
    speaker_names: list[str] = []
    batch_counts = (None, None)

    def __init__(self, chunks: int = 5, gate: threading.Semaphore | None = None,
                 generation: str = "CosyVoice2"):
        self.chunks, self.gate, self.generation = chunks, gate, generation
        self.prepared = 0
        self.produced = 0

    def count_text_tokens(self, text: str) -> int:
        return len(text.split())

    def prepare_voice(self, samples, prompt_text="", sample_rate=None) -> Voice:
        self.prepared += 1
        return Voice(prompt_text, torch.zeros(1, len(prompt_text), dtype=torch.int32),
                     torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, 8), torch.zeros(1, 8, 80),
                     generation=self.generation)

    def cross_lingual(self, text, voice=None, stream=True, speed=1.0, seed=None):
        if not text.strip():
            raise InputError("the text to speak is empty")
        if voice is not None and voice.generation != self.generation:   # as the real model refuses
            raise InputError(f"this voice was prepared by a {voice.generation} model")

        def chunks():
            for _ in range(self.chunks):
                if self.gate is not None:
                    self.gate.acquire()
                self.produced += 1
                yield np.full(RATE // 10, 0.1, dtype=np.float32)
        return chunks()

    def zero_shot(self, text, voice=None, **options):
        return self.cross_lingual(text, voice, **options)


def settings_for(tmp_path: Path, **overrides) -> Settings:
    return Settings(model_dir=tmp_path, voices_dir=tmp_path / "voices", **overrides)


def tone(seconds: float = 3.0, rate: int = 16000) -> np.ndarray:
    return (0.3 * np.sin(np.arange(int(seconds * rate)) / rate * 2 * np.pi * 220)).astype(np.float32)


# ---- settings -----------------------------------------------------------------------------------

def test_settings_flags_override_environment_which_overrides_defaults():
    env = {"COSYVOICE_MODEL_DIR": "/models/a", "COSYVOICE_PORT": "7000", "COSYVOICE_API_KEY": "secret"}
    settings = Settings.from_args(["--port", "7001"], environ=env)
    assert settings.model_dir == Path("/models/a") and settings.port == 7001
    assert settings.api_key == "secret" and settings.host == "127.0.0.1" and settings.workers == 8


@pytest.mark.parametrize("device, workers, resolved", [("cpu", "0", 8), ("cuda", "0", 8), ("cuda:0", "0", 8),
                                                       ("cuda", "3", 3), ("cpu", "5", 5)])
def test_auto_workers_admit_a_batch_of_eight(device, workers, resolved):
    settings = Settings.from_args(["--model-dir", "m", "--device", device, "--workers", workers], environ={})
    assert settings.workers == resolved


@pytest.mark.parametrize("device, dtype, loaded", [("cpu", "auto", "float32"), ("cuda", "auto", "float16"),
                                                   ("cuda:1", "auto", "float16"), ("cuda", "bfloat16", "bfloat16"),
                                                   ("cpu", "float16", "float16")])
def test_auto_dtype_is_half_on_a_gpu_only(device, dtype, loaded):
    settings = Settings.from_args(["--model-dir", "m", "--device", device, "--dtype", dtype], environ={})
    assert settings.torch_dtype() == loaded


@pytest.mark.parametrize("argv", [[], ["--model-dir", "m", "--device", "tpu"], ["--model-dir", "m", "--port", "0"],
                                  ["--model-dir", "m", "--port", "x"],
                                  ["--model-dir", "m", "--dtype", "float64"], ["--model-dir", "m", "--workers", "-1"],
                                  ["--model-dir", "m", "--log-level", "verbose"]])
def test_settings_refuse_unusable_values(argv):
    with pytest.raises(SystemExit) as exit_info:
        Settings.from_args(argv, environ={})
    assert exit_info.value.code == 2


@pytest.mark.parametrize("value, origins", [(None, ["*"]), ("none", []), ("", []),
                                            ("http://a.example, http://b.example",
                                             ["http://a.example", "http://b.example"])])
def test_cors_is_open_to_any_origin_unless_narrowed_or_turned_off(value, origins):
    argv = ["--model-dir", "m"] + ([] if value is None else ["--cors-origins", value])
    assert Settings.from_args(argv, environ={}).cors_origin_list == origins


@pytest.mark.parametrize("argv, base", [([], "http://127.0.0.1:6006"), (["--host", "0.0.0.0"], ""),
                                        (["--host", "::1", "--port", "7000"], "http://[::1]:7000"),
                                        (["--host", "0.0.0.0", "--public-url", "https://box.example/"],
                                         "https://box.example")])
def test_links_start_with_the_public_url_or_the_bound_address_or_nothing(argv, base):
    assert Settings.from_args(["--model-dir", "m", *argv], environ={}).link_base == base


def test_server_exits_with_status_1_when_the_model_cannot_load(tmp_path):
    result = subprocess.run([sys.executable, str(REPO_ROOT / "server.py"), "--model-dir", str(tmp_path / "none"),
                             "--port", str(free_port()), "--voices-dir", str(tmp_path / "voices")],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 1
    assert "could not be loaded" in result.stderr


# ---- audio encoding -----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", available_formats())
def test_streamed_and_whole_encodings_decode_to_the_same_length(fmt):
    audio = tone(1.0, RATE)
    encoder = stream_encoder(fmt, RATE)
    streamed = b"".join(encoder.write(chunk) for chunk in np.array_split(audio, 4)) + encoder.close()
    whole = encode_whole(fmt, audio, RATE)
    for data in (streamed, whole):
        if fmt == "pcm":
            decoded, rate = np.frombuffer(data, "<i2"), RATE
        else:
            with av.open(io.BytesIO(data)) as container:
                frames = list(container.decode(audio=0))
            decoded = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
            rate = frames[0].sample_rate
        expected = RATE if fmt != "opus" else 48000      # FFmpeg decodes Opus at 48 kHz
        assert rate == expected
        # codecs pad up to a frame, and AAC/MP3 add encoder delay
        assert len(audio) * expected / RATE <= len(decoded) <= (len(audio) + 4096) * expected / RATE


def test_streamed_wav_has_an_open_ended_header_that_soundfile_reads():
    encoder = stream_encoder("wav", RATE)
    data = encoder.write(tone(0.5, RATE)) + encoder.close()
    assert data[4:8] == b"\xff\xff\xff\xff" and data[40:44] == b"\xff\xff\xff\xff"
    samples, rate = sf.read(io.BytesIO(data))
    assert rate == RATE and len(samples) == RATE // 2


def test_unknown_format_is_a_400():
    with pytest.raises(ApiError) as error:
        stream_encoder("wma", RATE)
    assert error.value.status == 400 and "mp3" in error.value.message


# ---- voice store --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", " x", "../x", "a/b", "a\\b", ".hidden", "[x]", "a\x00b", "x" * 65, "c:d"])
def test_bad_voice_names_are_refused(name):
    with pytest.raises(ApiError) as error:
        check_name(name)
    assert error.value.status == 400


@pytest.mark.parametrize("name", ["alice", "中文女", "Voice 2", "a-b_c.d"])
def test_good_voice_names(name):
    assert check_name(name) == name


def test_voices_are_imported_once_and_loaded_after_a_restart(tmp_path):
    folder = tmp_path / "voices"
    folder.mkdir()
    sf.write(folder / "[alice]Hello there..wav", tone(), 16000)
    sf.write(folder / "[.hidden]x.wav", tone(), 16000)
    (folder / "[broken]x.wav").write_bytes(b"not audio")
    (folder / "notes.txt").write_text("not a voice")
    model = FakeModel()
    counts = VoiceStore(folder).open(model)
    assert counts == {"loaded": 0, "prepared": 1, "skipped": 1} and model.prepared == 1

    store = VoiceStore(folder)
    store.register(model, "bob", "Bob here.", wav_bytes(tone(), 16000))
    restarted, fresh_model = VoiceStore(folder), FakeModel()
    assert restarted.open(fresh_model)["loaded"] == 2 and fresh_model.prepared == 0
    assert [info.name for info in restarted.list()] == ["alice", "bob"]
    assert restarted.get("alice").info.prompt_text == "Hello there."

    sf.write(folder / "[alice]Hello there..wav", tone(2.5), 16000)   # the file changed
    changed_model = FakeModel()
    VoiceStore(folder).open(changed_model)
    assert changed_model.prepared == 1


def test_default_voice_and_delete(tmp_path):
    folder = tmp_path / "voices"
    folder.mkdir()
    model, store = FakeModel(), VoiceStore(folder, default_name="carol")
    store.open(model)
    with pytest.raises(ApiError, match="no voice is registered"):
        store.resolve(None)
    store.register(model, "bob", "", wav_bytes(tone(), 16000))
    store.register(model, "carol", "", wav_bytes(tone(), 16000))
    assert store.resolve(None).info.name == "carol" and store.resolve("default").info.name == "carol"
    store.delete("carol")
    assert store.resolve(None).info.name == "bob"          # the first registered
    assert not list((folder / ".store").glob("carol.*"))
    with pytest.raises(ApiError) as error:
        store.delete("carol")
    assert error.value.status == 404


@pytest.mark.parametrize("imported", [True, False], ids=["imported", "registered"])
def test_a_prompt_file_removed_from_disk_is_a_404(tmp_path, imported):
    folder = tmp_path / "voices"
    folder.mkdir()
    if imported:
        sf.write(folder / "[alice]Hello..wav", tone(), 16000)
    store = VoiceStore(folder)
    store.open(FakeModel())
    if not imported:
        store.register(FakeModel(), "alice", "Hello.", wav_bytes(tone(), 16000))
    store.audio_path("alice").unlink()
    with pytest.raises(ApiError) as error:
        store.audio_path("alice")
    assert error.value.status == 404 and "alice" in error.value.message


def test_silent_prompt_is_refused(tmp_path):
    store = VoiceStore(tmp_path)
    with pytest.raises(InputError, match="silent"):
        store.register(FakeModel(), "quiet", "", wav_bytes(np.zeros(48000, dtype=np.float32), 16000))


# ---- speech service -----------------------------------------------------------------------------

def ready_service(tmp_path: Path, model: FakeModel, **overrides) -> SpeechService:
    """A service whose model counts as loaded and warmed (no warm-up run: it would use a chunk)."""
    settings = settings_for(tmp_path, **overrides)
    metrics, voices = Metrics(), VoiceStore(settings.voices_dir)
    loader = ModelLoader(settings, metrics, voices, model)
    loader.state = "ready"
    pool = WorkerPool(settings.workers, settings.max_queue, settings.retry_after_s, metrics)
    return SpeechService(settings, metrics, voices, loader, pool, ResponseCache(int(settings.cache_mb * 2**20)))


def sample(service: SpeechService, name: str) -> float:
    return service.metrics.registry.get_sample_value(name)


def job(text: str = "Hello.", key=None) -> Job:
    return Job(Mode.CROSS_LINGUAL, text, voice=None, cache_key=key)


def test_a_closed_synthesis_stops_within_one_chunk(tmp_path):
    gate = threading.Semaphore(0)
    model = FakeModel(chunks=50, gate=gate)
    service = ready_service(tmp_path, model)

    async def scenario() -> list:
        gate.release()                                       # let the first chunk through
        synthesis = await service.start(job())
        chunks = synthesis.chunks()
        await chunks.__anext__()
        pending = asyncio.ensure_future(chunks.__anext__())  # chunk 2 waits at the gate...
        await asyncio.sleep(0.1)
        synthesis.close()                                    # ...when the client leaves
        for _ in range(10):
            gate.release()
        await pending
        return [chunk async for chunk in chunks]
    assert asyncio.run(scenario()) == []
    assert model.produced == 2
    assert sample(service, "cosyvoice_cancelled_generations_total") == 1
    assert sample(service, "cosyvoice_active_generations") == 0


def test_full_queue_answers_503_and_bad_input_400(tmp_path):
    gate = threading.Semaphore(0)
    service = ready_service(tmp_path, FakeModel(gate=gate), workers=1, max_queue=1, retry_after_s=3)

    async def scenario() -> None:
        first = asyncio.ensure_future(service.start(job()))
        second = asyncio.ensure_future(service.start(job()))
        await asyncio.sleep(0.1)
        with pytest.raises(Overloaded) as refused:
            await service.start(job())
        assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "3"}
        for _ in range(20):
            gate.release()
        for pending in (first, second):
            synthesis = await pending
            assert len([chunk async for chunk in synthesis.chunks()]) == 5
        with pytest.raises(InputError):
            await service.start(job(text=" "))
    asyncio.run(scenario())
    assert sample(service, "cosyvoice_queue_depth") == 0 and sample(service, "cosyvoice_active_generations") == 0


def test_a_queued_request_whose_client_left_is_dropped_before_it_gets_a_worker(tmp_path):
    gate = threading.Semaphore(0)
    service = ready_service(tmp_path, FakeModel(gate=gate), workers=1, max_queue=2)

    async def scenario() -> None:
        gate.release()
        running = await service.start(job())                    # holds the only worker
        left = asyncio.Event()

        async def gone() -> bool:
            return left.is_set()
        queued = asyncio.ensure_future(service.start(job("Queued."), gone=gone))
        await asyncio.sleep(0.1)
        assert sample(service, "cosyvoice_queue_depth") == 1
        left.set()
        with pytest.raises(ClientGone):
            await queued
        assert sample(service, "cosyvoice_queue_depth") == 0
        running.close()
    asyncio.run(scenario())
    assert service._pool._in_flight == 0


def test_stopping_refuses_new_requests_and_ends_running_ones_uncached(tmp_path):
    gate = threading.Semaphore(0)
    model = FakeModel(chunks=50, gate=gate)
    service = ready_service(tmp_path, model)

    async def scenario() -> list:
        gate.release()
        synthesis = await service.start(job(key=("stopped",)))
        service.begin_shutdown()
        for _ in range(5):
            gate.release()
        chunks = [chunk async for chunk in synthesis.chunks()]
        with pytest.raises(Overloaded):
            await service.start(job("New."))
        return chunks
    assert len(asyncio.run(scenario())) == 1 and model.produced == 1
    assert service.cache.get(("stopped",)) is None


def test_repeated_requests_come_from_the_cache(tmp_path):
    model = FakeModel(chunks=3)
    service = ready_service(tmp_path, model)

    async def speak() -> tuple[list[np.ndarray], bool]:
        synthesis = await service.start(job(key=("same",)))
        return [chunk async for chunk in synthesis.chunks()], synthesis.from_cache

    first, first_cached = asyncio.run(speak())
    again, again_cached = asyncio.run(speak())
    assert (first_cached, again_cached) == (False, True) and model.produced == 3
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


class RecordingModel:
    """Records which model call a job became."""

    def __init__(self):
        self.calls = []

    def prepare_voice(self, samples, prompt_text="", sample_rate=None):
        return ("prepared", prompt_text, sample_rate)

    def __getattr__(self, mode):
        def call(*args, **options):
            self.calls.append((mode, args, options))
            return iter(())
        return call


@pytest.mark.parametrize("mode, expected_args", [
    (Mode.ZERO_SHOT, ("Text.",)), (Mode.CROSS_LINGUAL, ("Text.",)),
    (Mode.INSTRUCT2, ("Text.", "Softly.")), (Mode.SFT, ("Text.", "spk"))])
def test_each_mode_is_one_model_call(mode, expected_args):
    model = RecordingModel()
    upload = PromptUpload(wav_bytes(tone(), 16000), "Hi.")
    open_stream(model, Job(mode, "Text.", voice=None if mode is Mode.SFT else upload, speaker="spk",
                           instruct="Softly.", speed=1.5, seed=7, stream=False))
    [(called, args, options)] = model.calls
    assert called == mode.value and args == expected_args
    assert options.pop("voice", None) == (None if mode is Mode.SFT else ("prepared", "Hi.", 16000))
    assert options == {"stream": False, "speed": 1.5, "seed": 7}
    assert Mode.for_voice("", "") is Mode.CROSS_LINGUAL and Mode.for_voice("", "Hi.") is Mode.ZERO_SHOT
    assert Mode.for_voice("Softly.", "Hi.") is Mode.INSTRUCT2 and str(Mode.SFT) == "sft"


class FakeRequest:
    def __init__(self, gone: bool):
        self.gone = gone

    async def is_disconnected(self) -> bool:
        return self.gone


@pytest.mark.parametrize("gone", [False, True], ids=["stayed", "left"])
def test_a_whole_response_is_encoded_only_for_a_client_still_there(monkeypatch, gone):
    encoded = []

    def encode_whole_spy(fmt, audio, sample_rate):
        encoded.append(len(audio))
        return b"audio"
    monkeypatch.setattr(responses, "encode_whole", encode_whole_spy)
    synthesis = CachedSynthesis([np.zeros(RATE // 10, dtype=np.float32)] * 3)
    response = asyncio.run(audio_response(FakeRequest(gone), synthesis, "mp3", RATE, stream=False))
    if gone:
        assert response.status_code == 499 and encoded == []
    else:
        assert response.status_code == 200 and response.body == b"audio" and encoded == [3 * RATE // 10]


def test_batch_sizes_are_exported_as_histograms():
    metrics = Metrics()
    llm_steps, flow_batches = [0, 3, 2], [0, 0, 0, 1]   # [n] = runs that served n requests
    metrics.watch_batches(llm_steps, flow_batches)
    llm_steps[1] += 1                                     # read at scrape time, not registration
    text = metrics.render().decode()
    for line in ('cosyvoice_llm_batch_size_bucket{le="1.0"} 4.0', 'cosyvoice_llm_batch_size_bucket{le="2.0"} 6.0',
                 'cosyvoice_llm_batch_size_bucket{le="+Inf"} 6.0', "cosyvoice_llm_batch_size_count 6.0",
                 "cosyvoice_llm_batch_size_sum 8.0", 'cosyvoice_flow_batch_size_bucket{le="3.0"} 1.0',
                 "cosyvoice_flow_batch_size_sum 3.0"):
        assert line in text, line


# ---- model generations --------------------------------------------------------------------------

def voices_of_cosyvoice2(folder: Path) -> VoiceStore:
    """An imported voice 'alice' and a registered voice 'bob', prepared by a CosyVoice2 model."""
    folder.mkdir()
    sf.write(folder / "[alice]Hello there..wav", tone(), 16000)
    store = VoiceStore(folder)
    store.open(FakeModel())
    store.register(FakeModel(), "bob", "Bob here.", wav_bytes(tone(), 16000))
    return store


def test_voices_of_another_generation_are_prepared_again_from_their_prompt_audio(tmp_path):
    folder = tmp_path / "voices"
    created = {info.name: info.created for info in voices_of_cosyvoice2(folder).list()}
    cosyvoice3 = FakeModel(generation="CosyVoice3")
    store = VoiceStore(folder)
    assert store.open(cosyvoice3) == {"loaded": 0, "prepared": 2, "skipped": 0} and cosyvoice3.prepared == 2
    for name in ("alice", "bob"):
        stored = store.resolve(name)
        assert stored.voice.generation == "CosyVoice3" and stored.info.created == created[name]
    assert Voice.load(folder / ".store" / "bob.voice").generation == "CosyVoice3"
    restarted = FakeModel(generation="CosyVoice3")
    assert VoiceStore(folder).open(restarted)["loaded"] == 2 and restarted.prepared == 0


def test_the_app_names_its_generation_and_refuses_a_voice_it_cannot_prepare_again(tmp_path):
    folder = tmp_path / "voices"
    voices_of_cosyvoice2(folder)
    (folder / ".store" / "bob.wav").unlink()          # bob's prompt audio is gone
    settings = settings_for(tmp_path)
    app = create_app(settings, build_service(settings, FakeModel(chunks=2, generation="CosyVoice3")))
    with TestClient(app) as client:
        assert wait_for(lambda: client.get("/ready").status_code == 200, timeout_s=30)
        assert client.get("/health").json() == {"status": "ok", "model": "ready", "generation": "CosyVoice3"}
        models = client.get("/v1/models").json()["data"]
        assert models[0]["id"] == "cosyvoice3" and {model["generation"] for model in models} == {"CosyVoice3"}
        spoken = client.post("/v1/audio/speech", json={"input": "Hello.", "voice": "alice",
                                                       "response_format": "pcm"})
        assert spoken.status_code == 200 and len(spoken.content) == 2 * 2 * RATE // 10
        refused = client.post("/v1/audio/speech", json={"input": "Hello.", "voice": "bob"})
        message = refused.json()["error"]["message"]
        assert refused.status_code == 409 and all(word in message for word in ("bob", "CosyVoice2", "CosyVoice3"))
        native = client.post("/tts", data={"text": "Hello.", "speaker": "bob"})
        assert native.status_code == 409 and "CosyVoice2" in native.json()["detail"]
        assert client.delete("/api/voices/bob").status_code == 200


def test_tts_to_file_keeps_only_the_newest_files(tmp_path):
    for age, name in enumerate(["e", "d", "c", "b", "a"]):   # a is the oldest
        path = tmp_path / f"{name}.wav"
        path.write_bytes(b"RIFF")
        os.utime(path, ns=(0, (10 - age) * 10**9))
    (tmp_path / "notes.txt").write_text("not audio")
    remove_oldest(tmp_path, keep=3)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["c.wav", "d.wav", "e.wav", "notes.txt"]


def test_a_body_that_is_not_json_is_named_so():
    error = RequestValidationError([{"type": "json_invalid", "loc": ("body", 9), "msg": "JSON decode error",
                                     "input": {}, "ctx": {"error": "Expecting value"}}])
    assert describe_validation_error(error) == (
        "invalid request: the body is not valid JSON (Expecting value at character 9)", None)
