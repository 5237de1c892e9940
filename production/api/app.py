"""The app factory: one FastAPI app over a Service (lifespan, request guards, error
handlers, the routers), and the OpenAPI schema it documents."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from production.api import routes_admin, routes_candidates, routes_chat, routes_conversations
from production.api.errors import install_error_handlers
from production.api.guards import install_guards
from production.api.service import Service


def create_app(service: Service, on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """The app; `on_shutdown` runs as the lifespan ends (the process forgets its address)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        watcher = asyncio.create_task(service.watch_current())
        yield
        watcher.cancel()
        # Here, not after serve() returns: uvicorn re-raises SIGTERM once it has shut down.
        if on_shutdown is not None:
            on_shutdown()

    app = FastAPI(title="whetstone", lifespan=lifespan)
    app.state.service = service
    install_guards(app, service.settings)
    install_error_handlers(app)
    # In this order: the OpenAPI schema lists the paths as the routes were added.
    for routes in (routes_admin, routes_candidates, routes_conversations, routes_chat):
        app.include_router(routes.router)
    app.openapi = lambda: _documented_schema(app)  # type: ignore[method-assign]
    return app


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": "string"},
            },
        }
    },
}


# Statuses the middleware and the handlers send on routes they do not declare themselves.
_SENT_EVERYWHERE = {"503": "Busy: the database is locked or the queue is full (Retry-After)"}
_SENT_BY_MIDDLEWARE = {
    "400": "Invalid body or parameter",
    "401": "Missing or wrong bearer token (non-loopback binds)",
    "403": "Cross-origin or foreign-Host request",
    "411": "Chunked body without Content-Length",
    "413": "Body larger than server.max_request_bytes",
}


def _documented_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI schema with the errors this server sends: a bad body or parameter is
    a 400 with an OpenAI-style error object (production.api.errors), never FastAPI's 422."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components["Error"] = _ERROR_SCHEMA
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None:
                responses["400"] = {"description": "Invalid body or parameter"} | error
            sent = dict(_SENT_EVERYWHERE)
            if path != "/health":
                sent |= _SENT_BY_MIDDLEWARE
            if "{" in path or method != "get":  # an id in the path or the body
                sent |= {"404": "No such id", "410": "The conversation was forgotten"}
            if method in ("post", "patch", "delete"):
                sent |= {"409": "Conflicts with the current state (busy, refused promotion)"}
            for status, description in sent.items():
                responses.setdefault(status, {"description": description} | error)
    # stream: true answers with server-sent events (OpenAI's streaming format).
    for path in ("/v1/chat/completions", "/v1/completions"):
        ok = schema["paths"][path]["post"]["responses"]["200"]
        ok.setdefault("content", {})["text/event-stream"] = {"schema": {"type": "string"}}
    app.openapi_schema = schema
    return schema
