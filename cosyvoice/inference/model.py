"""Inference modes: text (+ a voice) -> streamed float32 audio chunks, for either generation.

    tts = cosyvoice.load("pretrained_models/Fun-CosyVoice3-0.5B", device="cuda")
    voice = tts.prepare_voice("prompt.wav", "transcript of prompt.wav")   # reusable, savable
    for chunk in tts.zero_shot("Text to speak.", voice=voice, stream=True):
        play(chunk, tts.sample_rate)

Modes (what the LLM and the flow are conditioned on):
    zero_shot      LLM: prompt transcript + prompt speech tokens; flow: prompt tokens, mel, speaker
    cross_lingual  LLM: nothing from the prompt;                  flow: as zero_shot
    instruct2      LLM: the instruction text;                     flow: as zero_shot
    sft            LLM: nothing;                                  flow: a built-in speaker vector
Long texts are split into segments, each synthesised in turn; with stream=True every segment
streams. Every method validates its arguments when called (raising InputError) and returns an
iterator of chunks. `CosyVoice2` and `CosyVoice3` differ only in their prompt conventions
(cosyvoice.inference.prompts), how the vocoder joins stream chunks, and CosyVoice3's dropping
of long silences; their stages come from the model directory.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..backends import BackendFactory, backend_factory
from ..concurrency.flow_batching import BatchedFlowDecoder
from ..errors import InputError, ModelDirError
from ..frontend.audio import load_audio
from ..frontend.speech_models import PromptFeatureExtractor
from ..frontend.text import TextNormalizer
from ..frontend.tokenizer import QwenTokenizer
from ..loading.generations import COSYVOICE2, COSYVOICE3, Generation
from ..loading.model_dir import load_stage, open_model_dir
from ..voice import Voice
from .prompts import CosyVoice2Prompts, CosyVoice3Prompts
from .synthesis import CrossFadeVocoding, ModelInput, StateBudget, Synthesizer, WholeMelVocoding

AudioInput = str | Path | bytes | np.ndarray
SPEAKERS_FILE = "spk2info.pt"
DEFAULT_GPU_FLOW_BATCH = 8
# Share of the device's memory (RAM on a CPU) that streams' carried flow state may take together.
STREAM_STATE_MEMORY_SHARE = 0.25


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of the device (physical RAM for a CPU), or None when unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def default_ttsfrd_resource(model_dir: Path) -> Path:
    """ttsfrd's resource folder: $COSYVOICE_TTSFRD_RESOURCE, else beside the model directory
    (pretrained_models/CosyVoice-ttsfrd/resource, where the official download puts it)."""
    configured = os.environ.get("COSYVOICE_TTSFRD_RESOURCE")
    return Path(configured) if configured else model_dir.parent / "CosyVoice-ttsfrd" / "resource"


class CosyVoice:
    """One loaded model; safe to use from several threads at once. Use a generation's class
    (CosyVoice2, CosyVoice3) or `cosyvoice.load`, which picks it from the directory.

    `llm_backend` runs the LLM stage: "torch" (our SpeechLM), "trtllm" (TensorRT-LLM, see
    cosyvoice.backends) or a factory (model_dir, device, dtype) -> backend. `flow_batch` is how
    many concurrent requests' flow decoder calls may run as one batch (1: one at a time); either
    way streaming chunks go before final calls (cosyvoice.concurrency.flow_batching). By default 8
    on a GPU, where one call leaves most of the chip idle, and 1 on a CPU, where the decoder is
    compute-bound and a padded batch only adds work (bench.profile_stages --flow-concurrency).
    `stream_state_mb` bounds the flow state that streams carry from chunk to chunk, all together
    (default: a quarter of the device's memory; a stream over the bound recomputes its chunks'
    prefix instead, like the reference; 0 always recomputes).
    """

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, ttsfrd_resource: str | Path | None = None,
                 llm_backend: str | BackendFactory = "torch", flow_batch: int | None = None,
                 stream_state_mb: float | None = None):
        model = open_model_dir(model_dir)
        if model.generation is not self.generation_info:
            raise ModelDirError(f"{model.path} holds a {model.generation.name} model, not "
                                f"{self.generation_info.name}: load it with cosyvoice.load")
        self.model_dir = model.path
        self.device = torch.device(device)
        make_llm = backend_factory(llm_backend)
        self.settings = model.settings
        flow = load_stage(model, "flow", self.device, dtype)
        hift = load_stage(model, "hift", self.device, dtype)
        llm = make_llm(model, self.device, dtype)
        self.sample_rate = self.settings.sample_rate
        self.generation = self.generation_info.name   # as users name it: "CosyVoice2", "CosyVoice3"
        self.tokenizer = QwenTokenizer(self.settings.qwen_path, self.generation_info.special_tokens)
        resource = Path(ttsfrd_resource) if ttsfrd_resource else default_ttsfrd_resource(self.model_dir)
        self.normalizer = TextNormalizer(self.tokenizer.count, resource)
        self._normalizer_lock = threading.Lock()   # FST normalisers are not thread-safe
        self.prompt_features = PromptFeatureExtractor(self.model_dir, self.settings.mel,
                                                      self.settings.token_mel_ratio, str(self.device),
                                                      speech_tokenizer=model.speech_tokenizer)
        if flow_batch is None:
            flow_batch = 1 if self.device.type == "cpu" else DEFAULT_GPU_FLOW_BATCH
        if flow_batch < 1:
            raise ValueError(f"flow_batch must be at least 1, got {flow_batch}")
        flow_decoder = BatchedFlowDecoder(flow.decoder, flow_batch)
        if stream_state_mb is None:
            memory = device_memory_bytes(self.device)
            state_limit = None if memory is None else int(memory * STREAM_STATE_MEMORY_SHARE)
        else:
            state_limit = int(stream_state_mb * 1024 * 1024)
        self.synthesizer = Synthesizer(llm, flow, hift, token_hop=self.settings.chunk_size,
                                       flow_decoder=flow_decoder, vocoding=self.vocoding,
                                       silent_tokens=self.silent_tokens, max_silent_run=self.max_silent_run,
                                       state_budget=StateBudget(state_limit), carry_state=state_limit != 0)
        self._n_mels = flow.output_size
        self.speakers = self._load_speakers(self.model_dir / SPEAKERS_FILE)

    # ---- what the server and tools ask of a model ----------------------------------------------

    @property
    def speaker_names(self) -> list[str]:
        """The built-in speakers of the model directory (spk2info.pt), sorted."""
        return sorted(self.speakers)

    def count_text_tokens(self, text: str) -> int:
        """How many text tokens `text` is, as the model's tokenizer counts them."""
        return self.tokenizer.count(text)

    @property
    def batch_counts(self) -> tuple[list[int] | None, list[int] | None]:
        """(LLM decode steps, flow decoder runs) by how many requests each served ([n] = runs
        that served n), or None for a stage that is not batched."""
        flow_counts = getattr(self.synthesizer.flow_decoder, "batch_sizes", None)
        return getattr(self.synthesizer.llm, "step_sizes", None), flow_counts

    # ---- voices ------------------------------------------------------------------------------

    def prepare_voice(self, prompt_audio: AudioInput, prompt_text: str = "",
                      sample_rate: int | None = None) -> Voice:
        """Computes everything a prompt contributes, once. `prompt_text` is the transcript of the
        prompt audio (needed for zero_shot, unused by cross_lingual and instruct2)."""
        samples, rate = load_audio(prompt_audio, sample_rate)
        features = self.prompt_features.extract(samples, rate)
        normalized = self._normalize(self.prompts.transcript(prompt_text)) if prompt_text.strip() else ""
        return Voice(prompt_text=normalized,
                     prompt_text_ids=self._ids(normalized),
                     speech_tokens=torch.from_numpy(features.speech_tokens),
                     embedding=torch.from_numpy(features.embedding),
                     speech_feat=torch.from_numpy(features.speech_feat),
                     generation=self.generation)

    def _load_speakers(self, path: Path) -> dict[str, Voice | torch.Tensor]:
        """spk2info.pt: speaker id -> a speaker vector (sft) or a cached zero-shot prompt."""
        if not path.is_file():
            return {}
        entries = torch.load(str(path), map_location="cpu", weights_only=True)
        speakers: dict[str, Voice | torch.Tensor] = {}
        for name, entry in entries.items():
            if "flow_prompt_speech_token" in entry:
                speakers[name] = Voice(prompt_text="",
                                       prompt_text_ids=entry.get("prompt_text", self._ids("")).int(),
                                       speech_tokens=entry["flow_prompt_speech_token"].int(),
                                       embedding=entry["flow_embedding"].float(),
                                       speech_feat=entry["prompt_speech_feat"].float(),
                                       generation=self.generation)
            else:
                speakers[name] = entry["embedding"].float().reshape(1, -1)
        return speakers

    def _resolve_voice(self, voice: Voice | str | None, prompt_audio: AudioInput | None,
                       prompt_text: str, sample_rate: int | None, mode: str) -> Voice:
        if isinstance(voice, Voice):
            if voice.generation != self.generation:
                raise InputError(f"this voice was prepared by a {voice.generation} model; this is "
                                 f"{self.generation}, whose prompt features differ: prepare it again "
                                 "from its prompt audio")
            return voice
        if isinstance(voice, str):
            found = self.speakers.get(voice)
            if not isinstance(found, Voice):
                raise InputError(f"unknown voice '{voice}'; this model has "
                                 f"{', '.join(sorted(self.speakers)) or 'no built-in voices'}")
            return found
        if prompt_audio is None:
            raise InputError(f"{mode} needs a voice: pass prompt audio or a prepared voice")
        return self.prepare_voice(prompt_audio, prompt_text, sample_rate)

    # ---- inference modes ---------------------------------------------------------------------

    def zero_shot(self, text: str, prompt_text: str = "", prompt_audio: AudioInput | None = None, *,
                  voice: Voice | str | None = None, sample_rate: int | None = None,
                  stream: bool = False, speed: float = 1.0, seed: int | None = None,
                  text_frontend: bool = True) -> Iterator[np.ndarray]:
        """Speaks `text` in the voice of the prompt, continuing from its transcript and tokens."""
        voice = self._resolve_voice(voice, prompt_audio, prompt_text, sample_rate, "zero_shot")
        if voice.prompt_text_ids.shape[1] == 0:
            raise InputError("zero_shot needs the transcript of the prompt audio (prompt_text); "
                             "without one use cross_lingual")
        inputs = [ModelInput(ids, voice.prompt_text_ids, voice.speech_tokens, voice.speech_tokens,
                             voice.speech_feat, voice.embedding)
                  for ids in self._segments(text, text_frontend)]
        return self._run(inputs, stream, speed, seed)

    def cross_lingual(self, text: str, prompt_audio: AudioInput | None = None, *,
                      voice: Voice | str | None = None, sample_rate: int | None = None,
                      stream: bool = False, speed: float = 1.0, seed: int | None = None,
                      text_frontend: bool = True) -> Iterator[np.ndarray]:
        """Speaks `text` (any language) with the prompt's timbre, ignoring its words."""
        voice = self._resolve_voice(voice, prompt_audio, "", sample_rate, "cross_lingual")
        inputs = [ModelInput(ids, self._ids(""), self._no_tokens(), voice.speech_tokens,
                             voice.speech_feat, voice.embedding)
                  for ids in self._segments(text, text_frontend, self.prompts.unprompted_text)]
        return self._run(inputs, stream, speed, seed)

    def instruct2(self, text: str, instruct: str, prompt_audio: AudioInput | None = None, *,
                  voice: Voice | str | None = None, sample_rate: int | None = None,
                  stream: bool = False, speed: float = 1.0, seed: int | None = None,
                  text_frontend: bool = True) -> Iterator[np.ndarray]:
        """Speaks `text` with the prompt's timbre, following a natural-language instruction
        ("用开心的语气说", "speak slowly"); the instruction is used as written."""
        if not instruct or not instruct.strip():
            raise InputError("instruct2 needs an instruction (instruct text)")
        voice = self._resolve_voice(voice, prompt_audio, "", sample_rate, "instruct2")
        instruct_ids = self._ids(self.prompts.instruction(instruct))
        inputs = [ModelInput(ids, instruct_ids, self._no_tokens(), voice.speech_tokens,
                             voice.speech_feat, voice.embedding)
                  for ids in self._segments(text, text_frontend)]
        return self._run(inputs, stream, speed, seed)

    def sft(self, text: str, speaker: str, *, stream: bool = False, speed: float = 1.0,
            seed: int | None = None, text_frontend: bool = True) -> Iterator[np.ndarray]:
        """Speaks `text` as one of the model's built-in speakers (spk2info.pt)."""
        entry = self.speakers.get(speaker)
        if entry is None:
            available = ", ".join(sorted(self.speakers)) or "none (the model has no spk2info.pt)"
            raise InputError(f"unknown speaker '{speaker}'; available: {available}")
        embedding = entry.embedding if isinstance(entry, Voice) else entry
        inputs = [ModelInput(ids, self._ids(""), self._no_tokens(), self._no_tokens(),
                             torch.zeros(1, 0, self._n_mels), embedding)
                  for ids in self._segments(text, text_frontend, self.prompts.unprompted_text)]
        return self._run(inputs, stream, speed, seed)

    # ---- helpers -----------------------------------------------------------------------------

    def _run(self, inputs: list[ModelInput], stream: bool, speed: float,
             seed: int | None) -> Iterator[np.ndarray]:
        if speed <= 0 or (stream and speed != 1.0):
            raise InputError("speed must be positive, and 1.0 when streaming")
        generator = torch.Generator(self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)

        def chunks() -> Iterator[np.ndarray]:
            for model_input in inputs:
                yield from self.synthesizer.synthesize(model_input, stream, speed, generator)
        return chunks()

    def _normalize(self, text: str) -> str:
        with self._normalizer_lock:
            return self.normalizer.normalize(text)

    def _segments(self, text: str, text_frontend: bool,
                  written: Callable[[str], str] = str) -> list[torch.Tensor]:
        """Text -> token ids [1, L] of each segment to synthesise, each segment first passed
        through `written` (a generation's prompt convention)."""
        if not isinstance(text, str) or not text.strip():
            raise InputError("the text to speak is empty")
        if text_frontend:
            with self._normalizer_lock:
                segments = self.normalizer.split(text)
        else:
            segments = [text]
        segment_ids = [self._ids(written(s)) for s in segments if s]
        if not segment_ids:
            raise InputError("the text has nothing to speak (only punctuation or symbols)")
        return segment_ids

    def _ids(self, text: str) -> torch.Tensor:
        return torch.tensor([self.tokenizer.encode(text) if text else []], dtype=torch.int32).reshape(1, -1)

    @staticmethod
    def _no_tokens() -> torch.Tensor:
        return torch.zeros(1, 0, dtype=torch.int32)


class CosyVoice2(CosyVoice):
    """CosyVoice2-0.5B: see CosyVoice for the modes."""
    generation_info: Generation = COSYVOICE2
    prompts = CosyVoice2Prompts()
    vocoding = CrossFadeVocoding
    silent_tokens: frozenset[int] = frozenset()
    max_silent_run = 0


class CosyVoice3(CosyVoice):
    """Fun-CosyVoice3-0.5B: see CosyVoice for the modes and cosyvoice.inference.prompts for
    how its prompts are written. Text may carry its control tokens (`[breath]`, `<strong>`...)
    and pronunciation units (pinyin such as `[j][ǐ]`, CMU phones such as `[AH0]`)."""
    generation_info: Generation = COSYVOICE3
    prompts = CosyVoice3Prompts()
    vocoding = WholeMelVocoding
    # Speech codes of silence and breath; the reference drops them once more than 5 come in a row.
    silent_tokens = frozenset({1, 2, 28, 29, 55, 248, 494, 2241, 2242, 2322, 2323})
    max_silent_run = 5


MODEL_CLASSES = {cls.generation_info.name: cls for cls in (CosyVoice2, CosyVoice3)}
