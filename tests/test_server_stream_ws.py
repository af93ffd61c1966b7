"""WebSocket /v1/audio/speech/stream: the text-cutting rule, then sessions against real servers on
127.0.0.1 (the shared CosyVoice2 server, and one CosyVoice3 server for a lean case)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from cosyvoice.server.routers.stream import BACKLOG_SEGMENTS
from cosyvoice.server.text_stream import TextCutter, count_words
from server_harness import API_KEY, MAX_TEXT_CHARS, RATE, decode, run_test_server, wait_for

PATH = "/v1/audio/speech/stream"
KEY_HEADER = {"X-API-Key": API_KEY}
TWO_SENTENCES = "Hello there, this is a streaming test. It speaks while the text is still arriving."
TIMEOUT_S = 120


# ---- the cutting rule ---------------------------------------------------------------------------

def cut(deltas: list[str], end: bool = True, **options) -> list[str]:
    """The segments a session would make if the synthesiser took one after every delta."""
    cutter, segments = TextCutter(**options), []
    for delta in deltas:
        cutter.feed(delta)
        while (segment := cutter.take()) is not None:
            segments.append(segment)
    if end:
        cutter.end()
        while (segment := cutter.take()) is not None:
            segments.append(segment)
    return segments


def word_deltas(text: str) -> list[str]:
    words = text.split(" ")
    return [word + " " for word in words[:-1]] + [words[-1]]


def test_sentences_are_cut_once_the_next_word_arrives():
    cutter = TextCutter()
    for delta in word_deltas("Hello there, this is a streaming test.")[:-1]:
        cutter.feed(delta)
        assert cutter.take() is None        # "Hello there," is too short for a clause cut
    cutter.feed("test.")
    assert cutter.take() is None            # "test." may still be "test.x": wait for what follows
    cutter.feed(" It")
    assert cutter.take() == "Hello there, this is a streaming test."
    assert cutter.pending == " It"


def test_the_first_segment_may_end_at_a_clause_later_ones_end_at_sentences():
    text = "Well, the weather in Paris today, according to the forecast, is sunny. Bring a hat, " \
           "sunscreen, and water. Bye"
    assert cut(word_deltas(text)) == ["Well, the weather in Paris today,", "according to the forecast, "
                                      "is sunny.", "Bring a hat, sunscreen, and water.", "Bye"]


def test_numbers_abbreviations_and_quotes_are_not_cut_apart():
    assert cut(["Pi is 3.14 and Mr. Smith agrees, 1,000 times. ", "\"Yes!\" ", "he said."]) == \
        ["Pi is 3.14 and Mr. Smith agrees, 1,000 times.", "\"Yes!\"", "he said."]


def test_chinese_is_cut_at_full_width_marks():
    assert cut(list("今天天气很好，我们一起去公园散步吧。明天呢？好的")) == \
        ["今天天气很好，我们一起去公园散步吧。", "明天呢？", "好的"]
    assert count_words("今天天气 nice day") == 4


def test_text_that_arrives_whole_is_one_segment_and_flush_cuts_anywhere():
    assert cut([TWO_SENTENCES], end=False) == ["Hello there, this is a streaming test."]
    cutter = TextCutter()
    cutter.feed(TWO_SENTENCES)
    cutter.end()
    assert cutter.take() == TWO_SENTENCES and cutter.take() is None
    cutter = TextCutter()
    cutter.feed("no mark at all")
    assert cutter.take() is None
    cutter.flush()
    assert cutter.take() == "no mark at all"


def test_a_long_run_without_marks_is_cut_at_a_space():
    words = [f"w{i}" for i in range(45)]
    segments = cut([" ".join(words) + " "], end=False, max_words=40)
    assert segments == [" ".join(words[:-1])]   # the last word may be incomplete: it stays
    assert cut([" ".join(words[:30]) + " "], end=False, max_words=40) == []


def test_no_segment_is_longer_than_max_chars_and_nothing_is_lost():
    sentences = " ".join(f"Sentence number {n}, with a clause." for n in range(12))   # 34-35 chars each
    segments = cut([sentences], max_chars=100)     # arrives whole: only the limit cuts it
    assert all(len(segment) <= 100 for segment in segments) and len(segments) >= 5, segments
    assert all(segment.endswith("clause.") for segment in segments), segments   # at sentence ends
    assert " ".join(segments) == sentences
    clauses = ", ".join(f"clause {n}" for n in range(30))
    segments = cut([clauses], max_chars=50)
    assert all(len(segment) <= 50 and segment.endswith(",") for segment in segments[:-1]), segments
    assert " ".join(segments) == clauses
    words = " ".join(f"w{n}" for n in range(60))   # no mark at all: cut at spaces
    segments = cut([words], max_chars=40)
    assert all(len(segment) <= 40 for segment in segments) and " ".join(segments) == words, segments
    assert cut(["好" * 250], max_chars=100) == ["好" * 100, "好" * 100, "好" * 50]   # nowhere better


# ---- sessions -----------------------------------------------------------------------------------

@dataclass
class Session:
    events: list[dict] = field(default_factory=list)
    audio: bytes = b""
    close_code: int | None = None
    first_audio_s: float | None = None

    def of(self, kind: str) -> list[dict]:
        return [event for event in self.events if event["type"] == kind]

    def receive_all(self, ws, started: float) -> "Session":
        """Everything until the server closes."""
        while True:
            try:
                message = ws.recv(timeout=TIMEOUT_S)
            except ConnectionClosed as closed:
                self.close_code = closed.rcvd.code if closed.rcvd else None
                return self
            self.add(message, started)

    def add(self, message, started: float) -> None:
        if isinstance(message, bytes):
            if self.first_audio_s is None:
                self.first_audio_s = time.perf_counter() - started
            self.audio += message
        else:
            self.events.append(json.loads(message))


def ws_url(server) -> str:
    return server.url.replace("http://", "ws://") + PATH


def run_session(server, messages: list, headers: dict | None = KEY_HEADER) -> Session:
    """Sends every message at once, then reads until the server closes."""
    with connect(ws_url(server), additional_headers=headers or {}, open_timeout=30) as ws:
        started = time.perf_counter()
        for message in messages:
            try:
                ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))
            except ConnectionClosed:   # the server closed the session early (an error)
                break
        return Session().receive_all(ws, started)


def test_words_sent_one_by_one_are_spoken_before_the_last_word_is_sent(server):
    session, words = Session(), word_deltas(TWO_SENTENCES)
    first_sentence_words = len("Hello there, this is a streaming test.".split(" "))
    with connect(ws_url(server), additional_headers=KEY_HEADER, open_timeout=30) as ws:
        ws.send(json.dumps({"type": "start", "voice": "alice", "seed": 5}))
        session.add(ws.recv(timeout=TIMEOUT_S), 0)
        started = time.perf_counter()
        for word in words[:first_sentence_words + 1]:   # the first sentence, and the word confirming it
            ws.send(json.dumps({"type": "text", "text": word}))
        while session.first_audio_s is None:            # audio comes before the rest is sent
            session.add(ws.recv(timeout=TIMEOUT_S), started)
        for word in words[first_sentence_words + 1:]:
            ws.send(json.dumps({"type": "text", "text": word}))
        ws.send(json.dumps({"type": "end"}))
        session.receive_all(ws, started)
    print(f"[ws] word by word: first audio {session.first_audio_s * 1000:.0f} ms after the first word "
          f"(server: {session.of('session.done')[0]['first_audio_ms']} ms)")
    assert session.close_code == 1000, session.events
    assert session.events[0]["type"] == "session.started" and session.events[0]["sample_rate"] == RATE
    assert session.events[0]["voice"] == "alice" and session.events[0]["generation"] == "CosyVoice2"
    segments = session.of("segment.started")
    assert [s["text"] for s in segments] == ["Hello there, this is a streaming test.",
                                             "It speaks while the text is still arriving."]
    assert [s["index"] for s in session.of("segment.done")] == [0, 1]
    assert segments[1]["start_s"] == session.of("segment.done")[0]["end_s"] > 0
    done = session.of("session.done")[0]
    samples, _ = decode("pcm", session.audio, streamed=True)
    assert done["segments"] == 2 and not done["cancelled"] and done["first_audio_ms"] > 0
    assert abs(done["audio_s"] - len(samples) / RATE) < 0.01 and np.abs(samples).max() > 0
    metrics = server.client().get("/metrics").text
    assert f'cosyvoice_requests_total{{method="WEBSOCKET",route="{PATH}",status="200"}}' in metrics
    assert "cosyvoice_stream_first_audio_seconds_count" in metrics


def test_text_that_arrives_whole_sounds_as_an_http_request(server, client):
    text = "Whole text, spoken as one request. Its second sentence follows."
    session = run_session(server, [{"type": "start", "voice": "alice", "seed": 11},
                                   {"type": "end", "text": text}])
    assert session.close_code == 1000 and len(session.of("segment.started")) == 1, session.events
    response = client.post("/tts", data={"text": text, "speaker": "alice", "seed": 11})
    assert response.status_code == 200 and response.headers["x-cache"] == "miss"
    streamed, _ = decode("pcm", session.audio, streamed=True)
    whole, _ = decode("pcm", response.content, streamed=True)
    assert len(streamed) == len(whole) and np.abs(streamed - whole).max() <= 2 / 32768


def test_a_session_speaks_more_text_than_one_request_may_hold(server):
    """A voice agent's long reply: more than --max-text-chars in one session, cut into segments
    that each fit the limit, all spoken."""
    sentences = [f"This is sentence {n} of a reply that runs longer than one request." for n in range(12)]
    text = " ".join(sentences)
    assert len(text) > MAX_TEXT_CHARS
    session = run_session(server, [{"type": "start", "voice": "alice", "seed": 8},
                                   {"type": "text", "text": text}, {"type": "end"}])
    assert session.close_code == 1000, session.events
    spoken = [segment["text"] for segment in session.of("segment.started")]
    assert len(spoken) >= 2 and all(len(segment) <= MAX_TEXT_CHARS for segment in spoken), spoken
    assert " ".join(spoken) == text
    assert session.of("session.done")[0]["audio_s"] > 0


def test_wav_at_another_rate_with_the_key_in_the_start_message(server):
    session = run_session(server, [{"type": "start", "voice": "alice", "format": "wav", "sample_rate": 16000,
                                    "api_key": API_KEY, "seed": 1},
                                   {"type": "end", "text": "Hi there."}], headers=None)
    assert session.close_code == 1000, session.events
    samples, rate = decode("wav", session.audio, streamed=True)
    assert rate == 16000 and abs(len(samples) / rate - session.of("session.done")[0]["audio_s"]) < 0.01


def test_cancel_stops_the_utterance(server):
    cancelled_before = server.metric("cosyvoice_cancelled_generations_total")
    session = Session()
    with connect(ws_url(server), additional_headers=KEY_HEADER, open_timeout=30) as ws:
        ws.send(json.dumps({"type": "start", "voice": "alice", "seed": 2}))
        ws.send(json.dumps({"type": "end", "text": "Counting slowly: one two three four five six seven "
                                                   "eight nine ten eleven twelve thirteen fourteen."}))
        started = time.perf_counter()
        while session.first_audio_s is None:
            session.add(ws.recv(timeout=TIMEOUT_S), started)
        ws.send(json.dumps({"type": "cancel"}))
        session.receive_all(ws, started)
    done = session.of("session.done")
    assert session.close_code == 1000 and done and done[0]["cancelled"], session.events
    assert not session.of("segment.done")
    assert wait_for(lambda: server.metric("cosyvoice_cancelled_generations_total") > cancelled_before
                    and server.metric("cosyvoice_active_generations") == 0)


BAD_SESSIONS = [
    ("not-json", ["hello"], KEY_HEADER, 4400, "not valid JSON"),
    ("text-before-start", [{"type": "text", "text": "Hi."}], KEY_HEADER, 4400, "first message"),
    ("unknown-option", [{"type": "start", "voise": "alice"}], KEY_HEADER, 4400, "voise"),
    ("unknown-voice", [{"type": "start", "voice": "nobody"}], KEY_HEADER, 4400, "unknown voice"),
    ("bad-format", [{"type": "start", "format": "ogg"}], KEY_HEADER, 4400, "format"),
    ("bad-rate", [{"type": "start", "sample_rate": 1000}], KEY_HEADER, 4400, "sample_rate"),
    ("binary-frame", [{"type": "start"}, b"\x00\x01"], KEY_HEADER, 4400, "binary"),
    ("unknown-type", [{"type": "start"}, {"type": "speak"}], KEY_HEADER, 4400, "type"),
    ("too-far-ahead", [{"type": "start"}, {"type": "text", "text": "Word. " * (BACKLOG_SEGMENTS * MAX_TEXT_CHARS // 6 + 1)}],
     KEY_HEADER, 4400, "waiting to be spoken"),
    ("opus-at-22050", [{"type": "start", "format": "opus", "sample_rate": 22050}], KEY_HEADER, 4400,
     "opus can be written at 8000, 12000, 16000, 24000, 48000 Hz, not 22050"),
    ("control-characters", [{"type": "start"}, {"type": "text", "text": "a\x00b"}], KEY_HEADER, 4400,
     "control"),
    ("lone-surrogate", [{"type": "start"}, {"type": "text", "text": "a\ud800b"}], KEY_HEADER, 4400,
     "unicode"),
    ("surrogate-voice", [{"type": "start", "voice": "\ud800"}], KEY_HEADER, 4400, "unknown voice"),
    ("missing-key", [{"type": "start"}], None, 4401, "API key"),
    ("wrong-header-key", [{"type": "start", "api_key": API_KEY}], {"X-API-Key": "wrong"}, 4401, "invalid"),
    ("wrong-start-key", [{"type": "start", "api_key": "wrong"}], None, 4401, "invalid"),
]


@pytest.mark.parametrize("messages,headers,code,words", [case[1:] for case in BAD_SESSIONS],
                         ids=[case[0] for case in BAD_SESSIONS])
def test_bad_sessions_close_with_an_error_event_and_code(server, messages, headers, code, words):
    session = run_session(server, messages, headers)
    errors = session.of("error")
    assert session.close_code == code, session.events
    assert len(errors) == 1 and errors[0]["status"] == code - 4000
    assert words.lower() in errors[0]["message"].lower(), errors[0]
    assert not session.audio


@pytest.fixture(scope="module")
def cv3_server(cv3_model_dir, cv3_fixture_dir):
    """A CosyVoice3 server with server.py's defaults (no API key)."""
    with run_test_server(cv3_model_dir, cv3_fixture_dir, flags=()) as running:
        yield running


def test_cosyvoice3_streams_text_in_and_audio_out(cv3_server):
    deltas = [{"type": "text", "text": word} for word in word_deltas(TWO_SENTENCES)]
    session = run_session(cv3_server, [{"type": "start", "voice": "alice", "format": "mp3", "seed": 4},
                                       *deltas, {"type": "end"}], headers=None)
    assert session.close_code == 1000, session.events
    assert session.events[0]["generation"] == "CosyVoice3"
    # sent at once, the words may be cut into one segment or two, depending on when each arrives
    assert " ".join(s["text"] for s in session.of("segment.started")) == TWO_SENTENCES
    samples, rate = decode("mp3", session.audio, streamed=True)
    assert rate == RATE and len(samples) / rate > 0.5
