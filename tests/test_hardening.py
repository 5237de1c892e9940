"""Attacks on the API worker that used to succeed, against a real worker on 127.0.0.1 with the
embedded model: another web site driving it, bad input answered with a 500 (or stored as
junk), and a promotion that the worker refused yet still moved `current`."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from candidates import Registry
from data.store import Store
from tests.conftest import ServerProcess, link_model
from tests.test_server import make_lora

pytestmark = pytest.mark.slow

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, prepared_model_dir: Path):
    home = link_model(tmp_path_factory.mktemp("hardening") / "home", prepared_model_dir)
    server = ServerProcess(home).wait_ready()
    yield server, home, prepared_model_dir
    server.stop()


def _counts(home: Path) -> tuple[int, int]:
    with Store(f"sqlite:///{home}/whetstone.db") as store:
        conversations = store.list_conversations(limit=500)
        return len(conversations), sum(c.message_count or 0 for c in conversations)


def test_another_site_cannot_drive_or_read_the_api(served) -> None:
    server, home, _ = served
    before = _counts(home)
    url = server.url
    # A form on some page POSTs a chat (no CORS preflight for a simple request).
    form = httpx.post(
        f"{url}/v1/chat/completions",
        content=json.dumps({"messages": HI, "max_tokens": 2}),
        headers={"Origin": "https://evil.example", "Content-Type": "text/plain"},
    )
    assert form.status_code == 403, form.text
    assert "cross-origin request from 'https://evil.example'" in form.json()["error"]["message"]
    for path in ("/v1/train", "/v1/rollback", "/admin/reload"):
        refused = httpx.post(f"{url}{path}", headers={"Origin": "null"})
        assert refused.status_code == 403, (path, refused.text)
    fetched = httpx.get(
        f"{url}/v1/conversations", headers={"Sec-Fetch-Site": "cross-site", "Origin": "x"}
    )
    assert fetched.status_code == 403
    # DNS rebinding: the page's own name in Host, with no Origin on a same-"origin" GET.
    rebound = httpx.get(f"{url}/v1/conversations", headers={"Host": "evil.example:8321"})
    assert rebound.status_code == 403 and "DNS rebinding" in rebound.json()["error"]["message"]
    assert _counts(home) == before  # nothing was stored, no run queued
    with Store(f"sqlite:///{home}/whetstone.db") as store:
        assert store.latest_run() is None

    # What keeps working: the openai SDK, plain clients by any loopback name, and a page
    # served by whetstone itself (same origin).
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    answer = client.chat.completions.create(model="whetstone", messages=HI, max_tokens=4)
    assert answer.choices[0].message.content is not None
    port = url.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
        assert httpx.get(f"{url}/v1/status", headers={"Host": host}).status_code == 200
    same = httpx.get(
        f"{url}/v1/conversations",
        headers={"Origin": url, "Sec-Fetch-Site": "same-origin"},
    )
    assert same.status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": HI, "seed": 2**70}, "seed"),
        ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "text"),
    ],
)
def test_bad_chat_input_is_a_400_that_names_the_field(served, body: dict, field: str) -> None:
    server, home, _ = served
    before = _counts(home)
    # json.dumps escapes the lone surrogate as \ud800, as a buggy client would send it.
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=json.dumps(body),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    assert field in response.json()["error"]["message"]
    assert _counts(home) == before


def test_a_vanishing_temperature_decodes_greedily_instead_of_failing(served) -> None:
    server, _, _ = served
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}
    tiny = httpx.post(
        f"{server.url}/v1/chat/completions",
        json=body | {"temperature": 1e-300, "max_tokens": 12},
        timeout=60,
    )
    greedy = httpx.post(
        f"{server.url}/v1/chat/completions",
        json=body | {"temperature": 0, "max_tokens": 12},
        timeout=60,
    )
    assert tiny.status_code == greedy.status_code == 200, tiny.text
    text = tiny.json()["choices"][0]["message"]["content"]
    assert text == greedy.json()["choices"][0]["message"]["content"]
    assert "Paris" in text


def test_lone_surrogates_in_feedback_and_titles_are_refused_and_nothing_is_stored(
    served,
) -> None:
    server, home, _ = served
    done = httpx.post(
        f"{server.url}/v1/chat/completions", json={"messages": HI, "max_tokens": 4}, timeout=60
    )
    message_id = done.headers["X-Whetstone-Message-Id"]
    conversation_id = done.headers["X-Whetstone-Conversation-Id"]
    for field in ("correction", "comment"):
        sent = json.dumps({"message_id": message_id, field: "oops \ud800"})
        response = httpx.post(
            f"{server.url}/v1/feedback",
            content=sent,
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 400, response.text
        assert f"{field} is not valid text: a lone surrogate U+D800" in response.text
    renamed = httpx.patch(
        f"{server.url}/v1/conversations/{conversation_id}",
        content=json.dumps({"title": "\udc00"}),
        headers={"Content-Type": "application/json"},
    )
    assert renamed.status_code == 400 and "title is not valid text" in renamed.text
    with Store(f"sqlite:///{home}/whetstone.db") as store:
        assert store.get_message(message_id).current_feedback is None
    huge = httpx.get(f"{server.url}/v1/conversations", params={"offset": 2**63})
    assert huge.status_code == 400 and huge.json()["error"]["param"] == "offset"


def _unloadable(home: Path, prepared: Path, candidate_id: str) -> str:
    """An adapter whose files pass every integrity check but that names a module the base
    model does not have: PEFT refuses it only when it is loaded."""
    make_lora(home, candidate_id, prepared)
    folder = home / "candidates" / candidate_id
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "v_proj", "no_such_proj"]
    config["layers_to_transform"] = [99]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return candidate_id


def test_a_promotion_the_worker_cannot_load_changes_nothing(served) -> None:
    server, home, prepared = served
    good = make_lora(home, "cand-good", prepared, seed=1)
    ok = httpx.post(f"{server.url}/v1/candidates/{good}/promote", json={"force": True}, timeout=120)
    assert ok.status_code == 200 and ok.json()["serving"] == good
    bad = _unloadable(home, prepared, "cand-unloadable")
    with Store(f"sqlite:///{home}/whetstone.db") as store:
        promotions = len(store.list_promotions(limit=100))

    refused = httpx.post(
        f"{server.url}/v1/candidates/{bad}/promote", json={"force": True}, timeout=120
    )
    assert refused.status_code == 409, refused.text
    assert f"nothing changed, still serving {good}" in refused.json()["error"]["message"]
    registry = Registry(home / "candidates")
    assert registry.current_id() == good and registry.previous_id() is None
    with Store(f"sqlite:///{home}/whetstone.db") as store:
        assert len(store.list_promotions(limit=100)) == promotions  # no audit row
    status = httpx.get(f"{server.url}/v1/status").json()
    assert status["adapter_id"] == good
    answer = httpx.post(
        f"{server.url}/v1/chat/completions", json={"messages": HI, "max_tokens": 4}, timeout=60
    )
    assert answer.status_code == 200 and answer.json()["model"]


def test_huge_requests_are_refused_before_any_work_and_health_keeps_answering(served) -> None:
    import threading

    server, home, _ = served
    before = _counts(home)
    body = json.dumps({"messages": [{"role": "user", "content": "word " * 1_000_000}]})
    too_big = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert too_big.status_code == 413, too_big.text
    assert "server.max_request_bytes" in too_big.json()["error"]["message"]

    # Under the byte limit but far past the context window: refused without tokenising,
    # while /health answers at once throughout.
    long = json.dumps({"messages": [{"role": "user", "content": "word " * 700_000}]})
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        import time

        while not stop.is_set():
            started = time.monotonic()
            httpx.get(f"{server.url}/health", timeout=30)
            latencies.append(time.monotonic() - started)

    watcher = threading.Thread(target=probe)
    watcher.start()
    try:
        for _ in range(6):  # six in a row used to leave the API down for good
            refused = httpx.post(
                f"{server.url}/v1/chat/completions",
                content=long,
                headers={"Content-Type": "application/json"},
                timeout=60,
            )
            assert refused.status_code == 400, refused.text
            assert "fit in the context window" in refused.json()["error"]["message"]
    finally:
        stop.set()
        watcher.join()
    # The daemon's health check gives up after 5 s; a miss is what used to get it killed.
    assert latencies and max(latencies) < 5.0, max(latencies)
    assert _counts(home) == before
    chunked = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=iter([json.dumps({"messages": HI}).encode()]),
        headers={"Content-Type": "application/json"},
    )
    assert chunked.status_code == 411


def test_a_locked_database_answers_503_with_retry_after_and_health_stays_up(served) -> None:
    import sqlite3
    import threading
    import time

    server, home, _ = served
    done = httpx.post(
        f"{server.url}/v1/chat/completions", json={"messages": HI, "max_tokens": 4}, timeout=60
    )
    message_id = done.headers["X-Whetstone-Message-Id"]
    holder = sqlite3.connect(home / "whetstone.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process holding a write transaction
    health: list[float] = []
    try:
        answer: dict = {}

        def rate() -> None:
            rated = {"message_id": message_id, "rating": 5}
            response = httpx.post(f"{server.url}/v1/feedback", json=rated, timeout=60)
            answer.update(status=response.status_code, headers=response.headers, body=response.text)

        rating = threading.Thread(target=rate)
        rating.start()
        while rating.is_alive():
            started = time.monotonic()
            assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
            health.append(time.monotonic() - started)
            time.sleep(0.2)
        rating.join()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert answer["status"] == 503, answer["body"]
    assert answer["headers"]["retry-after"] == "2"
    assert "database is busy" in answer["body"]
    assert max(health) < 5.0  # the wait did not block the event loop
    again = httpx.post(f"{server.url}/v1/feedback", json={"message_id": message_id, "rating": 5})
    assert again.status_code == 200 and again.json()["rating"] == 5


def test_a_conversations_reasoning_effort_is_the_one_its_prompt_is_made_with(
    tmp_path: Path,
) -> None:
    """A conversation set to "high" by PATCH answers exactly as a request that asks for "high"
    does (the harmony system message says so), not as the default "medium"."""
    from tests.tiny_models import model_home, tiny_gpt_oss

    home = model_home(tmp_path / "home", tiny_gpt_oss(tmp_path / "gpt-oss"), chat_format="harmony")
    server = ServerProcess(home).wait_ready()
    try:

        def ask(conversation: str | None = None, effort: str | None = None) -> httpx.Response:
            body = {"messages": HI, "temperature": 0, "max_tokens": 12, "include_reasoning": True}
            body |= {"conversation_id": conversation} if conversation else {}
            body |= {"reasoning_effort": effort} if effort else {}
            response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
            assert response.status_code == 200, response.text
            return response

        def said(response: httpx.Response) -> tuple[int, dict]:
            answer = response.json()
            return answer["usage"]["prompt_tokens"], answer["choices"][0]["message"]

        high, medium = said(ask(effort="high")), said(ask(effort="medium"))
        assert high != medium, "the effort changes the prompt"
        conversation = ask().headers["X-Whetstone-Conversation-Id"]
        patched = httpx.patch(
            f"{server.url}/v1/conversations/{conversation}",
            json={"reasoning_effort": "high"},
            timeout=30,
        )
        assert patched.status_code == 200, patched.text
        assert said(ask(conversation)) == high
    finally:
        server.stop()


def test_the_openapi_schema_documents_the_400_the_server_sends(served) -> None:
    server, _, _ = served
    schema = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    assert '"422"' not in json.dumps(schema), "FastAPI's default, never sent here"
    documented = schema["paths"]["/v1/feedback"]["post"]["responses"]["400"]
    assert documented["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"
    }
    sent = httpx.post(f"{server.url}/v1/feedback", json={"rating": "high"}, timeout=30)
    assert sent.status_code == 400
    assert set(sent.json()["error"]) == {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def api_schema(served):
    schemathesis = pytest.importorskip("schemathesis")
    server, _, _ = served
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


try:
    import schemathesis as _schemathesis
    from hypothesis import HealthCheck, settings
except ImportError:  # pragma: no cover - schemathesis is a dev dependency
    _schemathesis = None

if _schemathesis is not None:
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        status_code_conformance,
    )

    ANSWER_LENGTH_KEYS = {
        "/v1/chat/completions": "max_tokens",
        "/v1/completions": "max_tokens",
        "/v1/responses": "max_output_tokens",
    }

    # Not generated: train (a valid empty body starts a real training job on this machine).
    fuzzed = _schemathesis.pytest.from_fixture("api_schema").exclude(path="/v1/train")

    @fuzzed.parametrize()
    @settings(
        max_examples=15,  # per operation: about a minute against the CPU worker
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )
    def test_generated_requests_never_get_a_5xx_or_an_undocumented_status(case) -> None:
        """schemathesis against the live worker's own /openapi.json: bounded examples per
        operation (valid and invalid bodies, parameters and ids), no 5xx, and every status
        sent is one the schema documents."""
        length = ANSWER_LENGTH_KEYS.get(case.operation.path)
        if length and isinstance(case.body, dict) and length not in case.body:
            # A valid body without a length is answered to the model's end: ~20 s each on
            # the CPU worker (4 min for /v1/responses' 15, whose valid bodies are easy to
            # generate). What is checked is the status, not the answer's length.
            case.body[length] = 4
        case.call_and_validate(
            checks=[not_a_server_error, status_code_conformance, content_type_conformance],
            timeout=60,
        )
