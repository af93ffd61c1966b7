"""What one benchmark request sends: an endpoint (method, path, body kind, field templates) and
the per-request values its templates take.

Templates are Python format strings over TEMPLATE_KEYS; in a JSON body a value that is exactly
"{seed}" or "{index}" becomes a number. Presets cover our API families and upstream-shaped
servers; any other server is described with --path/--method/--body/--field/--json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

TEMPLATE_KEYS = ("text", "voice", "seed", "index", "prompt_text", "instruct")
NUMERIC_KEYS = ("seed", "index")
BODY_KINDS = ("form", "json", "query")

_SEEDED = {"seed": "{seed}"}
_UPSTREAM = {"tts_text": "{text}", "spk_id": "{voice}", **_SEEDED}
PRESETS = {
    # ours: raw s16le PCM, streamed
    "native": ("POST", "/tts", "form", {"text": "{text}", "speaker": "{voice}", "format": "pcm",
                                        "stream": "true", **_SEEDED}),
    "openai": ("POST", "/v1/audio/speech", "json", {"model": "cosyvoice2", "input": "{text}",
                                                    "voice": "{voice}", "response_format": "pcm",
                                                    "stream": True, **_SEEDED}),
    # upstream CosyVoice's runtime/python/fastapi server, and ours in that shape (spk_id may name
    # a registered voice instead of uploading prompt_wav; upstream ignores spk_id and seed there)
    "upstream-sft": ("POST", "/inference_sft", "form", _UPSTREAM),
    "upstream-zero-shot": ("POST", "/inference_zero_shot", "form",
                           {**_UPSTREAM, "prompt_text": "{prompt_text}"}),
    "upstream-cross-lingual": ("POST", "/inference_cross_lingual", "form", _UPSTREAM),
    "upstream-instruct2": ("POST", "/inference_instruct2", "form",
                           {**_UPSTREAM, "instruct_text": "{instruct}"}),
}


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    body: str                                   # form, json or query
    fields: dict                                # name -> template (or a JSON value)
    files: dict[str, Path] = field(default_factory=dict)   # multipart field -> file to upload


def preset(name: str) -> Endpoint:
    method, path, body, fields = PRESETS[name]
    return Endpoint(method, path, body, dict(fields))


def customised(endpoint: Endpoint, *, method: str | None = None, path: str | None = None,
               body: str | None = None, fields: list[str] = (), json_body: str | None = None,
               files: list[str] = ()) -> Endpoint:
    """The endpoint with flags applied: `fields` are "name=template" (added or replaced),
    `json_body` a JSON object replacing every field, `files` "field=path" uploads."""
    new_fields = dict(endpoint.fields)
    if json_body is not None:
        parsed = json.loads(json_body)
        if not isinstance(parsed, dict):
            raise ValueError("--json must be a JSON object")
        new_fields, body = parsed, body or "json"
    for item in fields:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--field {item!r}: expected name=value")
        new_fields[name] = value
    uploads = dict(endpoint.files)
    for item in files:
        name, sep, value = item.partition("=")
        if not sep or not Path(value).is_file():
            raise ValueError(f"--file {item!r}: expected field=path of an existing file")
        uploads[name] = Path(value)
    chosen_body = body or endpoint.body
    if chosen_body not in BODY_KINDS:
        raise ValueError(f"--body must be one of {', '.join(BODY_KINDS)}")
    if uploads and chosen_body != "form":
        raise ValueError("file uploads need a form body")
    return replace(endpoint, method=(method or endpoint.method).upper(), path=path or endpoint.path,
                   body=chosen_body, fields=new_fields, files=uploads)


def render(value, values: dict):
    """Fills the templates in a field value (strings, and strings inside lists and objects)."""
    if isinstance(value, str):
        for key in NUMERIC_KEYS:
            if value == "{" + key + "}":
                return values[key]
        try:
            return value.format_map(values)
        except KeyError as error:
            raise ValueError(f"template {value!r} names {error}; templates may use "
                             + " ".join("{" + key + "}" for key in TEMPLATE_KEYS)) from error
    if isinstance(value, dict):
        return {name: render(item, values) for name, item in value.items()}
    if isinstance(value, list):
        return [render(item, values) for item in value]
    return value


def request_options(endpoint: Endpoint, values: dict, uploads: dict[str, bytes]) -> dict:
    """httpx keyword arguments (json=, data=, files=, params=) for one request."""
    filled = render(endpoint.fields, values)
    if endpoint.body == "json":
        return {"json": filled}
    as_text = {name: str(value) for name, value in filled.items()}
    if endpoint.body == "query":
        return {"params": as_text}
    files = {name: (endpoint.files[name].name, data, "audio/wav") for name, data in uploads.items()}
    return {"data": as_text, **({"files": files} if files else {})}
