"""serve_ray on a local Ray (127.0.0.1): `python -m cosyvoice.serve_ray --replicas 2` with the tiny
model, started once for the module (about half a minute on two cores), then: requests spread over
both replicas, the proxy's queue limit (503 + Retry-After), voices and xtts settings shared across
replicas, metrics of every replica, a WebSocket session, and a replica killed mid-run.

Ray is an optional extra (`pip install '.[ray]'`; ./setup.sh --dev installs it): without it the
module is skipped."""
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

# this process joins the test's cluster as a driver (to kill a replica); like serve_ray's local
# Ray, it must take 127.0.0.1 as its address, which Ray reads when it is imported
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")   # Ray 2.60's default for a local cluster; drivers must say it
ray = pytest.importorskip("ray", reason="Ray is not installed: pip install '.[ray]' (./setup.sh --dev "
                                        "installs it)")

from server_harness import REPO_ROOT, free_port, prompt_files  # noqa: E402

# ray.serve's own pydantic models warn when imported (the kill test's driver imports it)
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`")

API_KEY = "ray-key"
WORKERS, MAX_QUEUE = 2, 16        # per replica; the proxy holds the queue
START_TIMEOUT_S = 240
HI = "Hi."                         # about 0.5 s of compute per request on one core
LONG = "One two three four five six seven eight nine ten. " * 12   # a stream of several seconds


class Cluster:
    def __init__(self, process, url, address, log_path, voices_dir):
        self.process, self.url, self.address, self.log_path, self.voices_dir = \
            process, url, address, log_path, voices_dir

    def client(self, **options) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-Key": API_KEY},
                            timeout=options.pop("timeout", 120), **options)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-6000:]


@pytest.fixture(scope="module")
def cluster(model_dir, fixture_dir):
    voices_dir = Path(tempfile.mkdtemp(prefix="cosyvoice-ray-voices-"))
    prompt_wav, transcript = prompt_files(fixture_dir)
    (voices_dir / f"[alice]{transcript}.wav").write_bytes(prompt_wav.read_bytes())
    port = free_port()
    log_path = voices_dir.parent / f"{voices_dir.name}.log"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    command = [sys.executable, "-m", "cosyvoice.serve_ray", "--model-dir", str(model_dir), "--replicas", "2",
               "--port", str(port), "--voices-dir", str(voices_dir), "--api-key", API_KEY,
               "--workers", str(WORKERS), "--max-queue", str(MAX_QUEUE), "--retry-after-s", "1",
               "--log-level", "warning"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    started = time.monotonic()
    address = None
    try:
        while time.monotonic() - started < START_TIMEOUT_S:
            text = log_path.read_text(encoding="utf-8", errors="replace")
            address = address or next(iter(re.findall(r"Ray cluster at (\S+);", text)), None)
            if "CosyVoice on Ray Serve at" in text:
                break
            if process.poll() is not None:
                pytest.fail(f"serve_ray exited with {process.returncode}:\n{text[-6000:]}")
            time.sleep(0.5)
        else:
            pytest.fail(f"serve_ray not ready after {START_TIMEOUT_S} s:\n{log_path.read_text()[-6000:]}")
        print(f"serve_ray ready after {time.monotonic() - started:.1f} s")
        yield Cluster(process, f"http://127.0.0.1:{port}", address, log_path, voices_dir)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        process.send_signal(2)   # SIGINT: serve.shutdown + ray.shutdown
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        log_path.unlink(missing_ok=True)


def speech(client: httpx.Client, text: str = HI, seed: int = 0, voice: str = "alice", **extra) -> httpx.Response:
    return client.post("/v1/audio/speech", json={"model": "tts-1", "input": text, "voice": voice,
                                                 "response_format": "pcm", "seed": seed, **extra})


def replicas_of(responses) -> set[str]:
    return {response.headers["x-replica"] for response in responses}


def test_concurrent_requests_are_spread_over_both_replicas(cluster):
    with cluster.client() as client, concurrent.futures.ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda seed: speech(client, seed=seed), range(100, 120)))
    failed = [(response.status_code, response.headers, response.text[:300]) for response in responses
              if response.status_code != 200]
    assert not failed, failed
    assert all(len(response.content) > 0 and len(response.content) % 2 == 0 for response in responses)
    assert len(replicas_of(responses)) == 2, replicas_of(responses)
    # the native API too, through the same proxy
    with cluster.client() as client:
        native = client.post("/tts", data={"text": HI, "speaker": "alice", "seed": 1})
        assert native.status_code == 200 and native.headers["x-replica"].startswith("CosyVoice#")
        assert client.get("/ready").status_code == 200


def test_the_proxy_refuses_beyond_its_queue_with_retry_after(cluster):
    limit = MAX_QUEUE + 2 * WORKERS       # serve_ray.proxy_queue_limit: the first `limit` always get in
    count = limit + 24
    with cluster.client() as client, concurrent.futures.ThreadPoolExecutor(count) as pool:
        burst = pool.map(lambda seed: speech(client, seed=seed), range(200, 200 + count))
        time.sleep(1.0)
        asked = time.monotonic()   # /metrics is an app of its own: it does not wait behind the queue
        assert client.get("/metrics").status_code == 200
        metrics_s = time.monotonic() - asked
        responses = list(burst)
    print(f"/metrics answered in {metrics_s:.2f} s with {count} requests in flight")
    assert metrics_s < 10
    statuses = [response.status_code for response in responses]
    refused = [response for response in responses if response.status_code == 503]
    assert set(statuses) == {200, 503}, statuses
    assert statuses.count(200) >= limit, statuses
    assert all(response.headers.get("retry-after") == "1" for response in refused)


def test_a_voice_registered_through_one_replica_serves_from_the_other(cluster, fixture_dir):
    prompt_wav, transcript = prompt_files(fixture_dir)
    with cluster.client() as client:
        created = client.post("/api/voices", data={"name": "bob", "prompt_text": transcript},
                              files={"audio": ("bob.wav", prompt_wav.read_bytes(), "audio/wav")})
        assert created.status_code == 201, created.text
        home = created.headers["x-replica"]
        served = []
        for seed in range(300, 320):   # routing is random: until the other replica answers
            response = speech(client, seed=seed, voice="bob")
            assert response.status_code == 200, response.text
            served.append(response.headers["x-replica"])
            if served[-1] != home:
                break
        assert served[-1] != home, served
        taken = client.post("/api/voices", data={"name": "bob"},
                            files={"audio": ("bob.wav", prompt_wav.read_bytes(), "audio/wav")})
        assert taken.status_code == 409
        # kept on the head's disk, in server.py's layout
        assert (cluster.voices_dir / ".store" / "bob.voice").is_file()
        deleted = client.delete("/api/voices/bob")
        assert deleted.status_code == 200
        answers = [speech(client, seed=seed, voice="bob") for seed in range(4)]
        assert {answer.status_code for answer in answers} == {400}


def test_xtts_settings_and_metrics_cover_every_replica(cluster):
    with cluster.client() as client:
        assert client.post("/set_tts_settings", json={"speed": 1.25}).status_code == 200
        answers = [client.get("/get_tts_settings") for _ in range(10)]
        assert {answer.json()["speed"] for answer in answers} == {1.25}
        client.post("/set_tts_settings", json={"speed": 1.0})
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        labelled = set(re.findall(r'replica="(CosyVoice#\w+)"', metrics.text))
        assert len(labelled) == 2, labelled
        assert re.search(r'cosyvoice_ready\{replica="CosyVoice#\w+"\} 1\.0', metrics.text)
    assert httpx.get(cluster.url + "/metrics").status_code == 401   # still behind the API key


def test_a_websocket_session_streams_through_the_proxy(cluster):
    from websockets.sync.client import connect

    url = cluster.url.replace("http://", "ws://") + "/v1/audio/speech/stream"
    with connect(url, additional_headers={"X-API-Key": API_KEY}, open_timeout=60) as socket:
        assert socket.response.headers["x-replica"].startswith("CosyVoice#")
        socket.send(json.dumps({"type": "start", "voice": "alice", "format": "pcm", "seed": 3}))
        socket.send(json.dumps({"type": "end", "text": HI}))
        audio, events = 0, []
        while not events or events[-1]["type"] not in ("session.done", "error"):
            message = socket.recv(timeout=60)
            if isinstance(message, bytes):
                audio += len(message)
            else:
                events.append(json.loads(message))
    assert events[-1]["type"] == "session.done", events
    assert audio > 0


def test_a_killed_replica_loses_only_what_it_was_generating_and_comes_back(cluster):
    """Four long streams fill both replicas (2 each); six more requests then wait at the proxy.
    One replica is killed: its two streams break, every other request is served, and Ray starts
    a replacement."""
    ray.init(address=cluster.address, namespace="serve", log_to_driver=False, logging_level="error")
    from ray import serve

    headers: dict[int, str] = {}
    answered_at: dict[int, float] = {}
    outcomes: dict[int, str] = {}

    def stream(index: int, text: str) -> None:
        with cluster.client() as client:
            try:
                with client.stream("POST", "/v1/audio/speech",
                                   json={"model": "tts-1", "input": text, "voice": "alice", "seed": 400 + index,
                                         "response_format": "pcm", "stream": True}) as response:
                    headers[index] = f"{response.status_code} {response.headers.get('x-replica')}"
                    answered_at[index] = time.monotonic()
                    size = sum(len(piece) for piece in response.iter_bytes())
                    outcomes[index] = "ok" if response.status_code == 200 and size > 0 else f"status {response.status_code}"
            except httpx.HTTPError as error:
                outcomes[index] = f"broken: {type(error).__name__}"

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        running = [pool.submit(stream, index, LONG) for index in range(4)]
        deadline = time.monotonic() + 60
        while len(headers) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(headers) == 4, (headers, outcomes, cluster.log())
        by_replica: dict[str, list[int]] = {}
        for index, value in headers.items():
            by_replica.setdefault(value.split()[1], []).append(index)
        assert sorted(len(indices) for indices in by_replica.values()) == [2, 2], headers
        queued = [pool.submit(stream, index, HI) for index in range(4, 10)]
        time.sleep(1.0)   # they reach the proxy and wait there: both replicas are full
        actors = {tag: ray.get_actor(f"SERVE_REPLICA::cosyvoice#{tag}", namespace="serve") for tag in by_replica}
        # the victim runs both its streams still, so no waiting request can have gone to it
        busy = [tag for tag, indices in sorted(by_replica.items()) if not any(index in outcomes for index in indices)]
        assert busy, f"each replica finished a long stream within a second; make LONG longer: {outcomes}"
        victim = busy[0]
        killed_at = time.monotonic()
        ray.kill(actors[victim], no_restart=True)
        for future in running + queued:
            future.result(timeout=180)
    print("outcomes:", outcomes, "headers:", headers)
    survivors = [index for index in range(10) if index not in by_replica[victim]]
    assert all(outcomes[index] == "ok" for index in survivors), (outcomes, headers)
    assert all(headers[index].split()[1] != victim for index in range(4, 10)), headers

    # recovered: a replica that is neither the victim nor the survivor answers, a waiting request
    # or else one of these (the survivor answers this cached request at once, so the loop polls
    # quickly)
    survivor = next(tag for tag in by_replica if tag != victim)
    newcomers = sorted((answered_at[index], headers[index].split()[1]) for index in range(4, 10)
                       if headers[index].split()[1] not in (victim, survivor))
    replaced_at, replacement = newcomers[0] if newcomers else (None, None)
    polling_since = time.monotonic()
    with cluster.client() as client:
        while replacement is None and time.monotonic() - polling_since < 150:
            response = speech(client, seed=500)
            assert response.status_code == 200, response.text
            if response.headers["x-replica"] not in (victim, survivor):
                replacement, replaced_at = response.headers["x-replica"], time.monotonic()
            time.sleep(0.1)
    assert replacement is not None, cluster.log()
    recovered_s = replaced_at - killed_at
    print(f"replica recovery: {recovered_s:.1f} s from the kill to the first response of its replacement")
    status = serve.status().applications["cosyvoice"].deployments["CosyVoice"]
    assert status.replica_states.get("RUNNING") == 2, status
