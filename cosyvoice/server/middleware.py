"""ASGI middleware around every request: access log + request metrics, API key, body size limit.

They are plain ASGI (not BaseHTTPMiddleware) so streamed responses pass through unbuffered.
"""
from __future__ import annotations

import hmac
import json
import logging
import time

from starlette.exceptions import HTTPException

from .errors import error_response
from .metrics import Metrics

access_log = logging.getLogger("cosyvoice.access")

# Answer without an API key: deploy scripts poll /health and /ready; the page at / is static and
# sends the key its user types.
OPEN_PATHS = {"/health", "/ready", "/"}


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
    """Requires `Authorization: Bearer KEY` or `X-API-Key: KEY`, except on OPEN_PATHS and CORS
    preflight requests."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key", b"")
        authorization = headers.get(b"authorization", b"")
        if authorization[:7].lower() == b"bearer ":
            given = authorization[7:].strip()
        if not given or not hmac.compare_digest(given, self.key):
            message = "invalid API key" if given else \
                "an API key is required: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
            response = error_response(scope["path"], 401, message, {"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


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
