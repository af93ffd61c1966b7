"""Request and response bodies of the API families (JSON, and the upstream API's query or form
fields)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class OpenAISpeechRequest(BaseModel):
    """OpenAI POST /v1/audio/speech."""
    model: str = Field("tts-1", description="accepted for compatibility; this server has one model")
    input: str = Field(..., description="text to speak")
    voice: str = Field("default", description="a registered voice; OpenAI's names mean the default voice "
                                              "unless registered")
    response_format: str = Field("mp3", description="mp3, opus, aac, flac, wav or pcm (s16le)")
    speed: float = Field(1.0, description="0.25 to 4.0")
    instructions: str | None = Field(None, description="how to speak (instruct2 mode)")
    stream: bool = Field(True, description="send audio as it is made")
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
    """xtts-api-server POST /tts_to_audio/."""
    text: str
    speaker_wav: str = Field("default", description="a registered voice name (a '.wav' suffix is ignored)")
    language: str = Field("auto", description="accepted for compatibility; the text decides the language")
    seed: int | None = Field(None, description="extension: sampling seed, for repeatable audio")


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
