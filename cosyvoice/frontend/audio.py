"""Reads prompt audio into a mono float32 waveform, and resamples it.

`load_audio` accepts a file path, the bytes of an audio file (any format libsndfile reads: WAV,
FLAC, OGG, MP3, ...) or a numpy array with its sample rate. Every problem raises `AudioError`
with a sentence that can be shown to the user as is.
"""
from __future__ import annotations

import functools
import io
import math
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

from ..errors import InputError

# Windowed-sinc resampler settings of the reference (a Hann-windowed sinc, 6 zero crossings each
# side, cutoff at 99% of the lower Nyquist rate).
SINC_ZERO_CROSSINGS = 6
SINC_ROLLOFF = 0.99
# The polyphase kernel has `up` phases of about `down` taps each (up/down: the rates divided by
# their gcd), so its memory grows with up * down and each output sample costs about `down`
# multiply-adds. Between common rates the factors stay small (44100 -> 16000 is 160/441; the
# largest, 192000 -> 22050, is 147/1280), but an odd rate has no common divisor with the target:
# 44099 -> 16000 would need a 16000 x 44133 kernel (gigabytes). Past this factor we use soxr,
# whose cost stays bounded for any ratio. 2048 keeps every common pair on the exact sinc path
# and bounds its kernel to about 4.3 M taps (17 MB).
MAX_SINC_FACTOR = 2048


class AudioError(InputError):
    """The audio cannot be used: unreadable, empty, without a sample rate, too short or too long."""


def load_audio(source: str | Path | bytes | np.ndarray,
               sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Returns (samples float32 [N] mono in [-1, 1], sample rate).

    `source` is a path, the bytes of an audio file, or an array [N], [N, C] or [C, N] (the shorter
    axis is taken as channels). An array needs `sample_rate`; a file carries its own, and a
    `sample_rate` given with a file must match it. Channels are averaged to mono.
    """
    if isinstance(source, np.ndarray):
        if sample_rate is None:
            raise AudioError("an audio array needs its sample rate (pass sample_rate=...)")
        samples, rate = _array_to_mono(source), int(sample_rate)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        samples, rate = _read_file(io.BytesIO(bytes(source)), "the audio bytes")
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise AudioError(f"audio file {path} does not exist")
        samples, rate = _read_file(path, f"audio file {path}")
    else:
        raise AudioError(f"cannot read audio from a {type(source).__name__}; "
                         "pass a path, bytes or a numpy array")
    if sample_rate is not None and int(sample_rate) != rate:
        raise AudioError(f"the audio is at {rate} Hz but sample_rate={sample_rate} was given")
    if rate <= 0:
        raise AudioError(f"invalid sample rate {rate}")
    if samples.size == 0:
        raise AudioError("the audio is empty")
    if not np.all(np.isfinite(samples)):
        raise AudioError("the audio contains NaN or infinite samples")
    return samples, rate


def _read_file(file, name: str) -> tuple[np.ndarray, int]:
    try:
        data, rate = sf.read(file, dtype="float32", always_2d=True)  # [N, C]
    except (sf.LibsndfileError, RuntimeError, TypeError) as error:
        raise AudioError(f"{name} could not be read as audio ({error})") from None
    return data.mean(axis=1, dtype=np.float32), int(rate)


def _array_to_mono(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        channel_axis = 0 if array.shape[0] <= array.shape[1] else 1
        array = array.mean(axis=channel_axis, dtype=np.float64)
    elif array.ndim != 1:
        raise AudioError(f"an audio array must be 1-D or 2-D, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.signedinteger):
        return (array / float(2 ** (8 * array.dtype.itemsize - 1))).astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32)
    raise AudioError(f"an audio array must hold floats or signed integers, got {array.dtype}")


def resample(samples: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resamples a float32 waveform [N] to [ceil(N * target_sr / orig_sr)].

    A polyphase Hann-windowed sinc. It exists (instead of soxr) for parity: the reference prompt
    features were computed on audio resampled this way, and the prompt mel is sensitive to it.
    Odd rate pairs whose kernel would be huge go through soxr instead (see `resample_method`).
    """
    method = resample_method(orig_sr, target_sr)
    if method == "none":
        return np.asarray(samples, dtype=np.float32)
    if method == "soxr":
        return _resample_soxr(samples, orig_sr, target_sr)
    return _resample_sinc(samples, orig_sr, target_sr)


def resample_method(orig_sr: int, target_sr: int) -> str:
    """'none' (same rate), 'sinc' (the reference's resampler) or 'soxr' (for rate pairs whose
    reduced factors exceed MAX_SINC_FACTOR)."""
    if orig_sr == target_sr:
        return "none"
    divisor = math.gcd(orig_sr, target_sr)
    return "sinc" if max(orig_sr, target_sr) // divisor <= MAX_SINC_FACTOR else "soxr"


def _resample_sinc(samples: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    divisor = math.gcd(orig_sr, target_sr)
    orig, new = orig_sr // divisor, target_sr // divisor
    kernels, half_width = _sinc_kernels(orig, new)                           # [new, 1, K]
    audio = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    padded = torch.nn.functional.pad(audio[None, None], (half_width, half_width + orig))
    # Output phase j of input block i is sample i * new + j of the result.
    phases = torch.nn.functional.conv1d(padded, kernels, stride=orig)        # [1, new, blocks]
    out = phases[0].T.reshape(-1)
    return out[: _output_length(audio.numel(), orig, new)].numpy()


def _resample_soxr(samples: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """soxr's very-high-quality resampler, padded or cut to the sinc path's output length (soxr
    rounds the length; the two differ by at most one sample)."""
    audio = np.ascontiguousarray(samples, dtype=np.float32)
    out = soxr.resample(audio, orig_sr, target_sr, quality="VHQ").astype(np.float32, copy=False)
    length = _output_length(audio.size, orig_sr, target_sr)
    return np.pad(out[:length], (0, max(0, length - out.size)))


def _output_length(n: int, orig: int, new: int) -> int:
    """ceil(n * new / orig), in integers (a float product can round the wrong way)."""
    return -(-n * new // orig)


@functools.lru_cache(maxsize=16)   # a server sees the same few rate pairs again and again
def _sinc_kernels(orig: int, new: int) -> tuple[torch.Tensor, int]:
    """One low-pass kernel per output phase, [new, 1, 2 * half_width + orig], and half_width."""
    cutoff = min(orig, new) * SINC_ROLLOFF          # in units of the reduced rates
    half_width = math.ceil(SINC_ZERO_CROSSINGS * orig / cutoff)
    taps = torch.arange(-half_width, half_width + orig, dtype=torch.float64) / orig
    phases = torch.arange(new, dtype=torch.float64)[:, None] / new
    # Time of each tap relative to each output sample, in cycles of the cutoff frequency.
    t = ((taps[None, :] - phases) * cutoff).clamp(-SINC_ZERO_CROSSINGS, SINC_ZERO_CROSSINGS)
    window = torch.cos(t * math.pi / SINC_ZERO_CROSSINGS / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
    kernels = sinc * window * (cutoff / orig)
    return kernels[:, None, :].to(torch.float32), half_width
