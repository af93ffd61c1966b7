"""Every error leaves the server as JSON with a sentence a user can act on.

Under /v1 the body has OpenAI's shape, {"error": {"message", "type", "param", "code"}}, so OpenAI
clients show the message; elsewhere it is FastAPI's {"detail": message}. Bad input is 4xx; a 500
means a bug and is logged with its traceback.
"""
from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request, params
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError

log = logging.getLogger("cosyvoice.server")

OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                409: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
                429: "rate_limit_error", 503: "server_overloaded"}
# "<_io.BytesIO object at 0x7f...>" and the like, from library messages: noise to a user
OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


class ApiError(Exception):
    """An error with its HTTP status, raised anywhere in a request."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class Overloaded(ApiError):
    """The queue is full or the model is not ready yet: try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(503, message, {"Retry-After": str(retry_after)})


class ClientGone(ApiError):
    """The client closed its connection while its request waited for a worker (nginx's 499)."""

    def __init__(self):
        super().__init__(499, "the client closed the connection while its request was queued")


def error_response(path: str, status: int, message: str, headers: dict[str, str] | None = None,
                   param: str | None = None) -> JSONResponse:
    message = _writable(OBJECT_REPR.sub("the upload", message))
    param = _writable(param) if param is not None else None
    if path.startswith("/v1/") or path == "/v1":
        body = {"error": {"message": message, "type": OPENAI_TYPES.get(status, "api_error"),
                          "param": param, "code": status}}
    else:
        body = {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


def _writable(text: str) -> str:
    """The text with anything UTF-8 cannot hold (lone surrogates from a JSON escape) escaped, so
    that writing the answer cannot fail whatever the request held."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def describe_validation_error(error: RequestValidationError) -> tuple[str, str | None]:
    """pydantic's error list -> one sentence naming each bad field, and the first field's name."""
    parts, first_field = [], None
    for item in error.errors():
        if item.get("type") == "json_invalid":   # its location is ("body", character offset)
            reason = (item.get("ctx") or {}).get("error", "JSON decode error")
            parts.append(f"the body is not valid JSON ({reason} at character {item['loc'][-1]})")
            continue
        location = [str(part) for part in item.get("loc", ()) if part not in ("body", "query", "form")]
        field_name = ".".join(location) or "request body"
        first_field = first_field or field_name
        parts.append(f"{field_name}: {item.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts), first_field


def body_kind_hint(request: Request) -> str:
    """A first clause saying what body the route reads, when the request sent the other kind
    (JSON to a form endpoint, or a form or untyped body to a JSON one); else ''."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None or not dependant.body_params:
        return ""
    reads_form = any(isinstance(param.field_info, params.Form) for param in dependant.body_params)
    sent_json = request.headers.get("content-type", "").startswith("application/json")
    if reads_form and sent_json:
        return ("this endpoint reads form fields (multipart/form-data or "
                "application/x-www-form-urlencoded), not JSON; ")
    if not reads_form and not sent_json:
        return "this endpoint reads a JSON body: send it with Content-Type: application/json; "
    return ""


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request.url.path, exc.status, exc.message, exc.headers)

    async def input_error(request: Request, exc: InputError) -> JSONResponse:
        return error_response(request.url.path, 400, str(exc))

    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, field_name = describe_validation_error(exc)
        status = 400 if request.url.path.startswith("/v1/") else 422
        return error_response(request.url.path, status, body_kind_hint(request) + message, param=field_name)

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no endpoint {request.method} {request.url.path}"
        return error_response(request.url.path, exc.status_code, message, dict(exc.headers or {}))

    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return error_response(request.url.path, 500, f"internal error ({type(exc).__name__}); "
                                                     "see the server log")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(InputError, input_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
