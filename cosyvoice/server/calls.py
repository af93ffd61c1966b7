"""What the WebSocket and gRPC services share with the HTTP middleware: the API key check, and
the record of one call (request metrics and a JSON access-log line, as AccessLog writes them)."""
from __future__ import annotations

import hmac
import json
import time

from .metrics import Metrics
from .middleware import access_log

KEY_REQUIRED = "an API key is required: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"


def api_key_error(expected: str, authorization: str = "", x_api_key: str = "") -> str | None:
    """None when the key is right (or none is configured), else the sentence to answer with.
    `authorization` is the Authorization value ("Bearer KEY"); it wins over `x_api_key`."""
    if not expected:
        return None
    given = x_api_key
    if authorization[:7].lower() == "bearer ":
        given = authorization[7:].strip()
    if not given:
        return KEY_REQUIRED
    if not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
        return "invalid API key"
    return None


def record_call(metrics: Metrics, method: str, route: str, status: int | str, is_error: bool,
                started: float, client: str | None, outcome: str, **details) -> None:
    """Counts a finished call in cosyvoice_requests (and cosyvoice_errors) and logs its line.
    `status`: the HTTP status the call would have had (WebSocket), or a gRPC status code name."""
    metrics.requests.labels(method=method, route=route, status=str(status)).inc()
    if is_error:
        metrics.errors.labels(route=route, status=str(status)).inc()
    access_log.info(json.dumps({
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "method": method, "path": route,
        "status": status, "ms": round((time.perf_counter() - started) * 1000, 1), "client": client,
        "outcome": outcome, **details}, ensure_ascii=False))
