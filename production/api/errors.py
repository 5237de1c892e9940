"""Errors in OpenAI's shape: ApiError, the error body, the app's exception handlers (invalid
requests are a 400 here, never FastAPI's 422 or its {"detail"} body), and `sends`, which
declares a route's error statuses for the OpenAPI document."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from data.errors import Gone, InvalidInput, NotFound, StoreError
from production.api.protocol import Error, ErrorDetail


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        **headers: str,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.code = code


# OpenAI's error `code` is a string; these name what went wrong per status.
_ERROR_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    410: "gone",
    411: "length_required",
    413: "request_too_large",
    499: "client_closed_request",
    500: "server_error",
    503: "overloaded",
}


def error_body(
    message: str, status: int, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The JSON of an Error (protocol.py)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = code or _ERROR_CODES.get(status, "error")
    detail = ErrorDetail(message=message, type=kind, param=param, code=code)
    return Error(error=detail).model_dump()


# What each status means wherever this server sends it: the OpenAPI descriptions.
_MEANINGS = {
    400: "Invalid body or parameter",
    401: "Missing or wrong bearer token (non-loopback binds)",
    403: "Cross-origin or foreign-Host request",
    404: "No such id",
    409: "Conflicts with the current state (a refused adapter or promotion, a run already going)",
    410: "The conversation was forgotten",
    411: "Chunked body without Content-Length",
    413: "Body larger than server.max_request_bytes",
    503: "Busy: the database is locked or the queue is full (Retry-After)",
}


def sends(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` of a route (or router) that answers these statuses with an Error:
    FastAPI documents each with the Error schema."""
    return {status: {"model": Error, "description": _MEANINGS[status]} for status in statuses}


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.message, exc.status, exc.param, exc.code),
        exc.status,
        headers=exc.headers,
    )


async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    params = []
    for err in exc.errors():
        parts = [str(p) for p in err["loc"] if p != "body"]
        # Union members add their type names to the path (tool_choice.literal[...]).
        parts = [p for p in parts if not ("[" in p or p in ("str", "list[str]", "int"))]
        loc = ".".join(parts)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "json_invalid":
            problems.append(f"malformed JSON: {err.get('ctx', {}).get('error', err['msg'])}")
        elif not loc and err["type"] in ("model_attributes_type", "dict_type"):
            problems.append("the request body must be a JSON object")
        elif err["type"] == "missing":
            problems.append(f"{loc}: required")
        elif err["type"] == "extra_forbidden":
            problems.append(f"unknown parameter {loc!r}")
        else:
            problems.append(f"{loc}: {msg}" if loc else msg)
        if not loc and msg.split(" ", 1)[0].isidentifier():
            loc = msg.split(" ", 1)[0]  # a rule across fields names its field first
        if loc:
            params.append(loc)
    param = params[0] if params else None
    return JSONResponse(error_body("; ".join(dict.fromkeys(problems)), 400, param), 400)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and wrong methods: OpenAI's error shape, not FastAPI's {"detail"}.
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return JSONResponse(error_body(message, exc.status_code), exc.status_code, headers=exc.headers)


async def _database_busy(request: Request, exc: OperationalError) -> JSONResponse:
    if "locked" not in str(exc.orig) and "busy" not in str(exc.orig):
        raise exc
    # Another process holds a write transaction past the busy timeout: try again soon.
    return JSONResponse(
        error_body("the database is busy (another process is writing); try again", 503),
        503,
        headers={"Retry-After": "2"},
    )


async def _store_error(request: Request, exc: StoreError) -> JSONResponse:
    status = 404 if isinstance(exc, NotFound) else 410 if isinstance(exc, Gone) else 400
    if not isinstance(exc, NotFound | Gone | InvalidInput):
        status = 500
    return JSONResponse(error_body(str(exc), status), status)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error the app raises or meets with an OpenAI-style error body."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _bad_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_busy)
    app.add_exception_handler(StoreError, _store_error)
