"""The models: which CosyVoice models a bundle can hold and where they come from (ModelScope, a local
folder, or for --demo a tiny random model of the same generation made here), plus the ttsfrd
folder and the voice prompts, staged into the folder that becomes pretrained_models.zip."""
from __future__ import annotations

import math
import shutil
import struct
import sys
import wave
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .common import REPO, BuildError, link_or_copy, run, say


@dataclass(frozen=True)
class Model:
    name: str            # what --model takes, when building and when installing
    folder: str          # its folder in pretrained_models.zip: the official download's name
    modelscope_id: str
    generation: int      # what `python -m cosyvoice make-model --generation` makes for --demo

    @property
    def demo_folder(self) -> str:
        return f"CosyVoice{self.generation}-demo-tiny"


# The first is the default of a new bundle.
MODELS = {model.name: model for model in (
    Model("cosyvoice3", "Fun-CosyVoice3-0.5B-2512", "FunAudioLLM/Fun-CosyVoice3-0.5B-2512", 3),
    Model("cosyvoice2", "CosyVoice2-0.5B", "iic/CosyVoice2-0.5B", 2),
)}
ALL = "all"
TTSFRD_FOLDER, TTSFRD_ID = "CosyVoice-ttsfrd", "iic/CosyVoice-ttsfrd"
DEMO_VOICE_NAME = "default"
DEMO_VOICE_TEXT = "Hello, this is the default demo voice."
MODELSCOPE_JUNK = (".msc", ".mv", "._____temp")


def choose(names: list[str] | None) -> list[Model]:
    """--model values (repeatable; `all` is every model) in the order named, without repeats; the
    first is the bundle's default. None: the default model alone."""
    chosen: list[Model] = []
    for name in names or [next(iter(MODELS))]:
        if name != ALL and name not in MODELS:
            raise BuildError(f"--model {name} is unknown: use {', '.join([*MODELS, ALL])}")
        for model in MODELS.values() if name == ALL else [MODELS[name]]:
            if model not in chosen:
                chosen.append(model)
    return chosen


# --- real models -------------------------------------------------------------------------------


def copy_models(models: list[Model], source: Path, staging: Path) -> None:
    """--models-from: FOLDER/ of each model and the ttsfrd folder, hard-linked where possible."""
    for folder in [model.folder for model in models] + [TTSFRD_FOLDER]:
        if not (source / folder).is_dir():
            raise BuildError(f"--models-from {source} has no {folder}/ folder")
    for folder in [model.folder for model in models] + [TTSFRD_FOLDER]:
        say(f"copying {source / folder}")
        shutil.copytree(source / folder, staging / folder, copy_function=link_or_copy)


def download_models(models: list[Model], staging: Path, cache: Path) -> None:
    """Each model and the ttsfrd folder from ModelScope into cache/FOLDER (rerun: it resumes),
    then linked into staging without ModelScope's bookkeeping files."""
    try:
        from modelscope import snapshot_download
    except ImportError as exc:
        raise BuildError("modelscope is not installed here: pip install modelscope, or pass "
                         "--models-from DIR with " + ", ".join(
                             f"{m.folder}/" for m in models) + f" and {TTSFRD_FOLDER}/") from exc
    for folder, model_id in [(m.folder, m.modelscope_id) for m in models] + [
            (TTSFRD_FOLDER, TTSFRD_ID)]:
        say(f"modelscope: {model_id}")
        local = cache / folder
        snapshot_download(model_id, local_dir=str(local))
        shutil.copytree(local, staging / folder, copy_function=link_or_copy,
                        ignore=shutil.ignore_patterns(*MODELSCOPE_JUNK))


def copy_voices(voices: Path, staging: Path) -> None:
    """--voices: its [name]transcript.wav prompts join the bundle's voices/ (the demo has one)."""
    shutil.copytree(voices, staging / "voices", copy_function=link_or_copy, dirs_exist_ok=True)


def count_voices(staging: Path) -> int:
    return len(list((staging / "voices").glob("*.wav"))) if (staging / "voices").is_dir() else 0


def zip_members_size(folder: Path) -> int:
    """What unzipping the zips inside a model folder adds (ttsfrd's resource.zip)."""
    total = 0
    for inner in folder.rglob("*.zip"):
        with zipfile.ZipFile(inner) as archive:
            total += sum(info.file_size for info in archive.infolist())
    return total


# --- demo models -------------------------------------------------------------------------------


def make_demo_models(models: list[Model], staging: Path) -> None:
    """A tiny random-weight model of each model's generation (it speaks noise), and one voice."""
    for model in models:
        say(f"demo model {model.demo_folder} (tiny, random weights)")
        run([sys.executable, "-m", "cosyvoice", "make-model", "--size", "tiny",
             "--generation", str(model.generation), "--out", staging / model.demo_folder],
            cwd=REPO)
    voices = staging / "voices"
    voices.mkdir()
    demo_voice(voices / f"[{DEMO_VOICE_NAME}]{DEMO_VOICE_TEXT}.wav")


def demo_voice(path: Path, seconds: float = 2.5, rate: int = 16000) -> None:
    """A harmonic tone with a slow pitch glide and syllable-like bursts: enough to be a prompt."""
    frames = bytearray()
    phase = 0.0
    for i in range(int(seconds * rate)):
        t = i / rate
        f0 = 140.0 + 30.0 * math.sin(2 * math.pi * 0.7 * t)
        phase += 2 * math.pi * f0 / rate
        envelope = 0.5 * (1 - math.cos(2 * math.pi * min(t / 0.25, 1.0))) if t < 0.125 else 1.0
        envelope *= 0.55 + 0.45 * math.sin(2 * math.pi * 4.0 * t) ** 2
        sample = sum(math.sin(k * phase) / k for k in range(1, 6)) * 0.18 * envelope
        frames += struct.pack("<h", max(-32767, min(32767, int(sample * 32767))))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(bytes(frames))
