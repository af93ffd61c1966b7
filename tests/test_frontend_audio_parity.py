"""Prompt-audio frontend: loading, resampling, the three prompt features, against frontend.npz."""
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf
from conftest import report_error

from cosyvoice.frontend.audio import AudioError, load_audio, resample
from cosyvoice.frontend.features import kaldi_fbank, mean_normalize, whisper_log_mel
from cosyvoice.frontend.speech_models import (MAX_PROMPT_SECONDS, MIN_PROMPT_SECONDS,
                                              PromptFeatureExtractor)
from cosyvoice.loading.model_dir import read_config

TOKEN_RATE = 16000  # the tokenizer and the speaker encoder both read 16 kHz audio


@pytest.fixture(scope="module")
def mel_params(model_dir) -> dict:
    return read_config(model_dir / "cosyvoice2.yaml").resolve("feat_extractor").kwargs


@pytest.fixture(scope="module")
def token_mel_ratio(model_dir) -> int:
    return read_config(model_dir / "cosyvoice2.yaml").resolve("token_mel_ratio")


@pytest.fixture(scope="module")
def extractor(model_dir, mel_params, token_mel_ratio) -> PromptFeatureExtractor:
    return PromptFeatureExtractor(model_dir, mel_params, token_mel_ratio)


@pytest.fixture(scope="module")
def prompt(fixture_dir) -> tuple[np.ndarray, int]:
    return load_audio(fixture_dir / "reference" / "prompt.wav")


@pytest.fixture(scope="module")
def ref(reference) -> dict:
    return reference("frontend")


def check(stage: str, actual, expected, atol: float) -> None:
    abs_err, _ = report_error(stage, actual, expected)
    assert abs_err <= atol, f"{stage}: max abs error {abs_err:.3e} > {atol:.0e}"


@pytest.mark.parity
def test_loaded_audio(prompt, ref):
    samples, rate = prompt
    check("audio 16k", resample(samples, rate, TOKEN_RATE)[None], ref["prompt_speech_16k"], 1e-6)


@pytest.mark.parity
def test_resampled_audio(prompt, ref, mel_params):
    samples, rate = prompt
    resampled = resample(samples, rate, mel_params["sampling_rate"])[None]
    check("audio resampled to the mel rate", resampled, ref["prompt_speech_24k"], 1e-5)


@pytest.mark.parity
def test_whisper_feats(ref, extractor):
    feats = whisper_log_mel(ref["prompt_speech_16k"][0], extractor.tokenizer.n_mels)
    check("whisper log-mel", feats, ref["whisper_feats"], 1e-4)
    assert feats.shape[2] == int(ref["whisper_feats_length"][0])


@pytest.mark.parity
def test_speech_tokens(ref, extractor):
    raw = extractor.tokenizer(ref["whisper_feats"])
    report_error("tokenizer onnx output", raw, ref["speech_tokenizer_onnx_output"])
    np.testing.assert_array_equal(raw, ref["speech_tokenizer_onnx_output"])
    tokens = extractor.speech_tokens(ref["prompt_speech_16k"][0])
    report_error("speech tokens", tokens, ref["speech_token_raw"])
    assert tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, ref["speech_token_raw"])


@pytest.mark.parity
def test_kaldi_fbank(ref, extractor):
    fbank = kaldi_fbank(ref["prompt_speech_16k"][0], extractor.speaker_encoder.num_bins)
    check("kaldi fbank", fbank, ref["kaldi_fbank_raw"], 5e-4)
    check("kaldi fbank, mean-normalised", mean_normalize(fbank), ref["kaldi_fbank"], 5e-4)


@pytest.mark.parity
def test_speaker_embedding(ref, extractor):
    raw = extractor.speaker_encoder(ref["kaldi_fbank"])
    check("campplus onnx output", raw, ref["campplus_onnx_output"], 1e-5)
    embedding = extractor.speaker_embedding(ref["prompt_speech_16k"][0])
    _, rel_err = report_error("speaker embedding", embedding, ref["spk_embedding"])
    assert rel_err <= 1e-3, f"speaker embedding: relative error {rel_err:.3e} > 1e-3"


