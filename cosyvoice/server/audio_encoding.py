"""float32 mono chunks -> the bytes of an audio format, chunk by chunk as they are made.

    encoder = stream_encoder("mp3", 24000)
    for chunk in chunks:
        send(encoder.write(chunk))      # may be b"" while the codec gathers a frame
    send(encoder.close())

Formats: wav (16-bit; streamed with an open-ended header whose sizes are 0xFFFFFFFF), pcm (raw
s16le), mp3 (constant bit rate, so a reader can tell the length without the final header), opus
(in ogg), flac, and aac (ADTS, only when PyAV is installed). `encode_whole` encodes a complete
waveform with exact headers, for responses that are not streamed.

FLAC is never streamed (`streamable`): its header's sample count is only known at the end, and a
FLAC whose count is 0 ("unknown") is refused by libsndfile, so a client saving the stream would
keep a file soundfile cannot read. Streamed requests for FLAC get the whole file once it is made.
"""
from __future__ import annotations

import functools
import importlib.util
import io
import struct

import numpy as np
import soundfile as sf

from .errors import ApiError

MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "mp3": "audio/mpeg", "opus": "audio/ogg",
               "flac": "audio/flac", "aac": "audio/aac"}
# soundfile (libsndfile) format, subtype and writer options of each compressed format
SOUNDFILE_FORMATS = {
    "mp3": ("MP3", "MPEG_LAYER_III", {"bitrate_mode": "CONSTANT", "compression_level": 0.5}),
    "opus": ("OGG", "OPUS", {}),
    "flac": ("FLAC", "PCM_16", {}),
}
# the sample rates the MPEG codecs (mp3, aac) and Opus can be written at; libsndfile and FFmpeg
# refuse the others (wav, pcm and flac take any)
MPEG_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
FORMAT_RATES = {"mp3": MPEG_RATES, "aac": MPEG_RATES, "opus": (8000, 12000, 16000, 24000, 48000)}
OPEN_ENDED = 0xFFFFFFFF
NOT_STREAMABLE = {"flac"}


def streamable(name: str) -> bool:
    """Whether a format can be sent as it is made and still be read whole by a saving client."""
    return name not in NOT_STREAMABLE


@functools.cache
def available_formats() -> tuple[str, ...]:
    """Looked up once: installing PyAV takes a restart anyway, and requests ask several times."""
    formats = ("wav", "pcm", "mp3", "opus", "flac")
    if importlib.util.find_spec("av") is not None:
        formats += ("aac",)
    return formats


def check_format(name: str) -> str:
    """Returns the format name, or raises a 400 listing the formats this server can make."""
    if name not in available_formats():
        hint = " (aac needs PyAV: pip install av)" if name == "aac" else ""
        raise ApiError(400, f"unsupported audio format '{name}'{hint}; "
                            f"choose one of {', '.join(available_formats())}")
    return name


def check_rate(name: str, rate: int) -> None:
    """Raises a 400 listing the rates `name` can be written at, when `rate` is not one of them."""
    rates = FORMAT_RATES.get(name)
    if rates is not None and rate not in rates:
        raise ApiError(400, f"{name} can be written at {', '.join(map(str, rates))} Hz, not {rate}; "
                            "choose one of those rates or another format")


def to_s16le(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def wav_header(sample_rate: int, data_bytes: int = OPEN_ENDED) -> bytes:
    """The 44-byte header of a 16-bit mono PCM WAV; the default sizes say 'until the stream ends'."""
    riff_size = OPEN_ENDED if data_bytes == OPEN_ENDED else 36 + data_bytes
    return (b"RIFF" + struct.pack("<I", riff_size) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, 2 * sample_rate, 2, 16)
            + b"data" + struct.pack("<I", data_bytes))


class PcmEncoder:
    def __init__(self, header: bytes = b""):
        self._pending_header = header

    def write(self, samples: np.ndarray) -> bytes:
        data = self._pending_header + to_s16le(samples)
        self._pending_header = b""
        return data

    def close(self) -> bytes:
        data, self._pending_header = self._pending_header, b""
        return data


class WavStreamEncoder(PcmEncoder):
    def __init__(self, sample_rate: int):
        super().__init__(wav_header(sample_rate))


class GrowingBuffer:
    """An in-memory file that an encoder appends to; `_take()` returns what was added since the
    last call, copying only the new bytes (a stream can run for minutes)."""

    def __init__(self):
        self._buffer = io.BytesIO()
        self._sent = 0

    def _take(self) -> bytes:
        with self._buffer.getbuffer() as view:
            data = bytes(view[self._sent:])
        self._sent += len(data)
        return data


class SoundfileEncoder(GrowingBuffer):
    """libsndfile writes into a BytesIO; each call returns the bytes added since the last one.

    The buffer keeps the whole stream, because libsndfile seeks back to finish the header on close
    (FLAC's sample count, MP3's info frame); those late patches reach only `encode_whole` callers
    (a streamed MP3 still decodes, with the encoder's padding; FLAC is not streamed).
    """

    def __init__(self, sample_rate: int, name: str):
        super().__init__()
        container, subtype, options = SOUNDFILE_FORMATS[name]
        self._file = sf.SoundFile(self._buffer, "w", sample_rate, 1, subtype=subtype,
                                  format=container, **options)

    def write(self, samples: np.ndarray) -> bytes:
        self._file.write(samples)
        return self._take()

    def close(self) -> bytes:
        self._file.close()
        return self._take()


    def contents(self) -> bytes:
        """Everything written, with the header as finished by close()."""
        return self._buffer.getvalue()


class AacEncoder(GrowingBuffer):
    """AAC in ADTS frames through PyAV (FFmpeg's native encoder)."""

    def __init__(self, sample_rate: int):
        import av   # optional dependency: only this format needs it

        super().__init__()
        self._av = av
        self._sample_rate = sample_rate
        self._container = av.open(self._buffer, "w", format="adts")
        self._stream = self._container.add_stream("aac", rate=sample_rate)
        self._stream.layout = "mono"

    def write(self, samples: np.ndarray) -> bytes:
        frame = self._av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, dtype=np.float32)[None, :],
                                                 format="flt", layout="mono")
        frame.sample_rate = self._sample_rate
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        return self._take()

    def close(self) -> bytes:
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._take()


def stream_encoder(name: str, sample_rate: int):
    check_format(name)
    if name == "wav":
        return WavStreamEncoder(sample_rate)
    if name == "pcm":
        return PcmEncoder()
    if name == "aac":
        return AacEncoder(sample_rate)
    return SoundfileEncoder(sample_rate, name)


def encode_whole(name: str, samples: np.ndarray, sample_rate: int) -> bytes:
    """A complete file with exact headers."""
    check_format(name)
    if name == "wav":
        data = to_s16le(samples)
        return wav_header(sample_rate, len(data)) + data
    if name in SOUNDFILE_FORMATS:
        encoder = SoundfileEncoder(sample_rate, name)
        encoder.write(samples)
        encoder.close()
        return encoder.contents()
    encoder = stream_encoder(name, sample_rate)
    return encoder.write(samples) + encoder.close()
