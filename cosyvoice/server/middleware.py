"""ASGI middleware around every request: access log + request metrics, API key, body size limit,
and a check that the text a request carries is valid Unicode.

They are plain ASGI (not BaseHTTPMiddleware) so streamed responses pass through unbuffered.
"""
from __future__ import annotations

import hmac
import json
import logging
import re
import time
from urllib.parse import parse_qsl, unquote_plus, unquote_to_bytes

from starlette.exceptions import HTTPException

from .errors import error_response
from .metrics import Metrics

access_log = logging.getLogger("cosyvoice.access")

# Answer without an API key: deploy scripts poll /health and /ready.
OPEN_PATHS = {"/health", "/ready"}
# The web page is static and sends the key its user types; "/" with a `text` parameter is the
# SillyTavern CosyVoice API, which needs the key like any other.
PAGE_PATHS = {"/", "/static/", "/static/index.html"}


class AccessLog:
    """One JSON line per request when its response ends; counts requests and errors by route."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        response = {"status": 0, "bytes": 0}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
            elif message["type"] == "http.response.body":
                response["bytes"] += len(message.get("body", b""))
            await send(message)

        outcome = "complete"
        try:
            await self.app(scope, receive, counting_send)
        except BaseException as error:
            outcome = f"aborted ({type(error).__name__})"
            if response["status"] in (0, 200):
                response["status"] = 500 if isinstance(error, Exception) else 499
            raise
        finally:
            self._record(scope, response, outcome, time.perf_counter() - started)

    def _record(self, scope, response, outcome: str, seconds: float) -> None:
        route = scope.get("route")
        route_name = getattr(route, "path", None) or "unmatched"
        status = str(response["status"])
        self.metrics.requests.labels(method=scope["method"], route=route_name, status=status).inc()
        if response["status"] >= 400:
            self.metrics.errors.labels(route=route_name, status=status).inc()
        client = scope.get("client")
        access_log.info(json.dumps({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "method": scope["method"],
            "path": scope["path"], "status": response["status"], "bytes": response["bytes"],
            "ms": round(seconds * 1000, 1), "client": f"{client[0]}:{client[1]}" if client else None,
            "outcome": outcome}, ensure_ascii=False))


class ApiKey:
    """Requires `Authorization: Bearer KEY`, `X-API-Key: KEY` or, for links a media element opens
    (it cannot send headers), an `api_key=KEY` query parameter; except on OPEN_PATHS, the page and
    CORS preflights. The query parameter is removed before the request goes on, so no route, log
    line or error message ever holds it."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        query_key, query = take_query_parameter(scope.get("query_string", b""), "api_key")
        if query_key is not None:
            scope = {**scope, "query_string": query}
        if scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS" or is_page_request(scope):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key", b"")
        authorization = headers.get(b"authorization", b"")
        if authorization[:7].lower() == b"bearer ":
            given = authorization[7:].strip()
        if not given and query_key is not None:
            given = query_key.encode("utf-8")
        if not given or not hmac.compare_digest(given, self.key):
            message = "invalid API key" if given else \
                "an API key is required: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY' " \
                "(or add ?api_key=KEY to a link)"
            response = error_response(scope["path"], 401, message, {"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def is_page_request(scope) -> bool:
    """GET of the web page (not "/?text=...", which asks for speech)."""
    if scope["path"] not in PAGE_PATHS or scope["method"] not in ("GET", "HEAD"):
        return False
    names = {name for name, _ in parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                                           keep_blank_values=True)}
    return "text" not in names


def take_query_parameter(query: bytes, name: str) -> tuple[str | None, bytes]:
    """(the parameter's last value or None, the query string without it; the other parameters
    keep their bytes exactly)."""
    value, kept = None, []
    for piece in query.split(b"&"):
        key, _, raw = piece.partition(b"=")
        if unquote_plus(key.decode("latin-1")) == name:
            value = unquote_plus(raw.decode("latin-1"))
        elif piece:
            kept.append(piece)
    return value, b"&".join(kept)


class BodyTooLarge(HTTPException):
    """Raised from `receive`; FastAPI passes HTTPExceptions from body reading on to the handlers."""

    def __init__(self, max_bytes: int):
        super().__init__(413, f"the request body is larger than the {max_bytes / (1024 * 1024):g} MiB limit")


class BodyLimit:
    """413 for request bodies over `max_bytes`: at once from Content-Length, or while reading."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(scope["path"], 413, BodyTooLarge(self.max_bytes).detail)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


# Lone UTF-16 surrogates: valid JSON escapes (\ud800), but no text UTF-8 can hold
SURROGATE = re.compile("[\ud800-\udfff]")


class TextCheck:
    """400 for text that is not valid Unicode, before any route sees it: a JSON string holding a lone
    surrogate (it would fail deep in the text frontend, or while writing the answer), or a query
    parameter or urlencoded form field whose bytes are not UTF-8 (the framework would quietly turn
    them into U+FFFD). JSON and urlencoded bodies are read here (BodyLimit, inside, bounds them)
    and handed on unchanged; multipart bodies (uploads) pass through unread."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = undecodable_query(scope.get("query_string", b""))
        content_type = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
        kind = "json" if content_type == b"application/json" or content_type.endswith(b"+json") \
            else "form" if content_type == b"application/x-www-form-urlencoded" else None
        if problem is None and kind is not None:
            try:
                body, receive = await read_body(receive)
            except BodyTooLarge as error:
                return await error_response(scope["path"], 413, error.detail)(scope, receive, send)
            if body is None:   # the client left
                return
            problem = invalid_json_text(body) if kind == "json" else undecodable_query(body, "form field")
        if problem is not None:
            return await error_response(scope["path"], 400, problem)(scope, receive, send)
        return await self.app(scope, receive, send)


async def read_body(receive):
    """(the whole request body, or None if the client disconnected; a receive that replays it)."""
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, receive
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body, replayed = b"".join(chunks), False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return body, replay


def undecodable_query(data: bytes, what: str = "query parameter") -> str | None:
    """A sentence naming the first name=value pair whose bytes are not UTF-8, else None."""
    for piece in data.split(b"&"):
        key, _, value = piece.partition(b"=")
        for part in (key, value):
            try:
                unquote_to_bytes(part.replace(b"+", b" ")).decode("utf-8")
            except UnicodeDecodeError:
                name = unquote_to_bytes(key).decode("utf-8", "replace")
                return f"the {what} '{name}' is not valid UTF-8; send text encoded as UTF-8"
    return None


def invalid_json_text(body: bytes) -> str | None:
    """A sentence naming the first JSON string (key or value) holding a lone surrogate, else None.
    A body that does not parse is left to the route (it answers with its own error)."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    except RecursionError:   # json.loads gives up on deep nesting; the route's parser would too
        return "the JSON body is nested too deeply"
    pending = [(document, "")]
    while pending:
        value, where = pending.pop()
        if isinstance(value, str):
            if SURROGATE.search(value):
                field_name = where or "the body"
                return (f"the JSON string at '{field_name}' is not valid Unicode (it holds a lone "
                        "UTF-16 surrogate such as \\ud800); send text that can be encoded as UTF-8")
        elif isinstance(value, dict):
            for key, item in value.items():
                if SURROGATE.search(key):
                    return ("a JSON key is not valid Unicode (it holds a lone UTF-16 surrogate); "
                            "send text that can be encoded as UTF-8")
                pending.append((item, f"{where}.{key}" if where else key))
        elif isinstance(value, list):
            pending.extend((item, f"{where}[{index}]") for index, item in enumerate(value))
    return None
