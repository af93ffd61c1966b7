"""The three spectral features computed from a prompt waveform.

    whisper_log_mel  16 kHz audio -> [1, n_mels, F] log-mel that the speech tokenizer reads
    kaldi_fbank      16 kHz audio -> [T, n_bins] Kaldi filterbank (campplus reads it mean-normalised)
    prompt_mel       audio at the yaml rate -> [1, T, num_mels] mel the flow uses as its prompt

All take a float32 numpy waveform [N] in [-1, 1] and return float32 numpy arrays.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

# The whisper-style front end is fixed by the speech tokenizer that was trained on it.
WHISPER_SAMPLE_RATE = 16000
WHISPER_N_FFT = 400
WHISPER_HOP = 160
WHISPER_N_MELS = 128
WHISPER_LOG_FLOOR = 1e-10
WHISPER_DYNAMIC_RANGE = 8.0  # log10 units kept below the loudest bin

# The Kaldi filterbank campplus was trained on: defaults of Kaldi's compute-fbank, no dither.
FBANK_SAMPLE_RATE = 16000
FBANK_NUM_BINS = 80
FBANK_FRAME_LENGTH = 400      # 25 ms
FBANK_FRAME_SHIFT = 160       # 10 ms
FBANK_FFT_SIZE = 512          # the frame length rounded up to a power of two
FBANK_PREEMPHASIS = 0.97
FBANK_POVEY_POWER = 0.85      # the Povey window is the (symmetric) Hann window to this power
FBANK_LOW_FREQ = 20.0         # Hz; the high edge is Nyquist
FBANK_LOG_FLOOR = float(torch.finfo(torch.float32).eps)

# The flow's prompt mel: magnitude epsilon inside the sqrt and floor before the natural log.
MEL_MAGNITUDE_EPS = 1e-9
MEL_LOG_FLOOR = 1e-5


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear (200/3 Hz per mel) below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / (200.0 / 3.0)
    log_step = np.log(6.4) / 27.0
    mel_at_1k = 1000.0 / (200.0 / 3.0)
    logarithmic = mel_at_1k + np.log(np.maximum(hz, 1e-10) / 1000.0) / log_step
    return np.where(hz >= 1000.0, logarithmic, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Inverse of `_hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    log_step = np.log(6.4) / 27.0
    mel_at_1k = 1000.0 / (200.0 / 3.0)
    linear = mel * (200.0 / 3.0)
    logarithmic = 1000.0 * np.exp(log_step * (mel - mel_at_1k))
    return np.where(mel >= mel_at_1k, logarithmic, linear)


def slaney_mel_filterbank(sample_rate: int, n_fft: int, n_mels: int,
                          fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """Triangular mel filters on the Slaney scale, each scaled to unit area: [n_mels, n_fft // 2 + 1].

    Same values as librosa's `filters.mel(norm="slaney", htk=False)`; fmax None means Nyquist.
    """
    fmax = sample_rate / 2.0 if fmax is None else float(fmax)
    fft_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)                        # [K]
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))  # [M + 2]
    widths = np.diff(edges_hz)                                                          # [M + 1]
    offsets = edges_hz[:, None] - fft_hz[None, :]                                       # [M + 2, K]
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    filters = np.maximum(0.0, np.minimum(rising, falling))                              # [M, K]
    filters *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]
    return filters.astype(np.float32)


def whisper_log_mel(samples_16k: np.ndarray, n_mels: int = WHISPER_N_MELS) -> np.ndarray:
    """Whisper's log-mel of 16 kHz audio: [1, n_mels, N // 160], float32."""
    audio = torch.from_numpy(np.ascontiguousarray(samples_16k, dtype=np.float32))
    window = torch.hann_window(WHISPER_N_FFT)
    spec = torch.stft(audio, WHISPER_N_FFT, WHISPER_HOP, window=window, center=True,
                      pad_mode="reflect", return_complex=True)                # [K, N // 160 + 1]
    power = spec[:, :-1].abs() ** 2                                          # last frame dropped
    filters = torch.from_numpy(slaney_mel_filterbank(WHISPER_SAMPLE_RATE, WHISPER_N_FFT, n_mels))
    log_mel = (filters @ power).clamp(min=WHISPER_LOG_FLOOR).log10()         # [n_mels, F]
    log_mel = torch.maximum(log_mel, log_mel.max() - WHISPER_DYNAMIC_RANGE)
    return ((log_mel + 4.0) / 4.0).unsqueeze(0).numpy()


def kaldi_mel(hz):
    """Kaldi's mel scale, 1127 ln(1 + f / 700), of a torch tensor, numpy array or float, in its precision."""
    log = torch.log if isinstance(hz, torch.Tensor) else np.log
    return 1127.0 * log(1.0 + hz / 700.0)


@functools.lru_cache(maxsize=8)
def kaldi_mel_banks(num_bins: int = FBANK_NUM_BINS, sample_rate: int = FBANK_SAMPLE_RATE,
                    fft_size: int = FBANK_FFT_SIZE, low_freq: float = FBANK_LOW_FREQ) -> torch.Tensor:
    """Kaldi's triangular mel filters, float32 [num_bins, fft_size // 2 + 1].

    Bin j rises linearly in mel from mel(low) + j * delta to its centre one delta higher and falls
    to zero at two deltas, delta = (mel(Nyquist) - mel(low)) / (num_bins + 1). The weights are
    evaluated in float32 like the reference (the Nyquist column is zero, as in Kaldi): near the
    bin edges the float32 cancellation in (mel - left) / (centre - left) moves a weight by up to
    ~1e-5, which is enough to move the log of a narrow low-frequency bin by 1e-4, so a float64
    filterbank would agree less with the reference, not more.
    """
    # Python floats (float64), rounded to float32 where they meet the float32 tensors below.
    mel_low = float(kaldi_mel(float(low_freq)))
    mel_delta = (float(kaldi_mel(sample_rate / 2.0)) - mel_low) / (num_bins + 1)
    index = torch.arange(num_bins, dtype=torch.float32).unsqueeze(1)                  # [M, 1]
    left = mel_low + index * mel_delta
    centre = mel_low + (index + 1.0) * mel_delta
    right = mel_low + (index + 2.0) * mel_delta
    fft_bin_hz = sample_rate / fft_size
    mel = kaldi_mel(fft_bin_hz * torch.arange(fft_size // 2, dtype=torch.float32)).unsqueeze(0)
    rising = (mel - left) / (centre - left)
    falling = (right - mel) / (right - centre)
    banks = torch.clamp(torch.minimum(rising, falling), min=0.0)                       # [M, K - 1]
    return torch.nn.functional.pad(banks, (0, 1))                                      # [M, K]


@functools.lru_cache(maxsize=2)
def povey_window(length: int = FBANK_FRAME_LENGTH) -> torch.Tensor:
    """Kaldi's Povey window: the symmetric Hann window to the power 0.85, float32 [length]."""
    return torch.hann_window(length, periodic=False, dtype=torch.float32).pow(FBANK_POVEY_POWER)


def kaldi_fbank(samples_16k: np.ndarray, num_bins: int = FBANK_NUM_BINS) -> np.ndarray:
    """Kaldi log-mel filterbank of 16 kHz audio in [-1, 1] (not int16 scale): float32 [T, num_bins].

    Kaldi's compute-fbank defaults with dither 0: 25 ms frames every 10 ms with snip_edges, so
    T = 1 + (N - 400) // 160 (0 frames below 400 samples); per frame remove the DC offset,
    pre-emphasis 0.97 (the first sample against itself), Povey window, zero-pad to 512, power
    spectrum, mel filterbank from 20 Hz to Nyquist, natural log floored at float32 eps; no energy.

    Every step runs in float32 in the order above, the order of the float32 reference. This
    matters in near-silent bins: a band whose power is far below the frame's total is dominated
    by the frame's float32 rounding noise (about eps * frame norm per FFT bin), and the log turns
    that relative error into an absolute one, so float64 here would move us away from the
    reference (by 2.9e-4 on the fixture prompt), not towards it. Repeating its float32 steps
    reproduces its rounding (97% of the fixture's values bit for bit, the rest within 30 ulp);
    what remains is the FFT kernel's own rounding. tests/test_frontend_audio_parity.py derives
    the bound on the distance to the exact fbank that covers any input.
    """
    audio = torch.from_numpy(np.ascontiguousarray(samples_16k, dtype=np.float32)).reshape(-1)
    if audio.numel() < FBANK_FRAME_LENGTH:
        return np.zeros((0, num_bins), dtype=np.float32)
    frames = audio.unfold(0, FBANK_FRAME_LENGTH, FBANK_FRAME_SHIFT)                   # [T, 400]
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - FBANK_PREEMPHASIS * previous
    frames = frames * povey_window(FBANK_FRAME_LENGTH)
    spectrum = torch.fft.rfft(frames, n=FBANK_FFT_SIZE)                               # [T, 257]
    power = spectrum.abs().pow(2.0)
    mel_energy = torch.mm(power, kaldi_mel_banks(num_bins, FBANK_SAMPLE_RATE, FBANK_FFT_SIZE).T)
    return mel_energy.clamp(min=FBANK_LOG_FLOOR).log().numpy()


def mean_normalize(feats: np.ndarray) -> np.ndarray:
    """Subtracts each bin's mean over time (axis 0) from a [T, D] feature matrix."""
    return feats - feats.mean(axis=0, keepdims=True)


@dataclass(frozen=True)
class MelParams:
    """The flow's mel settings, as the yaml `feat_extractor` node gives them."""
    n_fft: int
    num_mels: int
    sampling_rate: int
    hop_size: int
    win_size: int
    fmin: float = 0.0
    fmax: float | None = None  # None (CosyVoice3's yaml: `fmax: null`) means Nyquist, sampling_rate / 2
    center: bool = False


def prompt_mel(samples: np.ndarray, params: MelParams) -> np.ndarray:
    """Log-magnitude mel of audio at `params.sampling_rate`: [1, N // hop_size, num_mels], float32."""
    audio = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    pad = (params.n_fft - params.hop_size) // 2
    audio = torch.nn.functional.pad(audio[None, None], (pad, pad), mode="reflect")[0, 0]
    spec = torch.stft(audio, params.n_fft, params.hop_size, win_length=params.win_size,
                      window=torch.hann_window(params.win_size), center=params.center,
                      pad_mode="reflect", return_complex=True)                # [K, T]
    magnitude = torch.sqrt(spec.real ** 2 + spec.imag ** 2 + MEL_MAGNITUDE_EPS)
    filters = torch.from_numpy(slaney_mel_filterbank(params.sampling_rate, params.n_fft,
                                                     params.num_mels, params.fmin, params.fmax))
    mel = (filters @ magnitude).clamp(min=MEL_LOG_FLOOR).log()              # [num_mels, T]
    return mel.T.unsqueeze(0).numpy()
