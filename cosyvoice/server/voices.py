"""The voice store: named voices, prepared once and kept in the voice folder's `.store/` beside
their prompt audio, so a restart loads them; `[name]transcript.wav` files in the folder are
imported at start. A voice of another model generation is prepared again from its prompt audio,
or refused with a 409 when that audio is gone.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from ..errors import InputError
from ..frontend.audio import AudioError
from ..voice import Voice
from .errors import ApiError

log = logging.getLogger("cosyvoice.server")

STORE_FOLDER = ".store"
IMPORT_PATTERN = re.compile(r"\[(?P<name>[^\[\]]+)\](?P<text>.*)")
AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg"}
# A name becomes a file name: no separators, brackets, wildcards, control characters or text
# UTF-8 cannot hold.
FORBIDDEN_IN_NAME = re.compile(r"[\x00-\x1f\x7f/\\\[\]:*?\"<>|\ud800-\udfff]")
MAX_NAME_CHARS = 64
MAX_NAME_BYTES = 200
SILENCE_PEAK = 1e-4   # a prompt whose loudest sample is below this has nothing to imitate
MAX_PROMPT_SECONDS = 30.0    # the runtime refuses longer prompts (frontend/speech_models.py)
MAX_PROMPT_RATE = 192_000    # Hz; beyond any recording meant as a voice prompt
DECODE_BLOCK = 1 << 20       # samples (frames x channels) decoded at a time


def check_name(name: str) -> str:
    """Returns the name, or raises a 400 saying why it cannot name a voice."""
    if not isinstance(name, str) or not name.strip():
        raise ApiError(400, "the voice name is empty")
    if name != name.strip():
        raise ApiError(400, f"the voice name {name!r} starts or ends with spaces")
    if len(name) > MAX_NAME_CHARS or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ApiError(400, f"the voice name is longer than {MAX_NAME_CHARS} characters")
    if name.startswith(".") or FORBIDDEN_IN_NAME.search(name):
        raise ApiError(400, f"the voice name {name!r} may not start with '.' or contain "
                            "/ \\ [ ] : * ? \" < > | or control characters")
    return name


def voice_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (prompt file, transcript) of each `[name]transcript.wav` file in `folder`; a file
    whose name cannot name a voice is skipped with a warning."""
    files = {}
    for path in sorted(folder.iterdir()):
        match = IMPORT_PATTERN.fullmatch(path.stem)
        if not path.is_file() or path.suffix.lower() not in AUDIO_SUFFIXES or not match:
            continue
        try:
            name = check_name(match.group("name").strip())
        except ApiError as error:
            log.warning("voice file %s skipped: %s", path, error.message)
            continue
        files[name] = (path, match.group("text").strip())
    return files


