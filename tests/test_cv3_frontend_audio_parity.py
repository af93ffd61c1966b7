"""CosyVoice3 prompt-audio frontend against the CV3 fixture's frontend.npz.

Same features as CosyVoice2 except the speech tokenizer file (speech_tokenizer_v3.onnx, same I/O)
and the prompt mel's fmax (the yaml's `fmax: null`, i.e. Nyquist = 12 kHz at 24 kHz). Sizes come
from the arrays, so a fixture of other sizes passes too. The fixture folder is env
COSYVOICE3_FIXTURES (default ../shared/fixtures/cosyvoice3-tiny; see conftest.py).

Tolerances: the features 1e-4 absolute (for the Kaldi fbank see test_frontend_audio_parity.py:
our float32 operation order repeats the reference's, and the bound derived there covers any
input; for the whole path's mel above the prompt's band see `test_extract`), token ids exact,
the campplus output 1e-5, the embedding 1e-3 relative.
"""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import report_error

from cosyvoice.frontend.audio import _sinc_kernels, load_audio
from cosyvoice.frontend.features import (MelParams, kaldi_fbank, mean_normalize, prompt_mel,
                                         slaney_mel_filterbank, whisper_log_mel)
from cosyvoice.frontend.speech_models import PromptFeatureExtractor
from cosyvoice.loading.model_dir import read_config

pytestmark = pytest.mark.parity

YAML = "cosyvoice3.yaml"
TOKENIZER = "speech_tokenizer_v3.onnx"


@pytest.fixture(scope="module")
def cv3_dir(cv3_fixture_dir) -> Path:
    return cv3_fixture_dir


@pytest.fixture(scope="module")
def ref(cv3_reference) -> dict:
    return cv3_reference("frontend")


@pytest.fixture(scope="module")
def config(cv3_dir):
    return read_config(cv3_dir / "model" / YAML)


@pytest.fixture(scope="module")
def mel_params(config) -> dict:
    return config.resolve("feat_extractor").kwargs


@pytest.fixture(scope="module")
def extractor(cv3_dir, mel_params, config) -> PromptFeatureExtractor:
    return PromptFeatureExtractor(cv3_dir / "model", mel_params, config.resolve("token_mel_ratio"),
                                  speech_tokenizer=TOKENIZER)


@pytest.fixture(scope="module")
def prompt(cv3_dir) -> tuple[np.ndarray, int]:
    return load_audio(cv3_dir / "reference" / "prompt.wav")


def check(stage: str, actual, expected, atol: float) -> None:
    abs_err, _ = report_error(f"cv3 {stage}", actual, expected)
    assert abs_err <= atol, f"{stage}: max abs error {abs_err:.3e} > {atol:.0e}"


def test_prompt_mel_goes_up_to_nyquist(mel_params):
    """`fmax: null` reaches the extractor as None, which means sampling_rate / 2."""
    assert mel_params["fmax"] is None
    params = MelParams(**mel_params)
    nyquist = params.sampling_rate / 2
    np.testing.assert_array_equal(
        slaney_mel_filterbank(params.sampling_rate, params.n_fft, params.num_mels, params.fmin, None),
        slaney_mel_filterbank(params.sampling_rate, params.n_fft, params.num_mels, params.fmin, nyquist))


def test_whisper_feats(ref, extractor):
    feats = whisper_log_mel(ref["prompt_speech_16k"][0], extractor.tokenizer.n_mels)
    check("whisper log-mel", feats, ref["whisper_feats"], 1e-4)
    assert feats.shape[2] == int(ref["whisper_feats_length"][0])


def test_speech_tokens(ref, extractor):
    raw = extractor.tokenizer(ref["whisper_feats"])
    np.testing.assert_array_equal(raw, ref["speech_tokenizer_onnx_output"])
    tokens = extractor.speech_tokens(ref["prompt_speech_16k"][0])
    report_error("cv3 speech tokens", tokens, ref["speech_token_raw"])
    assert tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, ref["speech_token_raw"])


def test_kaldi_fbank(ref, extractor):
    fbank = kaldi_fbank(ref["prompt_speech_16k"][0], extractor.speaker_encoder.num_bins)
    check("kaldi fbank", fbank, ref["kaldi_fbank_raw"], 1e-4)
    check("kaldi fbank, mean-normalised", mean_normalize(fbank), ref["kaldi_fbank"], 1e-4)


def test_speaker_embedding(ref, extractor):
    check("campplus onnx output", extractor.speaker_encoder(ref["kaldi_fbank"]),
          ref["campplus_onnx_output"], 1e-5)
    embedding = extractor.speaker_embedding(ref["prompt_speech_16k"][0])
    _, rel_err = report_error("cv3 speaker embedding", embedding, ref["spk_embedding"])
    assert rel_err <= 1e-3


def test_speech_feat(ref, extractor, mel_params):
    """The 12 kHz mel; an 8 kHz one (CosyVoice2's) is far off, so this does test fmax."""
    speech_24k = ref["prompt_speech_24k"][0]
    check("speech feat (fmax Nyquist)", extractor.speech_feat(speech_24k), ref["speech_feat_raw"], 1e-4)
    cv2_mel = prompt_mel(speech_24k, MelParams(**{**mel_params, "fmax": 8000}))
    assert np.max(np.abs(cv2_mel - ref["speech_feat_raw"])) > 1e-2


