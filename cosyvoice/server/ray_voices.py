"""Voices across a Ray Serve cluster (cosyvoice.serve_ray), with no shared file system.

One registry (`VoiceRegistry`, a one-replica deployment pinned to the head node) is the source of
truth: every voice's transcript, prompt audio and prepared features, kept in the head's voice
folder in the same layout as `VoiceStore` (`.store/NAME.json|.voice|.wav`, imported
`[name]transcript.wav` files), so `server.py` and `serve_ray` read each other's folders. Each model
replica keeps a cache (`ClusterVoiceStore`, a `VoiceStore` whose folder is a local temporary
directory) that the routers read exactly as they read the single-server store.

Why this shape:
- Rented boxes rarely share a disk, so files cannot be the meeting point; one actor can. Its state
  is small (a few MB per voice at most) and changes rarely, so one copy on the head is enough,
  and the head's disk keeps it across registry restarts.
- Preparing a voice needs the model (speech tokenizer, speaker encoder), which only replicas have:
  the replica that receives a registration prepares it and sends audio and features to the
  registry; other replicas download the features instead of computing them again. Imported files
  reach the registry unprepared; the first replica that opens prepares them and sends the
  features back (`put_prepared`).
- Read-your-writes across replicas: before each request a replica asks the registry for what
  changed since its last look (`changes`, one small actor call; nothing comes back when nothing
  changed). A voice registered through one replica is therefore visible to every request that
  starts after the registration answered, whichever replica serves it. When the registry does
  not answer in time the replica serves from its cache (and registration or deletion answer 503).
- A replica that restarts (or a new one, when autoscaling) downloads the whole state and serves
  the voices without preparing them again. The registry numbers its state with an `epoch` chosen
  at its start, so a replica notices a restarted registry and takes its whole state again.
- Small settings that server.py keeps per process and clients expect to hold for the server
  (xtts-api-server's /set_tts_settings) travel the same way (`put_shared`, `shared`).

The registry's calls go through a client with `call` (blocking: loader and worker threads) and
`acall` (awaitable: the event loop): `HandleClient` wraps a Ray Serve deployment handle,
`LocalClient` a registry in the same process (unit tests).
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import soundfile as sf

from ..errors import InputError
from ..voice import Voice
from .errors import ApiError, Overloaded
from .voices import (STORE_FOLDER, StoredVoice, VoiceInfo, VoiceStore, check_name, read_prompt,
                     revision_of, voice_files, write_atomically)

log = logging.getLogger("cosyvoice.server")

REGISTRY_TIMEOUT_S = 10.0   # a blocking call (register, delete)
OPEN_TIMEOUT_S = 300.0      # a replica's first download (the registry may still be starting)
REFRESH_TIMEOUT_S = 2.0     # the per-request look for changes; past it the cache serves
REFRESH_PAUSE_S = 5.0       # after a look that failed, requests do not ask again for this long
RETRY_AFTER_S = 2


def voice_bytes(voice: Voice) -> bytes:
    """A prepared voice as the bytes of its file (Voice.save's format)."""
    with tempfile.TemporaryDirectory(prefix="cosyvoice-voice-") as folder:
        path = Path(folder) / "voice"
        voice.save(path)
        return path.read_bytes()


def voice_from_bytes(data: bytes) -> Voice:
    with tempfile.TemporaryDirectory(prefix="cosyvoice-voice-") as folder:
        path = Path(folder) / "voice"
        path.write_bytes(data)
        return Voice.load(path)


def wav_bytes(samples, rate: int) -> bytes:
    """Prompt audio as kept for voices registered through the API (16-bit WAV, like VoiceStore)."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


@dataclass
class Entry:
    """One voice in the registry. `audio_file`: where its prompt audio lives relative to the voice
    folder (`.store/NAME.wav` for API voices, the imported file's name otherwise)."""
    info: VoiceInfo
    audio: bytes
    audio_file: str
    voice: bytes | None = None          # prepared features (Voice.save), None until a replica prepares
    generation: str | None = None       # the model generation that prepared them
    changed: int = 0                    # the registry's version when this entry last changed

    def record(self) -> dict:
        return {"info": asdict(self.info), "audio": self.audio, "audio_file": self.audio_file,
                "voice": self.voice, "generation": self.generation, "changed": self.changed}


@dataclass
class VoiceRegistry:
    """The cluster's voices and shared settings, persisted in `folder` (on the head node).
    Thread-safe: Ray Serve may run its sync methods on several threads."""
    folder: Path
    epoch: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self):
        self.folder = Path(self.folder)
        self.store = self.folder / STORE_FOLDER
        self.version = 0
        self._entries: dict[str, Entry] = {}
        self._deleted: dict[str, int] = {}      # name -> version of its deletion
        self._shared: dict = {}
        self._shared_version = 0
        self._lock = threading.Lock()
        self.store.mkdir(parents=True, exist_ok=True)
        self._load()

    # ---- start ---------------------------------------------------------------------------------

    def _load(self) -> None:
        """The stored voices and the folder's `[name]transcript.wav` files (unprepared when new or
        changed), like VoiceStore.open but without a model."""
        imports = voice_files(self.folder)   # name -> (file, transcript)
        for meta_path in sorted(self.store.glob("*.json")):
            name = meta_path.stem
            try:
                info = VoiceInfo(**json.loads(meta_path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError) as error:
                log.warning("stored voice %s is unreadable (%s); skipped", name, error)
                continue
            if info.source != "api" and name not in imports:
                log.info("voice %s: its file %s is gone from %s; forgetting it", name, info.source,
                         self.folder)
                self._remove_files(name)
                continue
            audio_file = f"{STORE_FOLDER}/{name}.wav" if info.source == "api" else info.source
            audio_path = self.folder / audio_file
            audio = audio_path.read_bytes() if audio_path.is_file() else b""
            if info.source != "api" and (imports[name][0].name != info.source
                                         or revision_of(audio, info.prompt_text) != info.revision):
                continue   # the imported file changed: imported again below
            entry = Entry(info, audio, audio_file)
            try:
                prepared = Voice.load(self.store / f"{name}.voice")
                entry.voice, entry.generation = voice_bytes(prepared), prepared.generation
            except (OSError, InputError) as error:
                log.warning("stored voice %s has no readable features (%s); a replica will prepare "
                            "it again", name, error)
            self._entries[name] = entry
        for name, (path, text) in imports.items():
            if name not in self._entries:
                audio = path.read_bytes()
                info = VoiceInfo(name, text, revision_of(audio, text), time.time(), path.name)
                self._entries[name] = Entry(info, audio, path.name)
        log.info("voice registry: %d voices in %s (%d to be prepared by a replica)", len(self._entries),
                 self.folder, sum(entry.voice is None for entry in self._entries.values()))

    # ---- what replicas call --------------------------------------------------------------------

    def changes(self, epoch: str | None, version: int) -> dict:
        """What changed since `version` of `epoch`: the changed voices' records and the deleted
        names; everything (`reset`) for another epoch; `shared` when the shared settings changed."""
        with self._lock:
            reset = epoch != self.epoch
            since = -1 if reset else version
            if not reset and version >= self.version:
                return {"epoch": self.epoch, "version": self.version, "reset": False, "voices": [],
                        "deleted": [], "shared": None}
            return {"epoch": self.epoch, "version": self.version, "reset": reset,
                    "voices": [entry.record() for entry in self._entries.values() if entry.changed > since],
                    "deleted": [name for name, at in self._deleted.items() if at > since and not reset],
                    "shared": dict(self._shared) if reset or self._shared_version > since else None}

    def add(self, record: dict) -> dict:
        """Adds a voice prepared by a replica. {"changed": version}, or {"error": 409, ...} when
        the name is taken."""
        info = VoiceInfo(**record["info"])
        with self._lock:
            if info.name in self._entries:
                return {"error": 409, "message": f"a voice named '{info.name}' exists; delete it first"}
            entry = Entry(info, record["audio"], f"{STORE_FOLDER}/{info.name}.wav", record["voice"],
                          record["generation"])
            self._write(entry, audio=True)
            return {"changed": self._changed(entry)}

    def put_prepared(self, name: str, revision: str, generation: str, voice: bytes) -> bool:
        """Features a replica prepared for a voice that had none for its generation."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.info.revision != revision or (entry.voice is not None
                                                                     and entry.generation == generation):
                return False
            entry.voice, entry.generation = voice, generation
            self._write(entry)
            self._changed(entry)
            return True

    def delete(self, name: str) -> bool:
        """Forgets a voice, its files and its imported file; False if there is none of that name."""
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is None:
                return False
            self._remove_files(name)
            if entry.info.source != "api":
                (self.folder / entry.info.source).unlink(missing_ok=True)
            self.version += 1
            self._deleted[name] = self.version
            return True

    def put_shared(self, key: str, value) -> int:
        with self._lock:
            self._shared[key] = value
            self.version += 1
            self._shared_version = self.version
            return self.version

    # ---- files ---------------------------------------------------------------------------------

    def _changed(self, entry: Entry) -> int:
        self.version += 1
        entry.changed = self.version
        self._entries[entry.info.name] = entry
        self._deleted.pop(entry.info.name, None)
        return self.version

    def _write(self, entry: Entry, audio: bool = False) -> None:
        name = entry.info.name
        if audio:
            write_atomically(self.store / f"{name}.wav", lambda path: Path(path).write_bytes(entry.audio))
        if entry.voice is not None:
            write_atomically(self.store / f"{name}.voice", lambda path: Path(path).write_bytes(entry.voice))
        write_atomically(self.store / f"{name}.json",
                          lambda path: Path(path).write_text(json.dumps(asdict(entry.info), ensure_ascii=False),
                                                             encoding="utf-8"))

    def _remove_files(self, name: str) -> None:
        for suffix in (".json", ".voice", ".wav"):
            (self.store / f"{name}{suffix}").unlink(missing_ok=True)


class LocalClient:
    """The registry client for a registry in this process (tests)."""

    def __init__(self, registry: VoiceRegistry):
        self.registry = registry

    def call(self, method: str, *args, timeout_s: float | None = None):
        return getattr(self.registry, method)(*args)

    async def acall(self, method: str, *args):
        return getattr(self.registry, method)(*args)


class HandleClient:
    """The registry client for a Ray Serve deployment handle. `call` blocks, so it must run off
    the event loop (Ray refuses it there); `acall` awaits."""

    def __init__(self, handle, timeout_s: float = REGISTRY_TIMEOUT_S):
        self.handle = handle
        self.timeout_s = timeout_s

    def call(self, method: str, *args, timeout_s: float | None = None):
        return getattr(self.handle, method).remote(*args).result(timeout_s=timeout_s or self.timeout_s)

    async def acall(self, method: str, *args):
        return await getattr(self.handle, method).remote(*args)


class ClusterVoiceStore(VoiceStore):
    """A replica's view of the registry: the routers read it like a VoiceStore; registration and
    deletion go through the registry; `refresh()` (before each request) takes in what other
    replicas changed. Its folder is a local cache of prompt audio (for /api/voices/NAME/audio)."""

    def __init__(self, registry, cache_folder: Path | None = None, default_name: str = "default"):
        folder = Path(cache_folder) if cache_folder else Path(tempfile.mkdtemp(prefix="cosyvoice-voice-cache-"))
        super().__init__(folder, default_name)
        self.registry = registry
        self.shared: dict = {}                   # shared settings, as the registry last sent them
        self._epoch: str | None = None
        self._version = -1
        self._installed: dict[str, int] = {}     # name -> the registry's change number installed
        self._tts = None
        self._refreshing: asyncio.Lock | None = None
        self._paused_until = 0.0                 # monotonic time: the registry did not answer

    def open(self, tts) -> dict[str, int]:
        """Takes the registry's whole state (blocking: the model loader's thread), preparing the
        voices that have no features for this model yet."""
        self.store.mkdir(parents=True, exist_ok=True)
        self.generation, self._tts = tts.generation, tts
        counts = self._apply(self._call("changes", None, -1, timeout_s=OPEN_TIMEOUT_S))
        log.info("voices: %d from the registry, %d of them prepared here", len(self._voices), counts["prepared"])
        return counts

    async def refresh(self) -> None:
        """Takes in what changed at the registry since the last look (one call; nothing to do when
        nothing changed). When the registry does not answer in time the cache serves as it is."""
        if self._tts is None or time.monotonic() < self._paused_until:
            return
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            try:
                changes = await asyncio.wait_for(self.registry.acall("changes", self._epoch, self._version),
                                                 REFRESH_TIMEOUT_S)
            except Exception as error:   # a Ray error or a timeout: the registry is restarting
                log.warning("the voice registry did not answer (%s); serving the voices cached here "
                            "for %g s", error or type(error).__name__, REFRESH_PAUSE_S)
                self._paused_until = time.monotonic() + REFRESH_PAUSE_S
                return
            if changes["voices"] or changes["deleted"] or changes["reset"] or changes["shared"] is not None:
                await asyncio.to_thread(self._apply, changes)

    def _apply(self, changes: dict) -> dict[str, int]:
        counts = {"prepared": 0}
        if changes["shared"] is not None:
            self.shared = changes["shared"]
        names = {record["info"]["name"] for record in changes["voices"]}
        gone = set(changes["deleted"])
        if changes["reset"]:
            gone |= set(self._installed) - names
        for name in gone:
            self._forget(name)
        for record in changes["voices"]:
            if self._installed.get(record["info"]["name"]) != record["changed"]:
                counts["prepared"] += self._install(record)
        self._epoch, self._version = changes["epoch"], changes["version"]
        return counts

    def _install(self, record: dict, voice: Voice | None = None) -> int:
        """Puts one registry record in the cache (`voice`: its features, when at hand); prepares
        it first (and sends the features back) when the registry has none for this model.
        Returns 1 if it was prepared here."""
        info = VoiceInfo(**record["info"])
        audio_path = self.folder / record["audio_file"]
        if record["audio"]:
            audio_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(audio_path, lambda path: Path(path).write_bytes(record["audio"]))
        prepared = 0
        if voice is not None:
            pass
        elif record["voice"] is not None and record["generation"] == self.generation:
            voice = voice_from_bytes(record["voice"])
        else:
            try:
                samples, rate = read_prompt(record["audio"])
                voice = self._tts.prepare_voice(samples, info.prompt_text, sample_rate=rate)
            except (InputError, ValueError) as error:   # unreadable audio: keep what there is
                log.warning("voice %s cannot be prepared for %s (%s)", info.name, self.generation, error)
                if record["voice"] is None:
                    return 0
                voice = voice_from_bytes(record["voice"])   # another generation's: resolve() says 409
            else:
                prepared = 1
                try:
                    self._call("put_prepared", info.name, info.revision, self.generation, voice_bytes(voice))
                except ApiError as error:
                    log.warning("voice %s: features not sent to the registry (%s)", info.name, error.message)
        with self._lock:
            self._voices[info.name] = StoredVoice(info, voice)
            self._installed[info.name] = record["changed"]
        return prepared

    def _forget(self, name: str) -> None:
        with self._lock:
            stored = self._voices.pop(name, None)
            self._installed.pop(name, None)
        if stored is not None:
            self._prompt_path(stored.info).unlink(missing_ok=True)

    # ---- API (called off the event loop: worker threads) ---------------------------------------

    def register(self, tts, name: str, prompt_text: str, audio: bytes) -> VoiceInfo:
        """Prepares the voice here and adds it at the registry, which refuses a name taken on any
        replica (409)."""
        check_name(name)
        prompt_text = prompt_text.strip()
        with self._lock:
            if name in self._voices or name in self._registering:
                raise ApiError(409, f"a voice named '{name}' exists; delete it first")
            self._registering.add(name)
        try:
            samples, rate = read_prompt(audio)
            voice = tts.prepare_voice(samples, prompt_text, sample_rate=rate)
            info = VoiceInfo(name, prompt_text, revision_of(audio, prompt_text), time.time(), "api")
            record = {"info": asdict(info), "audio": wav_bytes(samples, rate), "voice": voice_bytes(voice),
                      "generation": voice.generation}
            answer = self._call("add", record)
            if "error" in answer:
                raise ApiError(answer["error"], answer["message"])
            self._install({**record, "audio_file": f"{STORE_FOLDER}/{name}.wav", "changed": answer["changed"]},
                          voice)
            return info
        finally:
            with self._lock:
                self._registering.discard(name)

    def delete(self, name: str) -> None:
        self.get(name)   # 404 when unknown here
        if not self._call("delete", name):
            self._forget(name)
            raise ApiError(404, f"no voice named '{name}'")
        self._forget(name)

    def put_shared(self, key: str, value) -> None:
        self.shared = {**self.shared, key: value}
        self._call("put_shared", key, value)

    def _call(self, method: str, *args, timeout_s: float | None = None):
        try:
            return self.registry.call(method, *args, timeout_s=timeout_s)
        except Exception as error:   # Ray's errors and timeouts
            raise Overloaded(f"the voice registry is not reachable ({type(error).__name__}); try again "
                             "shortly", RETRY_AFTER_S) from error

