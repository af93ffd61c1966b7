"""The inference API: modes, voices, streaming, concurrency and clear input errors."""
import threading
import time

import numpy as np
import pytest
import torch

import cosyvoice
from cosyvoice import InputError, Voice
from cosyvoice.inference.synthesis import ModelInput

SHORT_TEXT = "Nice to meet you."


@pytest.fixture(scope="module")
def tts(model_dir):
    return cosyvoice.load(model_dir)


@pytest.fixture(scope="module")
def tts_flow_batched(model_dir):
    """The GPU default (flow decoder calls of concurrent requests batched), here on the CPU."""
    return cosyvoice.load(model_dir, flow_batch=4)


@pytest.fixture(scope="module")
def prompt_wav(fixture_dir):
    return fixture_dir / "reference" / "prompt.wav"


@pytest.fixture(scope="module")
def voice(tts, prompt_wav, fixture_dir):
    transcript = (fixture_dir / "reference" / "prompt.txt").read_text(encoding="utf-8").strip()
    return tts.prepare_voice(prompt_wav, transcript)


def _speak(iterator) -> np.ndarray:
    chunks = list(iterator)
    assert all(c.dtype == np.float32 and c.ndim == 1 for c in chunks)
    return np.concatenate(chunks)


def test_modes_give_finite_audio(tts, voice):
    for audio in (_speak(tts.zero_shot(SHORT_TEXT, voice=voice, seed=1)),
                  _speak(tts.cross_lingual(SHORT_TEXT, voice=voice, seed=1)),
                  _speak(tts.instruct2(SHORT_TEXT, "Speak softly.", voice=voice, seed=1))):
        assert len(audio) > 0 and np.isfinite(audio).all() and np.abs(audio).max() <= 1.0


def test_same_seed_same_audio_and_saved_voice_reuses_features(tts, voice, tmp_path):
    path = tmp_path / "alice.voice"
    voice.save(path)
    loaded = Voice.load(path)
    assert loaded.prompt_text == voice.prompt_text
    first = _speak(tts.zero_shot(SHORT_TEXT, voice=voice, seed=3))
    again = _speak(tts.zero_shot(SHORT_TEXT, voice=loaded, seed=3))
    assert np.array_equal(first, again)


def test_prompt_audio_array_at_another_rate(tts, prompt_wav):
    import soundfile as sf
    samples, rate = sf.read(prompt_wav, dtype="float32")
    stereo_48k = np.stack([samples, samples], axis=1).repeat(3, axis=0)
    voice = tts.prepare_voice(stereo_48k, "", sample_rate=rate * 3)
    assert voice.speech_tokens.shape[1] > 0
    assert voice.speech_feat.shape[1] == tts.settings.token_mel_ratio * voice.speech_tokens.shape[1]


def test_streaming_renders_the_same_length_as_one_shot(tts, voice):
    request = ModelInput(torch.zeros(1, 0, dtype=torch.int32), torch.zeros(1, 0, dtype=torch.int32),
                         torch.zeros(1, 0, dtype=torch.int32), voice.speech_tokens, voice.speech_feat,
                         voice.embedding)
    tokens = list(range(100, 300))
    streamed = list(tts.synthesizer.synthesize(request, stream=True, source_tokens=tokens))
    whole = list(tts.synthesizer.synthesize(request, stream=False, source_tokens=tokens))
    assert len(streamed) > 2 and len(whole) == 1
    assert sum(map(len, streamed)) == len(whole[0]) == len(tokens) * tts.settings.token_mel_ratio * tts.synthesizer.hift.samples_per_frame


def test_speed_changes_length(tts, voice):
    normal = _speak(tts.cross_lingual(SHORT_TEXT, voice=voice, seed=5))
    fast = _speak(tts.cross_lingual(SHORT_TEXT, voice=voice, seed=5, speed=2.0))
    assert abs(len(fast) - len(normal) / 2) <= 2 * tts.synthesizer.hift.samples_per_frame


def test_long_text_is_spoken_segment_by_segment(tts, voice):
    text = "这是一个用来测试分段的句子，里面有足够多的汉字。" * 6
    segments = tts._segments(text, text_frontend=True)
    assert len(segments) >= 2
    chunks = list(tts.cross_lingual(text, voice=voice, seed=2))
    assert len(chunks) == len(segments)


CONCURRENT_AUDIO_TOL = 5e-3   # the end-to-end parity tolerance (HiFT's phase integrates tiny mel changes)


