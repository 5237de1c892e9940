"""The API's answers to a fixed set of requests, recorded so two checkouts can be compared: a
restructuring must not move a token, a status code or an OpenAPI path.

    python -m benchmarks.api_record --out /tmp/after.json
    python -m benchmarks.api_record --checkout /tmp/old --out /tmp/before.json
    diff /tmp/before.json /tmp/after.json

A fresh home with the embedded model (linked from the test cache, `WHETSTONE_TEST_CACHE` or
.cache/test-models) is served by `python -m production.server` run from `--checkout`; every
answer is greedy. Values that differ between runs of one checkout (ids, clocks, timings) are
replaced by their key's name, so what is left differs only if behaviour did.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import httpx

from benchmarks.serving import Server

REPO = Path(__file__).resolve().parent.parent
MODEL_CACHE = Path(os.environ.get("WHETSTONE_TEST_CACHE", REPO / ".cache" / "test-models"))

# Keys whose values change from run to run of the same code.
VOLATILE_KEYS = re.compile(
    r"(^|_)(id|ids|at|created|uptime_s|seconds|ms|s|per_s|fingerprint|pid|port|url|path)$"
)
ISO_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")
ID_IN_TEXT = re.compile(r"\b[a-z]+_[0-9a-f]{12,}\b")  # conv_96ef894bd4d97732 in a message

GREEDY = {"temperature": 0, "max_tokens": 24}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
PERSON_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "person",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
            "additionalProperties": False,
        },
    },
}


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], **GREEDY, **extra}


# (name, method, path, body): in order; later ones read what earlier ones stored.
REQUESTS: list[tuple[str, str, str, Any]] = [
    ("health", "GET", "/health", None),
    ("models", "GET", "/v1/models", None),
    ("chat", "POST", "/v1/chat/completions", chat("What is the capital of France?")),
    (
        "chat_system",
        "POST",
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "What colour is the sky?"},
            ],
            **GREEDY,
        },
    ),
    ("chat_stream", "POST", "/v1/chat/completions", chat("Name three fruits.", stream=True)),
    (
        "chat_json",
        "POST",
        "/v1/chat/completions",
        chat("Invent a person.", response_format=PERSON_SCHEMA, max_tokens=40),
    ),
    (
        "chat_tool",
        "POST",
        "/v1/chat/completions",
        chat(
            "What is the weather in Paris?",
            tools=[WEATHER_TOOL],
            tool_choice="required",
            max_tokens=40,
        ),
    ),
    ("chat_stop", "POST", "/v1/chat/completions", chat("Count from one to ten.", stop=["five"])),
    (
        "chat_logprobs",
        "POST",
        "/v1/chat/completions",
        chat("Say hi.", logprobs=True, top_logprobs=2, max_tokens=4),
    ),
    ("completion", "POST", "/v1/completions", {"prompt": "Once upon a time", **GREEDY}),
    ("conversations", "GET", "/v1/conversations", None),
    # Rated first, then corrected: the TUI's order, on the first chat's answer.
    ("feedback", "POST", "/v1/feedback", {"message_id": "{message}", "rating": 4}),
    (
        "correction",
        "POST",
        "/v1/feedback",
        {"message_id": "{message}", "rating": 2, "correction": "Paris."},
    ),
    ("conversation", "GET", "/v1/conversations/{first}", None),
    ("search", "GET", "/v1/conversations?q=France", None),
    ("rename", "PATCH", "/v1/conversations/{first}", {"title": "Capitals"}),
    ("candidates", "GET", "/v1/candidates", None),
    # Refusals: the status and the error object.
    ("no_messages", "POST", "/v1/chat/completions", {"max_tokens": 4}),
    ("unknown_model", "POST", "/v1/chat/completions", chat("Hi", model="nope")),
    ("bad_rating", "POST", "/v1/feedback", {"message_id": "nope", "rating": 9}),
    ("unknown_field", "POST", "/v1/chat/completions", chat("Hi", frobnicate=1)),
    ("bad_limit", "GET", "/v1/conversations?limit=0", None),
    ("missing_conversation", "GET", "/v1/conversations/nope", None),
    ("forget", "DELETE", "/v1/conversations/{first}", None),
    ("forgotten", "GET", "/v1/conversations/{first}", None),
]


def normalized(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: normalized(v, k) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [normalized(v, key) for v in value]
    if value is not None and VOLATILE_KEYS.search(key):
        return f"<{key}>"
    if isinstance(value, str):
        return ID_IN_TEXT.sub("<id>", ISO_TIME.sub("<time>", value))
    return value


def streamed(response: httpx.Response) -> dict[str, Any]:
    """An SSE answer as what a client assembles: text, finish reason, the event count."""
    text, finish, events = [], None, 0
    for line in response.iter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        events += 1
        for choice in json.loads(line[6:]).get("choices", []):
            text.append(choice.get("delta", {}).get("content") or "")
            finish = choice.get("finish_reason") or finish
    return {"text": "".join(text), "finish_reason": finish, "events": events}


def record(client: httpx.Client) -> dict[str, Any]:
    answers: dict[str, Any] = {}
    # Ids later requests name: the first chat's answer, the oldest conversation.
    first: dict[str, str] = {}
    for name, method, path, body in REQUESTS:
        path = path.format(**first)
        if body is not None and body.get("message_id") == "{message}":
            body = body | {"message_id": first["message"]}
        if body is not None and body.get("stream"):
            with client.stream(method, path, json=body) as response:
                answers[name] = {"status": response.status_code, "body": streamed(response)}
            continue
        response = client.request(method, path, json=body)
        payload = response.json()
        if name == "chat":
            first["message"] = payload["id"]
        if name == "conversations" and payload.get("data"):
            first["first"] = payload["data"][-1]["id"]  # the oldest: the capital question
        answers[name] = {"status": response.status_code, "body": normalized(payload)}
    schema = client.get("/openapi.json").json()
    answers["openapi"] = {
        "paths": {path: sorted(ops) for path, ops in sorted(schema["paths"].items())},
        "responses": {
            f"{method} {path}": sorted(op.get("responses", {}))
            for path, ops in sorted(schema["paths"].items())
            for method, op in sorted(ops.items())
        },
    }
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, default=REPO, help="the code to serve")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        (home / "models").mkdir(parents=True)
        for entry in (MODEL_CACHE / "models").iterdir():
            (home / "models" / entry.name).symlink_to(entry, target_is_directory=True)
        server = Server(home, "server.log", checkout=args.checkout.resolve())
        try:
            server.wait_ready()
            answers = record(server.client)
        finally:
            server.stop()
    args.out.write_text(json.dumps(answers, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
