"""Resampling at usual and odd sample rates: the exact sinc path where it is cheap, soxr where the
reduced rate ratio would make the sinc kernel enormous (44099 Hz has no divisor in common with
16000)."""
import numpy as np
import pytest

from cosyvoice.frontend import audio
from cosyvoice.frontend.audio import resample, resample_method

USUAL_RATES = [8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 96000]
TARGET_RATES = [16000, 24000]
ODD_PAIRS = [(44099, 16000), (22051, 24000)]
TONE_HZ = 440.0


def tone(seconds: float, rate: int, length: int | None = None) -> np.ndarray:
    n = round(seconds * rate) if length is None else length
    return (0.5 * np.sin(2 * np.pi * TONE_HZ * np.arange(n) / rate)).astype(np.float32)


def refuse(*args, **kwargs):
    raise AssertionError("this resampling path must not be taken here")


@pytest.mark.parametrize("target", TARGET_RATES)
@pytest.mark.parametrize("orig", USUAL_RATES)
def test_usual_rates_take_the_exact_sinc_path(orig, target):
    assert resample_method(orig, target) == ("none" if orig == target else "sinc")


@pytest.mark.parametrize("orig,target", ODD_PAIRS)
def test_odd_rates_fall_back_to_soxr(orig, target):
    assert resample_method(orig, target) == "soxr"


@pytest.mark.parametrize("orig", [44100, 48000, 22050])
def test_usual_rates_never_call_soxr(monkeypatch, orig):
    monkeypatch.setattr(audio.soxr, "resample", refuse)
    out = resample(tone(0.5, orig), orig, 16000)
    assert out.shape == (8000,) and out.dtype == np.float32


@pytest.mark.parametrize("orig,target", ODD_PAIRS)
def test_odd_rates_keep_length_and_tone_without_a_sinc_kernel(monkeypatch, orig, target):
    monkeypatch.setattr(audio, "_sinc_kernels", refuse)   # the kernel that would blow up
    samples = tone(2.0, orig)
    out = resample(samples, orig, target)
    assert out.dtype == np.float32
    assert abs(len(out) - round(len(samples) * target / orig)) <= 1
    ideal = tone(0.0, target, length=len(out))
    correlation = np.corrcoef(out, ideal)[0, 1]
    assert correlation > 0.99, correlation


def test_same_rate_is_returned_as_is():
    samples = tone(0.1, 44099)
    np.testing.assert_array_equal(resample(samples, 44099, 44099), samples)
