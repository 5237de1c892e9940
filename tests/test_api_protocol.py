"""The API worker's OpenAPI document, built in-process (it needs no model): each route
declares the errors it sends with the Error schema, beside those the guards send on every
route, and none of FastAPI's 422s (a request that fails validation is answered 400)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from common.config import load_settings
from production.api.app import create_app

ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}


@pytest.fixture
def schema(home: Path) -> dict[str, Any]:
    # Building the app reads only the settings (the guards); the Service's model, store and
    # worker are used by requests alone.
    app = create_app(SimpleNamespace(settings=load_settings(home)))
    return app.openapi()


def _operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
    ]


def test_every_error_a_route_declares_is_an_error_object(schema) -> None:
    assert '"422"' not in json.dumps(schema), "FastAPI's validation error, never sent here"
    assert not {"HTTPValidationError", "ValidationError"} & set(schema["components"]["schemas"])
    for method, path, operation in _operations(schema):
        for status, response in operation["responses"].items():
            if not status.startswith("2"):
                assert response["content"] == ERROR, (method, path, status)
                assert response["description"], (method, path, status)


def test_the_guards_statuses_are_declared_on_every_route(schema) -> None:
    for method, path, operation in _operations(schema):
        declared = set(operation["responses"])
        assert {"403", "411", "413"} <= declared, (method, path)
        # The bearer token guards every route but the supervisor's probe.
        assert ("401" in declared) == (path != "/health"), (method, path)


def test_a_route_that_validates_input_declares_its_400(schema) -> None:
    for method, path, operation in _operations(schema):
        query = [p for p in operation.get("parameters", []) if p["in"] == "query"]
        if "requestBody" in operation or query:
            assert "400" in operation["responses"], (method, path)


def test_the_generating_routes_document_their_answers_and_streams(schema) -> None:
    for path, answer in (
        ("/v1/chat/completions", "ChatCompletion"),
        ("/v1/completions", "TextCompletion"),
        ("/v1/responses", "ResponseObject"),
    ):
        content = schema["paths"][path]["post"]["responses"]["200"]["content"]
        assert content["application/json"]["schema"] == {"$ref": f"#/components/schemas/{answer}"}
        assert "text/event-stream" in content


def test_a_stored_response_and_the_import_document_what_they_answer(schema) -> None:
    stored = schema["paths"]["/v1/responses/{response_id}"]["get"]["responses"]
    assert stored["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ResponseObject"
    }
    imported = schema["paths"]["/v1/import"]["post"]
    assert set(imported["requestBody"]["content"]) == {
        "application/json",
        "application/x-ndjson",
        "application/zip",
    }
    assert imported["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Imported"
    }