@pytest.mark.parity
def test_speech_feat(ref, extractor):
    check("speech feat", extractor.speech_feat(ref["prompt_speech_24k"][0]), ref["speech_feat_raw"], 1e-4)


@pytest.mark.parity
def test_extract(prompt, ref, extractor):
    """The whole path from the file's samples, trimmed so that mel frames = ratio * tokens."""
    features = extractor.extract(*prompt)
    report_error("prompt speech tokens", features.speech_tokens, ref["prompt_speech_token"])
    assert features.speech_tokens.dtype == np.int32
    np.testing.assert_array_equal(features.speech_tokens, ref["prompt_speech_token"])
    check("prompt speech feat", features.speech_feat, ref["prompt_speech_feat"], 1e-4)
    assert features.speech_feat.shape[1] == extractor.token_mel_ratio * features.speech_tokens.shape[1]
    _, rel_err = report_error("prompt embedding", features.embedding, ref["spk_embedding"])
    assert rel_err <= 1e-3


# ---- input handling (no reference data needed beyond the prompt file) ----

def tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_stereo_is_averaged_to_mono():
    left, right = tone(0.1, 16000), np.zeros(1600, dtype=np.float32)
    for layout in (np.stack([left, right], axis=1), np.stack([left, right], axis=0)):
        samples, rate = load_audio(layout, 16000)
        assert rate == 16000 and samples.shape == (1600,) and samples.dtype == np.float32
        np.testing.assert_allclose(samples, left / 2, atol=1e-7)


def test_stereo_file_bytes_are_read():
    stereo = np.stack([tone(0.2, 22050), -tone(0.2, 22050) / 2], axis=1)
    buffer = io.BytesIO()
    sf.write(buffer, stereo, 22050, format="FLAC", subtype="PCM_16")
    samples, rate = load_audio(buffer.getvalue())
    assert rate == 22050 and samples.shape == (stereo.shape[0],)
    np.testing.assert_allclose(samples, stereo.mean(axis=1), atol=1e-4)


def test_int16_array_is_scaled():
    samples, _ = load_audio(np.array([0, 16384, -32768], dtype=np.int16), 16000)
    np.testing.assert_allclose(samples, [0.0, 0.5, -1.0])


def test_48k_input_is_resampled(extractor):
    samples, rate = load_audio(tone(1.0, 48000), 48000)
    resampled = resample(samples, rate, 16000)
    assert resampled.shape == (16000,)
    np.testing.assert_allclose(resampled[2000:-2000], tone(1.0, 16000)[2000:-2000], atol=1e-3)
    features = extractor.extract(samples, rate)
    tokens = features.speech_tokens.shape[1]
    assert tokens > 0 and features.speech_feat.shape[1] == extractor.token_mel_ratio * tokens
    assert features.embedding.shape[0] == 1 and features.embedding.dtype == np.float32


def test_extractor_is_thread_safe(extractor):
    samples = tone(1.0, 16000) + 0.01 * np.random.default_rng(0).standard_normal(16000, dtype=np.float32)
    expected = extractor.extract(samples, 16000)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: extractor.extract(samples, 16000), range(8)))
    for features in results:
        np.testing.assert_array_equal(features.speech_tokens, expected.speech_tokens)
        np.testing.assert_array_equal(features.embedding, expected.embedding)
        np.testing.assert_array_equal(features.speech_feat, expected.speech_feat)


def test_prompt_duration_limits(extractor):
    with pytest.raises(AudioError, match="at least"):
        extractor.extract(tone(MIN_PROMPT_SECONDS * 0.9, 16000), 16000)
    with pytest.raises(AudioError, match="at most"):
        extractor.extract(tone(MAX_PROMPT_SECONDS + 1, 16000), 16000)


def test_bad_input_is_rejected(tmp_path):
    with pytest.raises(AudioError, match="could not be read"):
        load_audio(b"this is not audio at all")
    with pytest.raises(AudioError, match="sample rate"):
        load_audio(tone(1.0, 16000))
    with pytest.raises(AudioError, match="empty"):
        load_audio(np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")
