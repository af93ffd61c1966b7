"""Speak a text file as if an LLM were writing it: words go to the server's WebSocket
/v1/audio/speech/stream one by one, and the audio that comes back is saved (and played, if a
player is installed) while the rest of the text is still being sent.

    pip install websockets        # the only dependency
    python examples/stream_text_ws.py story.txt --voice alice --out story.wav --play
    python examples/stream_text_ws.py - --words-per-second 0 < reply.txt     # all at once

Prints the server's events with the time since the first word was sent. `--play` pipes the PCM
to ffplay or aplay (whichever is on PATH).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
import wave

from websockets.asyncio.client import connect


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("text_file", help="the text to speak ('-' reads standard input)")
    parser.add_argument("--url", default="ws://127.0.0.1:6006/v1/audio/speech/stream")
    parser.add_argument("--voice", default=None, help="a registered voice (default: the server's)")
    parser.add_argument("--instructions", default=None, help="how to speak (instruct2)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--api-key", default=None, help="the server's API key, if it has one")
    parser.add_argument("--words-per-second", type=float, default=8.0,
                        help="how fast to send words (an LLM streams about 5-30); 0: all at once")
    parser.add_argument("--out", default="stream.wav", help="WAV file to write")
    parser.add_argument("--play", action="store_true", help="also play the audio as it arrives")
    return parser.parse_args(argv)


def player(rate: int) -> subprocess.Popen | None:
    """A process playing s16le mono PCM from its standard input, or None."""
    if shutil.which("ffplay"):
        command = ["ffplay", "-loglevel", "quiet", "-nodisp", "-autoexit", "-f", "s16le",
                   "-ar", str(rate), "-"]   # raw s16le is mono unless told otherwise
    elif shutil.which("aplay"):
        command = ["aplay", "-q", "-f", "S16_LE", "-c", "1", "-r", str(rate)]
    else:
        print("no ffplay or aplay found: saving only", file=sys.stderr)
        return None
    return subprocess.Popen(command, stdin=subprocess.PIPE)


async def send_words(ws, text: str, words_per_second: float, clock: dict) -> None:
    words = text.split(" ")
    clock["first_word"] = time.perf_counter()
    for index, word in enumerate(words):
        await ws.send(json.dumps({"type": "text", "text": word + (" " if index < len(words) - 1 else "")}))
        if words_per_second > 0:
            await asyncio.sleep(1 / words_per_second)
    await ws.send(json.dumps({"type": "end"}))
    clock["last_word"] = time.perf_counter()


async def stream(args: argparse.Namespace, text: str) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    start = {"type": "start", "format": "pcm", "voice": args.voice, "instructions": args.instructions,
             "seed": args.seed}
    async with connect(args.url, additional_headers=headers, max_size=None) as ws:
        await ws.send(json.dumps(start))
        started = json.loads(await ws.recv())
        if started["type"] != "session.started":
            print(f"error: {started.get('message', started)}", file=sys.stderr)
            return 1
        rate = started["sample_rate"]
        print(f"session: voice {started['voice']}, mode {started['mode']}, {started['generation']}, "
              f"{rate} Hz")
        clock: dict = {}
        sender = asyncio.create_task(send_words(ws, text, args.words_per_second, clock))
        playing = player(rate) if args.play else None
        status = 0
        with wave.open(args.out, "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(rate)
            async for message in ws:   # until the server closes the session
                since = time.perf_counter() - clock.get("first_word", time.perf_counter())
                if isinstance(message, bytes):
                    if "first_audio" not in clock:
                        clock["first_audio"] = since
                        sent = "all words sent" if "last_word" in clock else "words still being sent"
                        print(f"{since:6.2f} s  first audio ({sent})")
                    out.writeframes(message)
                    if playing is not None:
                        playing.stdin.write(message)
                        playing.stdin.flush()
                    continue
                event = json.loads(message)
                print(f"{since:6.2f} s  {event['type']}: "
                      + json.dumps({k: v for k, v in event.items() if k != "type"}, ensure_ascii=False))
                if event["type"] == "error":
                    status = 1
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        if playing is not None:
            playing.stdin.close()
            playing.wait()
    print(f"saved {args.out}")
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = sys.stdin if args.text_file == "-" else open(args.text_file, encoding="utf-8")
    with source:
        text = " ".join(source.read().split())   # one space between words, as an LLM writes them
    if not text:
        print("error: the text is empty", file=sys.stderr)
        return 1
    return asyncio.run(stream(args, text))


if __name__ == "__main__":
    sys.exit(main())
