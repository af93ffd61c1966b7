"""The cluster-wide voice registry of serve_ray (server/ray_voices.py), without Ray: a registry
and replica caches in one process, joined by LocalClient. test_serve_ray.py runs them on Ray."""
import asyncio
import json

import numpy as np
import pytest

from cosyvoice.server.errors import ApiError
from cosyvoice.server.ray_voices import ClusterVoiceStore, LocalClient, VoiceRegistry
from cosyvoice.voice import Voice

from server_harness import wav_bytes
from test_server_units import FakeModel

RATE = 16000


def prompt(seconds: float = 1.0, seed: int = 0) -> bytes:
    noise = np.random.default_rng(seed).standard_normal(int(RATE * seconds)).astype(np.float32) * 0.1
    return wav_bytes(noise, RATE)


def replica(registry: VoiceRegistry, tmp_path, name: str, model=None) -> tuple[ClusterVoiceStore, FakeModel]:
    model = model or FakeModel()
    store = ClusterVoiceStore(LocalClient(registry), tmp_path / f"cache-{name}")
    store.open(model)
    return store, model


def test_a_voice_registered_on_one_replica_reaches_the_others_prepared_once(tmp_path):
    folder = tmp_path / "voices"
    folder.mkdir()
    (folder / "[alice]Hello there.wav").write_bytes(prompt(seed=1))
    registry = VoiceRegistry(folder)
    first, first_model = replica(registry, tmp_path, "a")
    second, second_model = replica(registry, tmp_path, "b")
    # the imported file is prepared by the first replica that opens; the second downloads it
    assert (first_model.prepared, second_model.prepared) == (1, 0)
    assert [info.name for info in second.list()] == ["alice"]
    assert second.audio_path("alice").read_bytes() == (folder / "[alice]Hello there.wav").read_bytes()

    info = first.register(first_model, "bob", " Bob speaking. ", prompt(seed=2))
    assert info.prompt_text == "Bob speaking."
    assert "bob" not in {voice.name for voice in second.list()}
    asyncio.run(second.refresh())
    assert second.resolve("bob").info == info and second_model.prepared == 0
    assert (folder / ".store" / "bob.wav").is_file() and (folder / ".store" / "bob.voice").is_file()
    with pytest.raises(ApiError) as taken:
        second.register(second_model, "bob", "", prompt(seed=3))
    assert taken.value.status == 409

    second.delete("bob")
    asyncio.run(first.refresh())
    with pytest.raises(ApiError):
        first.resolve("bob")
    assert not (folder / ".store" / "bob.json").exists()


def test_the_registry_restarts_from_its_folder_and_replicas_take_its_new_state(tmp_path):
    folder = tmp_path / "voices"
    folder.mkdir()
    registry = VoiceRegistry(folder)
    store, model = replica(registry, tmp_path, "a")
    store.register(model, "carol", "Carol here.", prompt(seed=4))
    registry.put_shared("xtts_settings", {"speed": 1.5})

    restarted = VoiceRegistry(folder)          # a new epoch: replicas take everything again
    assert json.loads((folder / ".store" / "carol.json").read_text())["name"] == "carol"
    store.registry = LocalClient(restarted)
    restarted.delete("carol")
    asyncio.run(store.refresh())
    assert store.list() == [] and store.shared == {}

    fresh, fresh_model = replica(VoiceRegistry(folder), tmp_path, "b")
    assert fresh.list() == [] and fresh_model.prepared == 0


def test_features_of_another_generation_are_prepared_again_and_sent_back(tmp_path):
    folder = tmp_path / "voices"
    folder.mkdir()
    registry = VoiceRegistry(folder)
    old, old_model = replica(registry, tmp_path, "old")
    old.register(old_model, "dave", "Dave.", prompt(seed=5))
    # the cluster now serves CosyVoice3: the first replica prepares again, the next downloads
    registry = VoiceRegistry(folder)
    first, first_model = replica(registry, tmp_path, "cv3a", FakeModel(generation="CosyVoice3"))
    second, second_model = replica(registry, tmp_path, "cv3b", FakeModel(generation="CosyVoice3"))
    assert (first_model.prepared, second_model.prepared) == (1, 0)
    assert second.resolve("dave").voice.generation == "CosyVoice3"
    assert Voice.load(folder / ".store" / "dave.voice").generation == "CosyVoice3"


def test_an_unreachable_registry_leaves_the_cache_serving_and_refuses_changes(tmp_path):
    folder = tmp_path / "voices"
    folder.mkdir()
    store, model = replica(VoiceRegistry(folder), tmp_path, "a")
    store.register(model, "erin", "Erin.", prompt(seed=6))

    class Down:
        def call(self, method, *args, timeout_s=None):
            raise TimeoutError("no answer")

        async def acall(self, method, *args):
            raise TimeoutError("no answer")
    store.registry = Down()
    asyncio.run(store.refresh())
    assert store.resolve("erin").info.name == "erin"
    with pytest.raises(ApiError) as refused:
        store.register(model, "frank", "", prompt(seed=7))
    assert refused.value.status == 503 and refused.value.headers["Retry-After"]
