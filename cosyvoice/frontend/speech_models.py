"""Turns a prompt waveform into the three prompt features, with the model directory's two ONNX models.

    SpeechTokenizer  speech_tokenizer_v2.onnx (CosyVoice2) or speech_tokenizer_v3.onnx (CosyVoice3),
                     same contract: whisper log-mel [1, n_mels, F] -> tokens [1, ~F/4]
    SpeakerEncoder   campplus.onnx: mean-normalised fbank [1, T, n_bins] -> embedding [1, D]
    PromptFeatureExtractor  waveform -> PromptFeatures(speech_tokens, embedding, speech_feat)

Each model is opened once as an onnxruntime session; inputs are bound by position, not by name.
`InferenceSession.run` is safe to call from several threads at once, and nothing else here keeps
state, so one extractor can serve every request.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .audio import AudioError, resample
from .features import (FBANK_NUM_BINS, FBANK_SAMPLE_RATE, WHISPER_N_MELS, WHISPER_SAMPLE_RATE,
                       MelParams, kaldi_fbank, mean_normalize, prompt_mel, whisper_log_mel)

TOKENIZER_FILE = "speech_tokenizer_v2.onnx"   # the default (CosyVoice3: speech_tokenizer_v3.onnx)
SPEAKER_ENCODER_FILE = "campplus.onnx"
MAX_PROMPT_SECONDS = 30.0   # the speech tokenizer's limit
MIN_PROMPT_SECONDS = 0.5    # shorter prompts give too few tokens to condition on
MIN_PROMPT_SAMPLE_RATE = 16000  # the reference refuses to upsample prompts from below 16 kHz
SILENCE_PEAK = 1e-4             # a prompt whose loudest sample is below this carries no voice


def open_session(path: str | Path, device: str = "cpu") -> ort.InferenceSession:
    """A session with full graph optimisation and one intra-op thread, on CUDA when the device is
    a CUDA one and this onnxruntime build has the CUDA provider, else on CPU."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def _fixed_dim(dim, default: int | None = None) -> int | None:
    """A shape entry of an ONNX input/output, or `default` when it is symbolic."""
    return dim if isinstance(dim, int) else default


class SpeechTokenizer:
    """Discrete speech tokens (25 per second) from a whisper log-mel."""

    def __init__(self, path: str | Path, device: str = "cpu", default_n_mels: int = WHISPER_N_MELS):
        self.session = open_session(path, device)
        self.inputs = [node.name for node in self.session.get_inputs()]   # [feats, feats_length]
        self.output = self.session.get_outputs()[0].name
        self.n_mels = _fixed_dim(self.session.get_inputs()[0].shape[1], default_n_mels)

    def __call__(self, feats: np.ndarray) -> np.ndarray:
        """feats float32 [1, n_mels, F] -> raw model output (int64 [1, n])."""
        length = np.array([feats.shape[2]], dtype=np.int32)
        feeds = dict(zip(self.inputs, (feats.astype(np.float32), length)))
        return self.session.run([self.output], feeds)[0]


class SpeakerEncoder:
    """A speaker embedding (not length-normalised) from a mean-normalised Kaldi fbank."""

    def __init__(self, path: str | Path, device: str = "cpu", default_num_bins: int = FBANK_NUM_BINS):
        self.session = open_session(path, device)
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name
        self.num_bins = _fixed_dim(self.session.get_inputs()[0].shape[2], default_num_bins)

    def __call__(self, fbank: np.ndarray) -> np.ndarray:
        """fbank float32 [T, num_bins] -> embedding float32 [1, D]."""
        embedding = self.session.run([self.output], {self.input: fbank[None].astype(np.float32)})[0]
        return embedding.reshape(1, -1).astype(np.float32)


@dataclass
class PromptFeatures:
    """What the LLM and the flow need from a prompt waveform."""
    speech_tokens: np.ndarray  # int32 [1, n]
    embedding: np.ndarray      # float32 [1, D], not length-normalised
    speech_feat: np.ndarray    # float32 [1, token_mel_ratio * n, num_mels]


