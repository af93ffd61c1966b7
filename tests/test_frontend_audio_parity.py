"""Prompt-audio frontend: loading, resampling, the three prompt features, against frontend.npz."""
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf
from conftest import report_error

import cosyvoice.frontend.speech_models as speech_models
from cosyvoice.frontend.audio import AudioError, load_audio, resample
from cosyvoice.frontend.features import (kaldi_fbank, kaldi_mel_banks, mean_normalize, povey_window,
                                         whisper_log_mel)
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
    """Within 1e-4 of the reference's float32 values because we repeat its float32 operation
    order; what still differs is FFT rounding, in whole frames (other choices are off by more
    on this prompt: float64 throughout by 2.9e-4, float64 filterbank weights by 2.2e-4, another
    float32 FFT by 5.7e-4). On any input the two stay within twice the float32 bound derived
    below, each being within it of the exact value (`test_kaldi_fbank_float32_bound*`)."""
    fbank = kaldi_fbank(ref["prompt_speech_16k"][0], extractor.speaker_encoder.num_bins)
    check("kaldi fbank", fbank, ref["kaldi_fbank_raw"], 1e-4)
    check("kaldi fbank, mean-normalised", mean_normalize(fbank), ref["kaldi_fbank"], 1e-4)


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


# ---- the Kaldi fbank against its definition, on any input ----
#
# Without the reference implementation at hand, new audio is checked against `fbank64`, a float64
# transcription of the Kaldi definition, and `float32_bound` bounds (to first order in the unit
# roundoff u = 2^-24, worst case over the roundings) how far any float32 evaluation in our
# operation order can be from it. Per frame x (400 samples), mean mu, ubar = x - mu,
# v_n = ubar_n - a ubar_{n-1} (ubar_{-1} = ubar_0, a = 0.97), y = w v (w the Povey window),
# Y = DFT_512(y), P = |Y|^2, m = B P (B the mel filterbank), out = log max(m, eps):
#
#   1. mean: |d mu| <= (L - 1) u sum|x| / L + u |mu| in any summation order. It is the same for
#      every sample, so pre-emphasis turns it into the constant (1 - a) d mu, which the window
#      shapes: (1 - a) |d mu| |W_k| in bin k (W the window's DFT), i.e. only in the lowest bins.
#   2. the elementwise steps x - mu, fl(a) ubar, the subtraction and the window product err by
#      e_n <= w_n (u|ubar_n| + (2a u + |fl(a) - a|) |ubar_{n-1}| + u|v_n|) + |v_n| omega_n + u|y_n|,
#      with omega_n the float32 window's error (3.); they add at most sum_n e_n to any bin.
#   3. window: 0.5 - 0.5 cos(theta_n) in float32 is within u (theta_n |sin theta_n| + 1 + hann_n)
#      (argument to 2u theta, cosine to one ulp), then the power 0.85 and its ulp.
#   4. FFT, 512 = 2^9 points: each output is reached from each input along one path of 9
#      butterflies, each exact to a relative eta = u + gamma_4 (sqrt 2 + u) (Higham, Accuracy and
#      Stability of Numerical Algorithms, 2nd ed., section 24.1, twiddles to u), so
#      |dY_k| <= ((1 + eta)^9 - 1) ||y||_1 in every bin. In all, per bin,
#      Delta_k = sum e + (1 - a) |d mu| |W_k| + ((1 + eta)^9 - 1) (||y||_1 + sum e + (1 - a) |d mu| sum w).
#   5. band power: sum_k B_jk (|Y_k + dY_k|^2 - |Y_k|^2) <= 2 sqrt(m_j sum_k B_jk Delta_k^2)
#      + sum_k B_jk Delta_k^2 (Cauchy-Schwarz); |.|^2 in float32 adds 5u relative, the sum of n_j
#      nonnegative products (n_j + 1) u; the float32 filterbank weights are off by beta_jk (6.),
#      adding sum_k beta_jk (|Y_k| + Delta_k)^2.
#   6. filterbank: (mel - left) / (centre - left) with mel = 1127 log(1 + f / 700) good to
#      u (2254 + 3 mel) and the edges mel_low + i delta to 2.5 u edge; the clamp of min(rising,
#      falling) at 0 is 1-Lipschitz. (The weights move by up to 1.4e-5: enough to move a narrow
#      bin's log by 1e-4, which is why our weights are float32 like the reference's.)
#   7. log: with dm the total of 5., |out - exact| <= max(log(max(m + dm, eps) / max(m, eps)),
#      log(max(m, eps) / max(m - dm, eps))) + 2u |log max(m, eps)| (float32 log to one ulp).
#
# To first order the bound is 2 Delta / sqrt(m_j / W_j) (W_j = sum_k B_jk): the log's absolute
# error is the band's relative power error, i.e. the frame's float32 noise floor (Delta, about
# u ||y||_1) over the band's amplitude. It is far below 1e-4 in bands that carry the frame's
# energy and grows without limit in near-silent ones (a pure tone's far bins, the low bins that
# pre-emphasis empties), where every float32 evaluation, the reference's included, is off the
# exact value by more than 1e-4 and two of them agree only as far as their operation order does.
# The reference is checked to lie within the same bound of the exact values (on the fixture
# prompt), so |ours - reference| <= 2 * bound on any input.

