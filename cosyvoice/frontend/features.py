"""The three spectral features computed from a prompt waveform.

    whisper_log_mel  16 kHz audio -> [1, n_mels, F] log-mel that the speech tokenizer reads
    kaldi_fbank      16 kHz audio -> [T, n_bins] Kaldi filterbank, mean-normalised for campplus
    prompt_mel       audio at the yaml rate -> [1, T, num_mels] mel the flow uses as its prompt

All take a float32 numpy waveform [N] in [-1, 1] and return float32 numpy arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import kaldi_native_fbank as knf
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


def kaldi_fbank(samples_16k: np.ndarray, num_bins: int = FBANK_NUM_BINS) -> np.ndarray:
    """Kaldi log-mel filterbank of 16 kHz audio in [-1, 1] (not int16 scale): [T, num_bins].

    25 ms frames every 10 ms with snip_edges, so T = 1 + (N - 400) // 160; no dither, no energy.
    """
    options = knf.FbankOptions()
    options.frame_opts.samp_freq = FBANK_SAMPLE_RATE
    options.frame_opts.dither = 0.0
    options.mel_opts.num_bins = num_bins
    fbank = knf.OnlineFbank(options)
    fbank.accept_waveform(FBANK_SAMPLE_RATE, np.ascontiguousarray(samples_16k, dtype=np.float32))
    fbank.input_finished()
    frames = [fbank.get_frame(i) for i in range(fbank.num_frames_ready)]
    return np.asarray(frames, dtype=np.float32).reshape(-1, num_bins)


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
    fmax: float | None = None
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
