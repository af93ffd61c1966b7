"""Request and response bodies of the API families (JSON, and the upstream API's query or form
fields)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class VoiceRef(BaseModel):
    """OpenAI's custom-voice form of `voice`: {"id": "<voice>"}."""
    id: str


class OpenAISpeechRequest(BaseModel):
    """OpenAI POST /v1/audio/speech."""
    model: str = Field("tts-1", description="accepted for compatibility; this server has one model")
    input: str = Field(..., description="text to speak")
    voice: str | VoiceRef = Field("default", description="a registered voice, as a name or {\"id\": name}; "
                                                          "OpenAI's built-in names mean the default voice "
                                                          "unless registered")
    response_format: str = Field("mp3", description="mp3, opus, aac, flac, wav or pcm (s16le)")
    speed: float = Field(1.0, description="0.25 to 4.0")
    instructions: str | None = Field(None, description="how to speak (instruct2 mode)")
    stream: bool = Field(True, description="send audio as it is made (FLAC always comes whole, "
                                           "with its exact length)")
    seed: int | None = Field(None, description="sampling seed, for repeatable audio")
    # a plain string, checked by the router, so a bad value gets a sentence listing the accepted ones
    stream_format: str = Field("audio", description="'audio' (the audio bytes) or 'sse' (server-sent "
                                                    "events carrying base64 audio; with stream false "
                                                    "the audio comes as one event)")


class UpstreamParams(BaseModel):
    """The upstream CosyVoice API's query parameters (GET) or form fields (POST); prompt_wav, the
    uploaded file, is read apart."""
    tts_text: str
    spk_id: str = ""
    prompt_text: str = ""
    instruct_text: str = ""
    speed: float = 1.0
    seed: int | None = None


class XttsRequest(BaseModel):
    """xtts-api-server POST /tts_to_audio/ (speaker_wav is required there too)."""
    text: str
    speaker_wav: str = Field(..., description="a registered voice name (a '.wav' suffix is ignored)")
    language: str = Field("auto", description="accepted for compatibility; the text decides the language")
    seed: int | None = Field(None, description="extension: sampling seed, for repeatable audio")


class XttsFileRequest(XttsRequest):
    """xtts-api-server POST /tts_to_file: the file is written to the server's output folder."""
    file_name_or_path: str = Field(..., description="a file name; any folders in it are ignored")


class XttsSettings(BaseModel):
    """xtts-api-server POST /set_tts_settings; every field optional (SillyTavern sends them all,
    as strings from its sliders). Only speed changes the speech; the others are XTTS sampling
    settings CosyVoice has no use for: kept and reported, not applied."""
    model_config = ConfigDict(allow_inf_nan=False)   # they are echoed back as JSON
    temperature: float | None = None
    speed: float | None = None
    length_penalty: float | None = None
    repetition_penalty: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    enable_text_splitting: bool | None = None
    stream_chunk_size: int | None = None


class XttsFolderRequest(BaseModel):
    output_folder: str | None = None
    speaker_folder: str | None = None


class XttsModelRequest(BaseModel):
    model_name: str


class CosyVoiceForkRequest(BaseModel):
    """POST / of the CosyVoice_For_Windows API, which SillyTavern's "CosyVoice (Unofficial)"
    provider calls: {text, speaker, streaming: 0|1}."""
    text: str = ""
    speaker: str = ""
    streaming: bool = False
    speed: float | None = Field(None, description="also accepted as a query parameter, as there")
    new: int = Field(0, description="accepted for compatibility; every voice here is a stored voice")


class VoiceOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {
        "name": "alice", "prompt_text": "Hello, this is Alice.", "created": 1767225600.0,
        "source": "api", "audio_url": "/api/voices/alice/audio"}})
    name: str
    prompt_text: str
    created: float
    source: str = Field(..., description="'api', or the file in the voice folder it was imported from")
    audio_url: str


class SpeakerOut(BaseModel):
    name: str
    voice_id: str
    kind: str = Field(..., description="'voice' (registered) or 'builtin' (a speaker of the model, sft)")


class SpeakersOut(BaseModel):
    speakers: list[str] = Field(..., description="names, as the server this project replaces listed them")
    details: list[SpeakerOut]


class StreamStart(BaseModel):
    """The first message of a WebSocket /v1/audio/speech/stream session."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["start"]
    voice: str | None = Field(None, description="a registered voice or built-in speaker; none: the "
                                                "default voice")
    mode: str | None = Field(None, description="zero_shot, cross_lingual, instruct2 or sft; none: "
                                               "chosen from the voice and instructions")
    instructions: str | None = Field(None, description="how to speak (instruct2)")
    format: str = Field("pcm", description="pcm (s16le), wav, mp3, opus, flac or aac")
    sample_rate: int | None = Field(None, description="output rate, 8000 to 48000 Hz; none: the model's")
    speed: float = Field(1.0, description="0.25 to 4.0; other than 1.0, each segment arrives whole")
    seed: int | None = Field(None, description="sampling seed of the first segment (the n-th uses "
                                               "seed + n), for repeatable audio")
    api_key: str | None = Field(None, description="the API key, for clients that cannot send headers")


class StreamMessage(BaseModel):
    """Every later message: text (append), flush (cut now), end (no more text) or cancel."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "flush", "end", "cancel"]
    text: str = Field("", description="text to append (with flush and end too)")