U = 2.0 ** -24
FLOAT_EPS = float(np.finfo(np.float32).eps)
FRAME, SHIFT, NFFT, PREEMPH, POVEY = 400, 160, 512, 0.97, 0.85


def kaldi_mel64(hz):
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


def hann64() -> tuple[np.ndarray, np.ndarray]:
    theta = 2.0 * np.pi * np.arange(FRAME) / (FRAME - 1)
    return theta, 0.5 - 0.5 * np.cos(theta)


def povey64() -> np.ndarray:
    return hann64()[1] ** POVEY


def mel_banks64(num_bins: int, sample_rate: int = 16000, low_hz: float = 20.0):
    """Kaldi's triangular filters [num_bins, NFFT // 2 + 1] (Nyquist column zero), and the parts."""
    low = kaldi_mel64(low_hz)
    delta = (kaldi_mel64(sample_rate / 2) - low) / (num_bins + 1)
    index = np.arange(num_bins)[:, None]
    left, centre, right = low + index * delta, low + (index + 1) * delta, low + (index + 2) * delta
    mel = kaldi_mel64(sample_rate / NFFT * np.arange(NFFT // 2))[None]
    rising, falling = (mel - left) / (centre - left), (right - mel) / (right - centre)
    banks = np.pad(np.maximum(0.0, np.minimum(rising, falling)), ((0, 0), (0, 1)))
    return banks, (mel, left, centre, right, rising, falling)


def fbank64(samples: np.ndarray, num_bins: int = 80) -> dict:
    """The Kaldi fbank of float32 samples evaluated in float64, with its intermediate values."""
    x = np.asarray(samples, dtype=np.float32).astype(np.float64).reshape(-1)
    count = 1 + (x.size - FRAME) // SHIFT if x.size >= FRAME else 0
    frames = x[np.arange(FRAME)[None] + SHIFT * np.arange(count)[:, None]].reshape(count, FRAME)
    ubar = frames - frames.mean(axis=1, keepdims=True)
    previous = np.concatenate([ubar[:, :1], ubar[:, :-1]], axis=1)
    v = ubar - PREEMPH * previous
    y = v * povey64()
    spectrum = np.fft.rfft(y, NFFT)
    power = spectrum.real ** 2 + spectrum.imag ** 2
    banks = mel_banks64(num_bins)[0]
    energy = power @ banks.T
    return dict(frames=frames, ubar=ubar, previous=previous, v=v, y=y, power=power, banks=banks,
                energy=energy, log=np.log(np.maximum(energy, FLOAT_EPS)))


def bank_rounding_bound(num_bins: int) -> np.ndarray:
    """Item 6: how far float32 filterbank weights can be from the exact ones, [num_bins, K]."""
    _, (mel, left, centre, right, rising, falling) = mel_banks64(num_bins)
    d_mel = U * (2254.0 + 3.0 * mel)
    d_left, d_centre, d_right = 2.5 * U * left, 2.5 * U * centre, 2.5 * U * right

    def quotient(num, den, d_num, d_den):
        q = num / den
        return (d_num + U * np.abs(num) + np.abs(q) * (d_den + U * den)) / den + U * np.abs(q)

    beta = np.maximum(quotient(mel - left, centre - left, d_mel + d_left, d_centre + d_left),
                      quotient(right - mel, right - centre, d_mel + d_right, d_right + d_centre))
    beta = np.where(np.minimum(rising, falling) > -beta, beta, 0.0)  # else both clamp to 0
    return np.pad(beta, ((0, 0), (0, 1)))


def window_rounding_bound() -> np.ndarray:
    """Item 3: how far the float32 Povey window can be from the exact one, [FRAME]."""
    theta, hann = hann64()
    d_hann = U * (theta * np.abs(np.sin(theta)) + 1.0 + hann)
    w = hann ** POVEY
    return np.maximum((hann + d_hann) ** POVEY - w, w - np.maximum(hann - d_hann, 0.0) ** POVEY) + 2 * U * w


def float32_bound(samples: np.ndarray, num_bins: int = 80) -> tuple[np.ndarray, dict]:
    """(bound [T, num_bins] on |float32 fbank - exact fbank|, the float64 evaluation)."""
    f = fbank64(samples, num_bins)
    frames, ubar, previous, v, y = f["frames"], f["ubar"], f["previous"], f["v"], f["y"]
    power, banks, energy = f["power"], f["banks"], f["energy"]
    w = povey64()
    d_mu = (FRAME - 1) * U * np.abs(frames).sum(1) / FRAME + U * np.abs(frames.mean(1))      # 1.
    preemph_error = abs(float(np.float32(PREEMPH)) - PREEMPH)
    elementwise = (w * (U * np.abs(ubar) + (2 * PREEMPH * U + preemph_error) * np.abs(previous)
                        + U * np.abs(v)) + np.abs(v) * window_rounding_bound() + U * np.abs(y)).sum(1)  # 2.
    dc = (1 - PREEMPH) * d_mu[:, None] * np.abs(np.fft.rfft(w, NFFT))[None]
    eta = U + 4 * U / (1 - 4 * U) * (np.sqrt(2.0) + U)
    fft = ((1 + eta) ** 9 - 1) * (np.abs(y).sum(1) + elementwise + (1 - PREEMPH) * d_mu * w.sum())  # 4.
    delta = elementwise[:, None] + dc + fft[:, None]                                 # [T, K]
    spread = (delta ** 2) @ banks.T
    spectral = 2 * np.sqrt(energy * spread) + spread                                 # 5.
    weights = (np.sqrt(power) + delta) ** 2 @ bank_rounding_bound(num_bins).T
    terms = (banks > 0).sum(1)
    d_energy = spectral + weights + (6 + terms) * U * (energy + spectral + weights) + 1e-38 * (terms + 1)
    floored = np.maximum(energy, FLOAT_EPS)                                          # 7.
    up = np.log(np.maximum(energy + d_energy, FLOAT_EPS) / floored)
    down = np.log(floored / np.maximum(energy - d_energy, FLOAT_EPS))
    return np.maximum(up, down) + 2 * U * np.abs(np.log(floored)), f


def synthetic_audio() -> dict[str, np.ndarray]:
    """16 kHz test signals, float32: near-silence, tones, noise, clipping, very short audio."""
    rng = np.random.default_rng(20240601)
    t = np.arange(32000) / 16000
    signals = {
        "digital silence": np.zeros(16000),
        "near silence (1e-6)": 1e-6 * rng.standard_normal(16000),
        "one-LSB noise": 2.0 ** -15 * rng.standard_normal(16000),
        "tone 1 kHz (on an FFT bin)": 0.5 * np.sin(2 * np.pi * 1000 * t),
        "tone 3333.3 Hz": 0.9 * np.sin(2 * np.pi * 3333.3 * t),
        "tone 100 Hz": 0.5 * np.sin(2 * np.pi * 100 * t),
        "tone 7.9 kHz": 0.5 * np.sin(2 * np.pi * 7900 * t),
        "quiet tone (-60 dBFS)": 1e-3 * np.sin(2 * np.pi * 1000 * t),
        "white noise": 0.1 * rng.standard_normal(32000),
        "clipped sine": np.clip(3.0 * np.sin(2 * np.pi * 440 * t), -1.0, 1.0),
        "full-scale square": np.sign(np.sin(2 * np.pi * 200 * t + 0.1)),
        "DC offset and a small tone": 0.5 + 0.01 * np.sin(2 * np.pi * 50 * t),
        "chirp 50 Hz - 6 kHz": 0.5 * np.sin(2 * np.pi * (50 + 1500 * t) * t),
        "impulse train": np.where(np.arange(32000) % 800 == 0, 0.9, 0.0),
        "very short: one frame": 0.3 * rng.standard_normal(400),
        "very short: 559 samples": 0.3 * rng.standard_normal(559),
        "very short: two frames": 0.3 * rng.standard_normal(560),
    }
    return {name: s.astype(np.float32) for name, s in signals.items()}


SYNTHETIC = synthetic_audio()


def test_fbank_constants_within_their_rounding_bounds():
    """The float32 window and filterbank against the exact ones: items 3 and 6 of the bound."""
    window_error = np.abs(povey_window().double().numpy() - povey64())
    assert np.all(window_error <= window_rounding_bound())
    banks = kaldi_mel_banks(80).double().numpy()
    exact = mel_banks64(80)[0]
    assert banks.shape == exact.shape == (80, NFFT // 2 + 1)
    assert np.all(np.abs(banks - exact) <= bank_rounding_bound(80))
    assert np.all(banks[:, -1] == 0) and np.all((banks > 0) == (exact > 0))


@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_kaldi_fbank_float32_bound(name):
    samples = SYNTHETIC[name]
    bound, exact = float32_bound(samples)
    fbank = kaldi_fbank(samples)
    assert fbank.dtype == np.float32
    assert fbank.shape == (max(0, 1 + (samples.size - FRAME) // SHIFT), 80) == exact["log"].shape
    error = np.abs(fbank.astype(np.float64) - exact["log"])
    print(f"[fbank] {name}: max error {error.max():.2e}, max error/bound {np.max(error / bound):.3f}, "
          f"share of cells whose bound is <= 1e-4: {np.mean(bound <= 1e-4):.2f}")
    assert np.all(error <= bound)


def test_audio_shorter_than_a_frame_has_no_frames():
    assert kaldi_fbank(np.zeros(FRAME - 1, dtype=np.float32)).shape == (0, 80)


@pytest.mark.parity
def test_kaldi_fbank_float32_bound_on_the_prompt(ref):
    """Ours and the reference are both within the float32 bound of the exact fbank of the prompt."""
    bound, exact = float32_bound(ref["prompt_speech_16k"][0])
    ours = kaldi_fbank(ref["prompt_speech_16k"][0]).astype(np.float64)
    assert np.all(np.abs(ours - exact["log"]) <= bound)
    reference_error = np.abs(ref["kaldi_fbank_raw"].astype(np.float64) - exact["log"])
    print(f"[fbank] reference vs exact: max {reference_error.max():.2e}, "
          f"max error/bound {np.max(reference_error / bound):.3f}")
    assert np.all(reference_error <= bound)


def embedding_shift(encoder, fbank: np.ndarray, exact: np.ndarray) -> float:
    """Relative change of the campplus embedding when `exact` fbank is replaced by `fbank`."""
    embed = lambda f: encoder(mean_normalize(np.asarray(f, dtype=np.float32)))[0].astype(np.float64)
    target = embed(exact)
    return float(np.linalg.norm(embed(fbank) - target) / np.linalg.norm(target))


@pytest.mark.parity
@pytest.mark.parametrize("name", ["fixture prompt"] + [n for n in SYNTHETIC if SYNTHETIC[n].size >= 16000])
def test_fbank_rounding_moves_the_embedding_less_than_16_bit_audio_does(name, ref, extractor):
    """The float32 fbank's departure from the exact one (largest in near-silent bins) moves the
    speaker embedding less than one LSB of TPDF dither does, i.e. less than recording the same
    prompt at 16 bits once more, and within the embedding tolerance (1e-3 relative)."""
    samples = ref["prompt_speech_16k"][0] if name == "fixture prompt" else SYNTHETIC[name]
    rng = np.random.default_rng(7)
    dither = ((rng.random(samples.size) - rng.random(samples.size)) * 2.0 ** -15).astype(np.float32)
    exact = fbank64(samples)["log"]
    ours = embedding_shift(extractor.speaker_encoder, kaldi_fbank(samples), exact)
    dithered = embedding_shift(extractor.speaker_encoder, fbank64(samples + dither)["log"], exact)
    print(f"[fbank] {name}: embedding shift {ours:.2e} (ours vs exact), {dithered:.2e} (1 LSB dither)")
    assert ours <= dithered and ours <= 1e-3


@pytest.mark.parity
def test_bound_sized_fbank_error_keeps_tokens_and_embedding(prompt, ref, extractor, monkeypatch):
    """Perturbing the fbank by twice the bound (our error plus the reference's, random signs):
    the speech tokens do not read the fbank at all, and the prompt's embedding stays within its
    tolerance of the reference."""
    real_fbank = speech_models.kaldi_fbank
    rng = np.random.default_rng(3)

    def perturbed(samples, num_bins):
        fbank = real_fbank(samples, num_bins)
        bound = float32_bound(samples, num_bins)[0]
        return (fbank + 2 * bound * rng.choice([-1.0, 1.0], size=bound.shape)).astype(np.float32)

    monkeypatch.setattr(speech_models, "kaldi_fbank", perturbed)
    features = extractor.extract(*prompt)
    np.testing.assert_array_equal(features.speech_tokens, ref["prompt_speech_token"])
    _, rel_err = report_error("prompt embedding, fbank off by 2x the bound", features.embedding,
                              ref["spk_embedding"])
    assert rel_err <= 1e-3