class PromptFeatureExtractor:
    """Speech tokens, speaker embedding and prompt mel of a prompt waveform.

    `mel_params` is the yaml's `feat_extractor` kwargs (`fmax` None means Nyquist, as CosyVoice3's
    yaml has it); `token_mel_ratio` its mel frames per token.
    """

    def __init__(self, model_dir: str | Path, mel_params: dict, token_mel_ratio: int = 2,
                 device: str = "cpu", speech_tokenizer: str | Path | None = None):
        """`speech_tokenizer`: the ONNX speech tokenizer, a bare file name (looked up in model_dir;
        speech_tokenizer_v3.onnx for CosyVoice3) or a path (used as it is); default
        model_dir/speech_tokenizer_v2.onnx."""
        model_dir = Path(model_dir)
        tokenizer = Path(speech_tokenizer or TOKENIZER_FILE)
        if tokenizer.parent == Path("."):
            tokenizer = model_dir / tokenizer
        self.tokenizer = SpeechTokenizer(tokenizer, device)
        self.speaker_encoder = SpeakerEncoder(model_dir / SPEAKER_ENCODER_FILE, device)
        self.mel_params = MelParams(**mel_params)
        self.token_mel_ratio = token_mel_ratio

    def extract(self, samples: np.ndarray, sample_rate: int) -> PromptFeatures:
        """All three features of mono audio [N], with tokens and mel trimmed to match each other.

        Each feature is computed from the original audio resampled straight to the rate it needs
        (once per rate: the tokenizer and the speaker encoder both take 16 kHz).
        """
        check_prompt(samples, sample_rate)
        at_rate = functools.cache(lambda rate: resample(samples, sample_rate, rate))
        tokens = self.speech_tokens(at_rate(WHISPER_SAMPLE_RATE))
        embedding = self.speaker_embedding(at_rate(FBANK_SAMPLE_RATE))
        feat = self.speech_feat(at_rate(self.mel_params.sampling_rate))
        # Keep whole tokens only: the mel must be exactly token_mel_ratio frames per token.
        n = min(feat.shape[1] // self.token_mel_ratio, tokens.shape[1])
        return PromptFeatures(tokens[:, :n], embedding, feat[:, : n * self.token_mel_ratio])

    def speech_tokens(self, samples_16k: np.ndarray) -> np.ndarray:
        """16 kHz audio [N] -> int32 [1, n] speech tokens (untrimmed)."""
        seconds = len(samples_16k) / WHISPER_SAMPLE_RATE
        if seconds > MAX_PROMPT_SECONDS:
            raise AudioError(f"the audio is {seconds:.1f} s long; speech tokens can be extracted "
                             f"from at most {MAX_PROMPT_SECONDS:g} s")
        feats = whisper_log_mel(samples_16k, self.tokenizer.n_mels)          # [1, n_mels, F]
        return self.tokenizer(feats).reshape(1, -1).astype(np.int32)

    def speaker_embedding(self, samples_16k: np.ndarray) -> np.ndarray:
        """16 kHz audio [N] -> float32 [1, D] speaker embedding."""
        fbank = kaldi_fbank(samples_16k, self.speaker_encoder.num_bins)      # [T, num_bins]
        return self.speaker_encoder(mean_normalize(fbank))

    def speech_feat(self, samples: np.ndarray) -> np.ndarray:
        """Audio [N] at the yaml rate -> float32 [1, T, num_mels] prompt mel (untrimmed)."""
        return prompt_mel(samples, self.mel_params)


def check_prompt(samples: np.ndarray, sample_rate: int) -> None:
    """Raises AudioError unless the prompt is between the duration limits and rate high enough."""
    if sample_rate < MIN_PROMPT_SAMPLE_RATE:
        raise AudioError(f"the prompt audio is at {sample_rate} Hz; "
                         f"use a recording of at least {MIN_PROMPT_SAMPLE_RATE} Hz")
    seconds = len(samples) / sample_rate
    if seconds < MIN_PROMPT_SECONDS:
        raise AudioError(f"the prompt audio is {seconds:.2f} s long; "
                         f"it must be at least {MIN_PROMPT_SECONDS:g} s")
    if seconds > MAX_PROMPT_SECONDS:
        raise AudioError(f"the prompt audio is {seconds:.1f} s long; "
                         f"it must be at most {MAX_PROMPT_SECONDS:g} s")
    if float(np.max(np.abs(samples))) < SILENCE_PEAK:
        raise AudioError("the prompt audio is silent; record a few seconds of the voice to clone")