def read_prompt(audio: bytes, max_seconds: float = MAX_PROMPT_SECONDS) -> tuple[np.ndarray, int]:
    """Decodes prompt audio (any libsndfile format) to mono float32, block by block, and stops
    after `max_seconds` whatever the header claims: a small file that expands to hours (FLAC of
    silence, a low-bitrate MP3) costs no more memory than a prompt at the limit. Refuses longer
    audio, unreadable data and silence. Raises AudioError (a 400)."""
    pieces, frames = [], 0
    try:
        with sf.SoundFile(io.BytesIO(audio)) as file:
            rate, channels = file.samplerate, file.channels
            if not 0 < rate <= MAX_PROMPT_RATE:
                raise AudioError(f"the prompt audio's sample rate is {rate} Hz; send a recording "
                                 f"of at most {MAX_PROMPT_RATE} Hz")
            limit = int(max_seconds * rate)
            block = max(1, DECODE_BLOCK // channels)
            while frames <= limit:
                data = file.read(min(block, limit + 1 - frames), dtype="float32", always_2d=True)
                if not len(data):
                    break
                pieces.append(data.mean(axis=1, dtype=np.float32))
                frames += len(data)
    except AudioError:
        raise
    except sf.LibsndfileError as error:
        raise AudioError(f"the prompt audio could not be read ({error.error_string.strip()}); "
                         "send WAV, FLAC, MP3 or OGG") from None
    except (RuntimeError, TypeError, ValueError) as error:   # soundfile's own checks
        raise AudioError(f"the prompt audio could not be read ({error}); "
                         "send WAV, FLAC, MP3 or OGG") from None
    if frames > limit:
        raise AudioError(f"the prompt audio is longer than {max_seconds:g} s; send 3 to "
                         f"{max_seconds:g} s of clear speech")
    if frames == 0:
        raise AudioError("the prompt audio is empty")
    samples = np.concatenate(pieces)
    if not np.all(np.isfinite(samples)):
        raise AudioError("the prompt audio contains NaN or infinite samples")
    if float(np.max(np.abs(samples))) < SILENCE_PEAK:
        raise AudioError("the prompt audio is silent; record a few seconds of clear speech")
    return samples, rate


def prompt_digest(audio: bytes, prompt_text: str) -> str:
    """sha256 of the audio, a NUL and the transcript: fed piece by piece, so a 25 MiB upload is
    not copied, yet the digest equals that of the joined bytes (stored revisions depend on it)."""
    digest = hashlib.sha256(audio)
    digest.update(b"\0")
    digest.update(prompt_text.encode("utf-8"))
    return digest.hexdigest()


def revision_of(audio: bytes, prompt_text: str) -> str:
    """A voice's revision: an imported file that changes is prepared again, and response-cache
    keys include it."""
    return prompt_digest(audio, prompt_text)[:16]


@dataclass(frozen=True)
class VoiceInfo:
    name: str
    prompt_text: str      # as given, before text normalisation
    revision: str
    created: float        # unix time of registration
    source: str           # file name in the voice folder, or "api"


@dataclass(frozen=True)
class StoredVoice:
    info: VoiceInfo
    voice: Voice


class VoiceStore:
    """Thread-safe: registration runs in worker threads while requests read."""

    def __init__(self, folder: Path, default_name: str = "default"):
        self.folder = Path(folder)
        self.store = self.folder / STORE_FOLDER
        self.default_name = default_name
        self.generation: str | None = None   # the model's, once open()
        self._voices: dict[str, StoredVoice] = {}
        self._registering: set[str] = set()   # names being prepared by register()
        self._lock = threading.Lock()

    # ---- start -----------------------------------------------------------------------------------

    def open(self, tts) -> dict[str, int]:
        """Loads stored voices and imports the folder's prompt files. Returns counts of voices
        `loaded` from the store, `prepared` anew (or again, for this model's generation) and
        `skipped` (unusable files, logged)."""
        self.store.mkdir(parents=True, exist_ok=True)
        self.generation = tts.generation
        counts = {"loaded": 0, "prepared": 0, "skipped": 0}
        imports = self._import_files()
        for name, stored_voice in self._read_store(counts).items():
            source = stored_voice.info.source
            if source == "api" or (name in imports and imports[name][0].name == source
                                   and imports[name][2] == stored_voice.info.revision):
                if stored_voice.voice.generation != self.generation:
                    stored_voice = self._prepare_again(tts, stored_voice, counts)
                else:
                    counts["loaded"] += 1
                self._voices[name] = stored_voice
            elif name not in imports:
                log.info("voice %s: its file %s is gone from %s; forgetting it", name, source, self.folder)
                self._remove_files(name)
        for name, (path, text, _) in imports.items():
            if name in self._voices:
                continue
            try:
                self._add(tts, name, text, path.read_bytes(), source=path.name)
            except AudioError as error:
                log.warning("voice file %s skipped: %s", path, error)
                counts["skipped"] += 1
                continue
            counts["prepared"] += 1
        log.info("voices: %d loaded from %s, %d prepared, %d skipped", counts["loaded"], self.store,
                 counts["prepared"], counts["skipped"])
        return counts

    def _prepare_again(self, tts, stored: StoredVoice, counts: dict[str, int]) -> StoredVoice:
        """The voice prepared by this model from its prompt audio (same name, transcript,
        revision and creation time); unchanged, and refused by resolve(), if that cannot be."""
        info, old = stored.info, stored.voice.generation
        try:
            samples, rate = read_prompt(self._prompt_path(info).read_bytes())
            voice = tts.prepare_voice(samples, info.prompt_text, sample_rate=rate)
        except (OSError, InputError) as error:   # InputError: AudioError, or a prompt this model refuses
            log.warning("voice %s was prepared by %s, and this model is %s; it cannot be prepared "
                        "again (%s), so requests for it are refused", info.name, old, self.generation, error)
            counts["skipped"] += 1
            return stored
        with self._lock:
            write_atomically(self.store / f"{info.name}.voice", voice.save)
        log.info("voice %s: prepared again for %s (it was prepared by %s)", info.name, self.generation, old)
        counts["prepared"] += 1
        return StoredVoice(info, voice)

    def _read_store(self, counts: dict[str, int]) -> dict[str, StoredVoice]:
        voices = {}
        for meta_path in sorted(self.store.glob("*.json")):
            name = meta_path.stem
            try:
                info = VoiceInfo(**json.loads(meta_path.read_text(encoding="utf-8")))
                voice = Voice.load(self.store / f"{name}.voice")
            except (OSError, ValueError, TypeError) as error:   # InputError is a ValueError
                log.warning("stored voice %s is unreadable (%s); it will be prepared again if its "
                            "prompt file is in the folder", name, error)
                counts["skipped"] += 1
                continue
            voices[name] = StoredVoice(info, voice)
        return voices

    def _import_files(self) -> dict[str, tuple[Path, str, str]]:
        """name -> (prompt file, transcript, revision) of each `[name]transcript.wav` file."""
        return {name: (path, text, revision_of(path.read_bytes(), text))
                for name, (path, text) in voice_files(self.folder).items()}

    # ---- API ---------------------------------------------------------------------------------

    def list(self) -> list[VoiceInfo]:
        with self._lock:
            return sorted((v.info for v in self._voices.values()), key=lambda info: info.created)

    def get(self, name: str) -> StoredVoice:
        with self._lock:
            found = self._voices.get(name)
        if found is None:
            raise ApiError(404, f"no voice named '{name}'")
        return found

    def resolve(self, name: str | None) -> StoredVoice:
        """The voice a request names; no name or 'default' picks the default voice. A voice of
        another model generation (see open) is a 409."""
        return self._usable(self._find(name))

    def _find(self, name: str | None) -> StoredVoice:
        with self._lock:
            if name and name != "default":
                if name in self._voices:
                    return self._voices[name]
                known = ", ".join(sorted(self._voices)) or "none registered"
                raise ApiError(400, f"unknown voice '{name}'; available: {known}")
            for candidate in (self.default_name, "default"):
                if candidate in self._voices:
                    return self._voices[candidate]
            if self._voices:
                return min(self._voices.values(), key=lambda v: v.info.created)
        raise ApiError(400, "no voice is registered yet: register one with POST /api/voices "
                            f"or put '[name]transcript.wav' files in {self.folder}")

    def _usable(self, stored: StoredVoice) -> StoredVoice:
        voice_generation = stored.voice.generation
        if self.generation is not None and voice_generation != self.generation:
            name = stored.info.name
            raise ApiError(409, f"voice '{name}' was prepared by a {voice_generation} model and this "
                                f"server runs {self.generation}; its prompt audio is missing or "
                                "unreadable, so it could not be prepared again: delete it (DELETE "
                                f"/api/voices/{name}) and register it again")
        return stored

    def register(self, tts, name: str, prompt_text: str, audio: bytes) -> VoiceInfo:
        """Prepares and saves a voice (slow: run it off the event loop). A name that is taken, or
        being registered by another request, is a 409: the name is claimed under the lock before
        the voice is prepared, so of racing registrations exactly one succeeds."""
        check_name(name)
        with self._lock:
            if name in self._voices or name in self._registering:
                raise ApiError(409, f"a voice named '{name}' exists; delete it first")
            self._registering.add(name)
        try:
            return self._add(tts, name, prompt_text.strip(), audio, source="api").info
        finally:
            with self._lock:
                self._registering.discard(name)

    def delete(self, name: str) -> None:
        stored = self.get(name)
        with self._lock:
            self._voices.pop(name, None)
            self._remove_files(name)
            if stored.info.source != "api":
                (self.folder / stored.info.source).unlink(missing_ok=True)

    # ---- files ---------------------------------------------------------------------------------

    def _add(self, tts, name: str, prompt_text: str, audio: bytes, source: str) -> StoredVoice:
        samples, rate = read_prompt(audio)
        voice = tts.prepare_voice(samples, prompt_text, sample_rate=rate)
        info = VoiceInfo(name, prompt_text, revision_of(audio, prompt_text), time.time(), source)
        stored = StoredVoice(info, voice)
        with self._lock:
            if source == "api":
                write_atomically(self.store / f"{name}.wav",
                                  lambda path: sf.write(path, samples, rate, subtype="PCM_16", format="WAV"))
            write_atomically(self.store / f"{name}.voice", voice.save)
            write_atomically(self.store / f"{name}.json",
                              lambda path: Path(path).write_text(json.dumps(asdict(info), ensure_ascii=False),
                                                                 encoding="utf-8"))
            self._voices[name] = stored
        return stored

    def audio_path(self, name: str) -> Path:
        """The prompt audio file of a voice; 404 if someone removed it from the disk."""
        path = self._prompt_path(self.get(name).info)
        if not path.is_file():
            log.warning("voice %s: its prompt file %s is gone", name, path)
            raise ApiError(404, f"the prompt audio of voice '{name}' is missing on the server")
        return path

    def _prompt_path(self, info: VoiceInfo) -> Path:
        """Where a voice's prompt audio is kept: .store/ for registered voices, else the imported file."""
        return self.store / f"{info.name}.wav" if info.source == "api" else self.folder / info.source

    def _remove_files(self, name: str) -> None:
        for suffix in (".json", ".voice", ".wav"):
            (self.store / f"{name}{suffix}").unlink(missing_ok=True)


def write_atomically(path: Path, write) -> None:
    """Writes through a temporary file renamed into place, so a crash leaves no half file."""
    temporary = path.with_name(f".{path.name}.tmp")
    write(str(temporary))
    os.replace(temporary, path)