def resampling_mel_bound(samples: np.ndarray, rate: int, params: MelParams, mel: np.ndarray) -> np.ndarray:
    """How far two float32 evaluations of the same sinc resampler (ours, the reference's) can move
    the prompt mel [T, num_mels] whose reference values are `mel`: per output sample a K-tap float32
    dot product with float32 taps is within (K + 2) u sum_i |h_i x_{n-i}| of the exact one, for each
    of the two; a frame's STFT bins move by at most sum_n w_n |da_n| (|.| and sqrt(. + 1e-9) are
    1-Lipschitz), a mel band by that times its filter's sum, and its floored log accordingly.
    Used above the prompt's own Nyquist frequency, where a 16 kHz prompt resampled to 24 kHz holds
    nothing but the resampler's stopband leakage and rounding (the mel is near its floor)."""
    divisor = math.gcd(rate, params.sampling_rate)
    orig, new = rate // divisor, params.sampling_rate // divisor
    kernels, half_width = _sinc_kernels(orig, new)
    taps = torch.from_numpy(np.abs(kernels.numpy()).astype(np.float64))
    x = torch.from_numpy(np.abs(samples).astype(np.float64))
    padded = torch.nn.functional.pad(x[None, None], (half_width, half_width + orig))
    length = -(-samples.size * new // orig)
    weighted = torch.nn.functional.conv1d(padded, taps, stride=orig)[0].T.reshape(-1)[:length]
    audio_error = 2 * (taps.shape[-1] + 2) * 2.0 ** -24 * weighted.numpy()           # ours + reference
    pad = (params.n_fft - params.hop_size) // 2
    audio_error = np.pad(audio_error, pad, mode="reflect")
    count = (audio_error.size - params.win_size) // params.hop_size + 1
    frames = audio_error[np.arange(params.win_size)[None] + params.hop_size * np.arange(count)[:, None]]
    window = np.hanning(params.win_size + 1)[:-1]                                     # periodic Hann
    bin_error = frames @ window                                                       # [T]
    filters = slaney_mel_filterbank(params.sampling_rate, params.n_fft, params.num_mels,
                                    params.fmin, params.fmax).astype(np.float64)
    band_error = bin_error[:, None] * filters.sum(1)[None]                            # [T, num_mels]
    value, floor = np.exp(mel.astype(np.float64)), 1e-5
    up = np.log(np.maximum(value + band_error, floor) / value)
    down = np.log(value / np.maximum(value - band_error, floor))
    return np.maximum(up, down)


def test_extract(prompt, ref, extractor):
    """The whole path from the file's samples, trimmed so that mel frames = ratio * tokens.

    Mel bands within the prompt's own band (up to its Nyquist frequency, 8 kHz for a 16 kHz
    prompt) agree to 1e-4 as in CosyVoice2. The bands reaching above it hold nothing of the prompt,
    only the resampler's stopband leakage and float32 rounding near the mel floor, so there two
    float32 resamplers (ours, the reference's) differ by what their rounding can do to a floored
    log (`resampling_mel_bound`; the 1e-7 audio difference shows as ~1e-3 there). The mel itself
    is held to 1e-4 in every band by `test_speech_feat`, from the reference's 24 kHz audio."""
    samples, rate = prompt
    features = extractor.extract(samples, rate)
    report_error("cv3 prompt speech tokens", features.speech_tokens, ref["prompt_speech_token"])
    assert features.speech_tokens.dtype == np.int32
    np.testing.assert_array_equal(features.speech_tokens, ref["prompt_speech_token"])
    assert features.speech_feat.shape == ref["prompt_speech_feat"].shape
    assert features.speech_feat.shape[1] == extractor.token_mel_ratio * features.speech_tokens.shape[1]
    params = extractor.mel_params
    filters = slaney_mel_filterbank(params.sampling_rate, params.n_fft, params.num_mels,
                                    params.fmin, params.fmax)
    fft_hz = np.linspace(0.0, params.sampling_rate / 2, params.n_fft // 2 + 1)
    above_prompt_band = (filters[:, fft_hz > min(rate, params.sampling_rate) / 2] > 0).any(axis=1)
    frames = features.speech_feat.shape[1]
    bound = resampling_mel_bound(samples, rate, params, ref["speech_feat_raw"][0])[:frames]
    allowed = 1e-4 + np.where(above_prompt_band[None], bound, 0.0)
    error = np.abs(features.speech_feat[0].astype(np.float64) - ref["prompt_speech_feat"][0])
    report_error("cv3 prompt speech feat, all bands", features.speech_feat, ref["prompt_speech_feat"])
    print(f"[parity] cv3 prompt speech feat: in the prompt's band {error[:, ~above_prompt_band].max():.3e}, "
          f"above it {error[:, above_prompt_band].max() if above_prompt_band.any() else 0.0:.3e} "
          f"(max error/allowed {np.max(error / allowed):.3f})")
    assert np.all(error <= allowed)
    _, rel_err = report_error("cv3 prompt embedding", features.embedding, ref["spk_embedding"])
    assert rel_err <= 1e-3


def test_tokenizer_may_be_a_name_or_a_path(cv3_dir, mel_params, ref):
    model_dir = cv3_dir / "model"
    for tokenizer in (TOKENIZER, model_dir / TOKENIZER):
        extractor = PromptFeatureExtractor(model_dir, mel_params, speech_tokenizer=tokenizer)
        np.testing.assert_array_equal(extractor.tokenizer(ref["whisper_feats"]),
                                      ref["speech_tokenizer_onnx_output"])
