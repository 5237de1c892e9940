"""The checks every request passes before a route sees it: same origin only, a bounded
body, and the bearer token (on binds that need one)."""

from __future__ import annotations

import logging
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from common.config import Settings, is_loopback
from production.api.errors import error_body

log = logging.getLogger(__name__)


def _host_name(host_header: str) -> str:
    """The name in a Host header, without the port ("[::1]:8321" -> "::1")."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def foreign_request(headers: Any, scheme: str, loopback_bind: bool) -> str | None:
    """Why a request must be refused as coming from another web site, or None.

    A page on any site can make the browser send requests to 127.0.0.1 (a form POST needs no
    CORS approval) and, by rebinding its own DNS name to 127.0.0.1, read the answers. Browsers
    name the page's origin in `Origin` (and `Sec-Fetch-Site`); a rebinding page still sends
    its own name in `Host`. Clients that are not browsers (the openai SDK, curl, the TUI) send
    neither Origin nor a foreign Host, and whetstone's own pages are same-origin."""
    host = headers.get("host", "")
    if loopback_bind and not is_loopback(_host_name(host).lower()):
        return (
            f"Host {host!r} is not this server: on a loopback bind it answers only to "
            "127.0.0.1, localhost or [::1] (a foreign name is how DNS rebinding reaches it)"
        )
    origin = headers.get("origin")
    if origin is not None and origin != f"{scheme}://{host}":
        return f"cross-origin request from {origin!r} refused: whetstone allows no other origin"
    if headers.get("sec-fetch-site") == "cross-site":
        return "cross-site request refused: whetstone allows no other origin"
    return None


def install_guards(app: FastAPI, settings: Settings) -> None:
    """Add the three middlewares; the last added runs first."""
    token = settings.bearer_token()
    loopback_bind = is_loopback(settings.server.host)

    @app.middleware("http")
    async def require_token(request: Request, call_next: Any) -> Any:
        given = request.headers.get("authorization", "")
        authorized = secrets.compare_digest(given.encode(), f"Bearer {token}".encode())
        if token and request.url.path != "/health" and not authorized:
            return JSONResponse(
                error_body("missing or wrong bearer token (see <home>/token)", 401), 401
            )
        return await call_next(request)

    # Registered after require_token, so it runs first: a foreign page learns nothing.
    max_body = settings.server.max_request_bytes

    @app.middleware("http")
    async def bounded_body(request: Request, call_next: Any) -> Any:
        declared = request.headers.get("content-length")
        if declared is None and "transfer-encoding" in request.headers:
            return JSONResponse(
                error_body("send the body with a Content-Length (no chunked uploads)", 411),
                411,
            )
        if declared is not None and (not declared.isdigit() or int(declared) > max_body):
            return JSONResponse(
                error_body(
                    f"the request body is {declared} bytes; at most {max_body} are accepted "
                    "(server.max_request_bytes)",
                    413,
                ),
                413,
            )
        return await call_next(request)

    @app.middleware("http")
    async def same_origin_only(request: Request, call_next: Any) -> Any:
        problem = foreign_request(request.headers, request.url.scheme, loopback_bind)
        if problem is not None:
            log.warning("refused %s %s: %s", request.method, request.url.path, problem)
            return JSONResponse(error_body(problem, 403), 403)
        return await call_next(request)
