"""The app factory: one FastAPI app over a Service (lifespan, request guards, error
handlers, the routers), and the OpenAPI schema it documents."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from production.api import (
    routes_admin,
    routes_candidates,
    routes_chat,
    routes_conversations,
    routes_memory,
)
from production.api.errors import install_error_handlers, sends
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

    # Every route can answer what the guards (guards.py) refuse before it runs: a foreign
    # origin or Host, a chunked or too large body; each route declares its own errors.
    app = FastAPI(title="whetstone", lifespan=lifespan, responses=sends(403, 411, 413))
    app.state.service = service
    install_guards(app, service.settings)
    install_error_handlers(app)
    # In this order: the OpenAPI schema lists the paths as the routes were added. /health
    # answers without the bearer token; every other route needs it on binds that have one.
    app.include_router(routes_admin.unguarded)
    for routes in (
        routes_admin,
        routes_candidates,
        routes_conversations,
        routes_memory,
        routes_chat,
    ):
        app.include_router(routes.router, responses=sends(401))
    app.openapi = lambda: _schema_without_422(app)  # type: ignore[method-assign]
    return app


def _schema_without_422(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI schema, less the one thing it documents that this server never
    sends: a 422 for every route with parameters. A request that fails validation gets the
    400 its route declares (errors.py's handler), so the 422s and their schemas go."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)  # builds and caches it in app.openapi_schema
        for operations in schema["paths"].values():
            for operation in operations.values():
                operation["responses"].pop("422", None)
        for unused in ("HTTPValidationError", "ValidationError"):
            schema["components"]["schemas"].pop(unused, None)
    return app.openapi_schema
