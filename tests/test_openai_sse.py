"""OpenAI POST /v1/audio/speech with stream_format "sse", against the shared real server."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from server_harness import RATE, SHORT, STREAMING, assert_json_error, decode, wait_for

# long enough to still be generating when the client hangs up; a seed of its own so that no
# other test has put it in the response cache (a cached answer has nothing to cancel)
HANG_UP = {"text": "This sentence keeps the model busy for a while, chunk after chunk, so that the "
                   "client can leave in the middle of it.", "seed": 11}


def speech(**fields) -> dict:
    return {"model": "tts-1", "voice": "alice", "stream_format": "sse", **fields}


def parse_events(body: str) -> list[dict]:
    """An SSE body -> the JSON payload of each event (every event here is one `data:` line)."""
    events = []
    for block in body.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block[:100]
            events.append(json.loads(block[len("data: "):]))
    return events


def audio_of(events: list[dict]) -> bytes:
    """Checks the event sequence (deltas, then one done) and returns the deltas' audio joined."""
    *deltas, done = events
    assert deltas and all(event["type"] == "speech.audio.delta" for event in deltas), events[:3]
    assert done["type"] == "speech.audio.done"
    usage = done["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] >= 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    return b"".join(base64.b64decode(event["audio"]) for event in deltas)


def test_sse_sends_pcm_deltas_as_the_model_makes_them(client):
    response = client.post("/v1/audio/speech", json=speech(
        input=STREAMING["text"], seed=STREAMING["seed"], response_format="pcm"))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-sample-rate"] == str(RATE)
    events = parse_events(response.text)
    assert len(events) >= 3, "several audio deltas, then the done event"
    samples, _ = decode("pcm", audio_of(events), streamed=True)
    assert len(samples) > RATE and np.abs(samples).max() > 0

    # the deltas carry exactly the bytes the plain audio stream sends
    plain = client.post("/v1/audio/speech", json=speech(
        input=STREAMING["text"], seed=STREAMING["seed"], response_format="pcm", stream_format="audio"))
    assert plain.status_code == 200 and plain.content == audio_of(events)


@pytest.mark.parametrize("fmt", ["wav", "mp3"])
def test_sse_deltas_join_into_a_decodable_file(client, fmt):
    response = client.post("/v1/audio/speech", json=speech(
        input=SHORT["text"], seed=SHORT["seed"], response_format=fmt))
    assert response.status_code == 200, response.text
    samples, rate = decode(fmt, audio_of(parse_events(response.text)), streamed=True)
    assert rate == RATE and len(samples) > RATE * 0.1 and np.isfinite(samples).all()


def test_unknown_stream_format_is_a_400_listing_the_choices(client):
    response = client.post("/v1/audio/speech", json=speech(input=SHORT["text"], stream_format="ndjson"))
    message = assert_json_error(response, 400)
    assert "stream_format" in message and "audio" in message and "sse" in message


def test_bad_input_with_sse_is_still_a_json_error(client):
    response = client.post("/v1/audio/speech", json=speech(input=SHORT["text"], voice="nobody"))
    assert "nobody" in assert_json_error(response, 400)
    response = client.post("/v1/audio/speech", json=speech(input=SHORT["text"], response_format="wma"))
    assert "wma" in assert_json_error(response, 400)


def test_a_client_that_leaves_the_sse_stream_stops_its_generation(server):
    cancelled_before = server.metric("cosyvoice_cancelled_generations_total")
    with server.client() as client, client.stream("POST", "/v1/audio/speech", json=speech(
            input=HANG_UP["text"], seed=HANG_UP["seed"], response_format="pcm")) as response:
        assert response.status_code == 200
        first = next(line for line in response.iter_lines() if line)
        assert json.loads(first[len("data: "):])["type"] == "speech.audio.delta"
    # leaving the block closed the connection after the first event
    assert wait_for(lambda: server.metric("cosyvoice_cancelled_generations_total") == cancelled_before + 1
                    and server.metric("cosyvoice_active_generations") == 0), \
        "the generation should stop once the client has gone"
    chunks_after_stop = server.metric("cosyvoice_audio_chunks_total")
    assert not wait_for(lambda: server.metric("cosyvoice_audio_chunks_total") > chunks_after_stop,
                        timeout_s=2)