@pytest.mark.parametrize("model", ["tts", "tts_flow_batched"])
def test_concurrent_requests_match_their_solo_runs(model, voice, request):
    tts = request.getfixturevalue(model)
    seeds = [11, 12, 13]
    solo = {seed: _speak(tts.cross_lingual(SHORT_TEXT, voice=voice, seed=seed, stream=True)) for seed in seeds}
    results, errors = {}, []

    def run(seed):
        try:
            results[seed] = _speak(tts.cross_lingual(SHORT_TEXT, voice=voice, seed=seed, stream=True))
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors
    for seed in seeds:   # same tokens; the batched flow differs from the solo one by float rounding
        assert results[seed].shape == solo[seed].shape, seed
        error = float(np.abs(results[seed] - solo[seed]).max())
        print(f"[concurrency] seed {seed}: max abs diff vs solo {error:.2e}")
        assert error < CONCURRENT_AUDIO_TOL, seed
    # the tolerance tells requests apart: another seed's audio is further off
    for seed, other in zip(seeds, seeds[1:]):
        shared = min(len(solo[seed]), len(solo[other]))
        assert float(np.abs(solo[seed][:shared] - solo[other][:shared]).max()) > CONCURRENT_AUDIO_TOL


@pytest.mark.parametrize("call, message", [
    (lambda tts, v: tts.zero_shot("", voice=v), "empty"),
    (lambda tts, v: tts.cross_lingual("   ", voice=v), "empty"),
    (lambda tts, v: tts.cross_lingual("。！？……", voice=v), "nothing to speak"),
    (lambda tts, v: tts.instruct2("Hello.", "  ", voice=v), "instruction"),
    (lambda tts, v: tts.sft("Hello.", "nobody"), "unknown speaker 'nobody'"),
    (lambda tts, v: tts.zero_shot("Hello.", voice="nobody"), "unknown voice 'nobody'"),
    (lambda tts, v: tts.cross_lingual("Hello."), "needs a voice"),
    (lambda tts, v: tts.cross_lingual("Hello.", voice=v, speed=0), "speed"),
    (lambda tts, v: tts.cross_lingual("Hello.", voice=v, speed=1.5, stream=True), "speed"),
    (lambda tts, v: tts.cross_lingual("Hello.", np.ones(4000, np.float32) / 4, sample_rate=16000), "at least 0.5 s"),
    (lambda tts, v: tts.cross_lingual("Hello.", np.ones(16000 * 31, np.float32) / 4, sample_rate=16000),
     "at most 30 s"),
    (lambda tts, v: tts.cross_lingual("Hello.", np.zeros(16000 * 3, np.float32), sample_rate=16000), "silent"),
    (lambda tts, v: tts.cross_lingual("!!! ... ???", voice=v), "nothing to speak"),
    (lambda tts, v: tts.cross_lingual("Hello.", b"not audio at all"), "audio"),
])
def test_bad_requests_raise_input_error_at_call_time(tts, voice, call, message):
    with pytest.raises(InputError, match=message):
        call(tts, voice)


def test_zero_shot_without_transcript_is_refused(tts, prompt_wav):
    with pytest.raises(InputError, match="transcript"):
        tts.zero_shot("Hello.", "", prompt_wav)


def test_sft_speakers_from_spk2info(model_dir, tmp_path, voice):
    model_copy = tmp_path / "model"
    model_copy.mkdir()
    for item in model_dir.iterdir():
        (model_copy / item.name).symlink_to(item)
    torch.save({"narrator": {"embedding": voice.embedding}}, model_copy / "spk2info.pt")
    tts = cosyvoice.load(model_copy)
    assert list(tts.speakers) == ["narrator"]
    audio = _speak(tts.sft(SHORT_TEXT, "narrator", seed=4))
    assert len(audio) > 0 and np.isfinite(audio).all()


def test_a_seeded_stream_does_not_depend_on_the_llm_pace(tts, voice):
    """The batched LLM samples on its own thread while the reader's thread draws the vocoder's
    noise: whether the LLM finishes before the first chunk is rendered or long after must not
    change the seeded audio."""
    sample = tts.synthesizer.llm.llm.sampling      # the SpeechLM's own sampler, behind the batcher
    text = "Nice to meet you. This is a longer sentence for the streaming test."   # two chunks
    request = ModelInput(tts._segments(text, True)[0], voice.prompt_text_ids, voice.speech_tokens,
                         voice.speech_tokens, voice.speech_feat, voice.embedding)

    def speak(seconds_per_token):
        def paced(logp, decoded, generator=None):
            time.sleep(seconds_per_token)
            return sample(logp, decoded, generator=generator)
        return _speak(tts.synthesizer.synthesize(request, stream=True, sampling=paced,
                                                 generator=torch.Generator().manual_seed(5)))

    fast, slow = speak(0.0), speak(0.04)   # 0.04 s: still sampling while the first chunk renders
    assert fast.shape == slow.shape and np.array_equal(fast, slow)
