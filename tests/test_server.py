"""The API worker end to end: a real server process on 127.0.0.1 with the embedded model."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from candidates import Registry
from data.store import Store
from tests.conftest import ServerProcess, run_cli
from tests.test_registry import make_meta, write_fake_adapter

pytestmark = pytest.mark.slow

BASE = "embedded:smollm2-135m-instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a very long story about a dragon and a knight."}]


def store_of(home: Path) -> Store:
    return Store(f"sqlite:///{home}/whetstone.db")


def make_lora(home: Path, candidate_id: str, prepared: Path, seed: int = 0) -> str:
    """A real LoRA on the embedded model, with random B so it changes the answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(prepared, dtype=torch.bfloat16)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    model = get_peft_model(base, config)
    registry = Registry(home / "candidates")
    registry.create(make_meta(candidate_id, base_model=BASE), model.save_pretrained)
    return candidate_id


def sse_events(response: httpx.Response):
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            yield None if payload == "[DONE]" else json.loads(payload)


def chat(url: str, messages: list[dict], **body) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={"messages": messages, "temperature": 0, "max_tokens": 24} | body,
        timeout=120,
    )


def test_openai_sdk_streams_and_answers_and_everything_is_stored(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    plain = client.chat.completions.create(
        model="whetstone", messages=FRANCE, temperature=0, max_tokens=24
    )
    answer = plain.choices[0].message.content
    assert "Paris" in answer
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens > 0

    follow_up = [*FRANCE, {"role": "assistant", "content": answer}]
    follow_up.append({"role": "user", "content": "And what is the capital of Italy?"})
    stream = client.chat.completions.create(
        model="whetstone",
        messages=follow_up,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Rome" in streamed
    assert {c.id for c in chunks} == {chunks[0].id}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

    store = store_of(server.home)
    first, second = store.get_message(plain.id), store.get_message(chunks[0].id)
    assert (first.content, first.finish_reason, first.adapter_id) == (answer, "stop", None)
    assert first.base_model == BASE and first.generation["temperature"] == 0.0
    assert second.content == streamed
    # A plain OpenAI client that resends the history continues the same conversation.
    assert first.conversation_id == second.conversation_id
    conversation = store.get_conversation(first.conversation_id)
    assert [m.role for m in conversation.messages] == ["user", "assistant"] * 2

    feedback = httpx.post(
        f"{server.url}/v1/feedback",
        json={"message_id": plain.id, "rating": 4, "correction": "Paris, of course."},
    )
    assert feedback.status_code == 200, feedback.text
    current = store.current_feedback(plain.id)
    assert (current.rating, current.correction) == (4, "Paris, of course.")


def test_headers_name_the_message_and_conversation(server: ServerProcess) -> None:
    response = chat(server.url, FRANCE)
    body = response.json()
    assert response.headers["X-Whetstone-Message-Id"] == body["id"]
    assert response.headers["X-Whetstone-Conversation-Id"] == body["conversation_id"]
    again = chat(
        server.url,
        [{"role": "user", "content": "Thanks!"}],
        conversation_id=body["conversation_id"],
    )
    assert again.json()["conversation_id"] == body["conversation_id"]
    listing = httpx.get(f"{server.url}/v1/conversations").json()["data"]
    assert [c["id"] for c in listing] == [body["conversation_id"]]


def test_promotion_mid_stream_finishes_on_the_old_adapter(
    server: ServerProcess, prepared_model_dir: Path
) -> None:
    make_lora(server.home, "cand-1", prepared_model_dir)
    registry = Registry(server.home / "candidates")
    reload_result: dict = {}
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json={"messages": STORY, "stream": True, "max_tokens": 40, "temperature": 0},
        timeout=120,
    ) as response:
        events = sse_events(response)
        next(events)  # role chunk
        next(events)  # first text: the generation is in flight
        registry.promote("cand-1", base_model=BASE)

        def reload() -> None:
            reply = httpx.post(f"{server.url}/admin/reload", timeout=120)
            reload_result.update(reply.json(), status=reply.status_code)

        swapper = threading.Thread(target=reload)
        swapper.start()
        rest = list(events)
    swapper.join(timeout=60)
    assert rest[-1] is None  # [DONE]
    final = [e for e in rest if e and e["choices"] and e["choices"][0]["finish_reason"]]
    assert final[0]["adapter_id"] is None  # finished on the adapter it started with
    assert reload_result["status"] == 200 and reload_result["adapter_id"] == "cand-1"

    after = chat(server.url, FRANCE).json()
    assert after["adapter_id"] == "cand-1"
    assert (after["model"], after["system_fingerprint"]) == ("whetstone/cand-1", "whetstone-cand-1")
    assert store_of(server.home).get_message(after["id"]).adapter_id == "cand-1"
    status = httpx.get(f"{server.url}/v1/status").json()
    assert status["adapter_id"] == "cand-1"
    models = [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]]
    assert models == ["whetstone", BASE, "whetstone/cand-1"]  # each an alias of what serves


def test_a_manual_symlink_swap_is_picked_up_and_a_broken_adapter_refused(
    server: ServerProcess, prepared_model_dir: Path
) -> None:
    make_lora(server.home, "good", prepared_model_dir)
    registry = Registry(server.home / "candidates")
    registry.promote("good", base_model=BASE)  # no admin call: the file watch must see it
    deadline = time.monotonic() + 20
    while httpx.get(f"{server.url}/v1/status").json()["adapter_id"] != "good":
        assert time.monotonic() < deadline, "the swap of candidates/current was not noticed"
        time.sleep(0.3)

    # Registry-valid files whose shapes do not fit this model: PEFT refuses to load them.
    registry.create(make_meta("misfit", base_model=BASE), write_fake_adapter)
    registry.promote("misfit", base_model=BASE)
    refused = httpx.post(f"{server.url}/admin/reload", timeout=60)
    assert refused.status_code == 409
    assert "misfit was refused, still serving good" in refused.json()["error"]["message"]
    status = httpx.get(f"{server.url}/v1/status").json()
    assert status["adapter_id"] == "good" and "misfit" in status["last_swap_error"]
    assert chat(server.url, FRANCE).json()["adapter_id"] == "good"


BAD_CHATS = [
    ("not json", 400, "malformed JSON"),
    ([1, 2], 400, "must be a JSON object"),
    ({"messages": []}, 400, "messages"),
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "last message must be"),
    ({"messages": FRANCE, "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": FRANCE, "max_tokens": 10**6}, 400, "max_tokens must be between 1 and"),
    ({"messages": FRANCE, "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hello " * 3000}]}, 400, "context window"),
    ({"messages": FRANCE, "conversation_id": "conv_nope"}, 404, "conv_nope"),
]


def test_bad_requests_get_4xx_naming_the_problem_and_store_nothing(
    server: ServerProcess,
) -> None:
    good = chat(server.url, FRANCE).json()
    store = store_of(server.home)
    user_id = store.get_message(good["id"]).reply_to_id
    before = store.counts()
    for body, status, text in BAD_CHATS:
        raw = body if isinstance(body, str) else json.dumps(body)
        reply = httpx.post(
            f"{server.url}/v1/chat/completions",
            content=raw,
            headers={"Content-Type": "application/json"},
            timeout=60,
        )
        assert reply.status_code == status, (body, reply.text)
        assert text in reply.json()["error"]["message"], (body, reply.text)
    bad_feedback = [
        ({"message_id": good["id"], "rating": 0}, 400, "rating"),
        ({"message_id": good["id"], "rating": 6}, 400, "rating"),
        ({"message_id": good["id"], "rating": "abc"}, 400, "rating"),
        ({"message_id": good["id"], "correction": "   "}, 400, "correction"),
        ({"message_id": user_id, "correction": "no"}, 400, "user message"),
        ({"message_id": "msg_nope", "rating": 3}, 404, "unknown message msg_nope"),
        ({"message_id": good["id"], "rating": 3, "stars": 5}, 400, "stars"),
        ({"rating": 3}, 400, "message_id: required"),
    ]
    for body, status, text in bad_feedback:
        reply = httpx.post(f"{server.url}/v1/feedback", json=body)
        assert reply.status_code == status, (body, reply.text)
        assert text in reply.json()["error"]["message"], (body, reply.text)
    assert store.counts() == before
    assert store.current_feedback(good["id"]) is None


def test_conversations_api_rename_and_forget(server: ServerProcess) -> None:
    first = chat(server.url, FRANCE).json()
    conv = first["conversation_id"]
    renamed = httpx.patch(f"{server.url}/v1/conversations/{conv}", json={"title": "Capitals"})
    assert renamed.json()["title"] == "Capitals"
    detail = httpx.get(f"{server.url}/v1/conversations/{conv}").json()
    assert [m["role"] for m in detail["messages"]] == ["user", "assistant"]
    assert httpx.delete(f"{server.url}/v1/conversations/{conv}").status_code == 200
    assert httpx.get(f"{server.url}/v1/conversations/{conv}").status_code == 410
    gone = httpx.post(f"{server.url}/v1/feedback", json={"message_id": first["id"], "rating": 5})
    assert gone.status_code == 404


def test_conversations_search_api(server: ServerProcess) -> None:
    """GET /v1/conversations?q=: the listing's shape plus a snippet; bad q is a 400 naming q."""
    url = f"{server.url}/v1/conversations"
    with store_of(server.home) as store:
        owls = store.create_conversation()
        store.add_message(owls.id, "user", "Where do barn owls nest?")
        store.add_message(
            owls.id, "assistant", "Barn owls nest in old barns.", finish_reason="stop"
        )
        herons = store.create_conversation(title="Herons")
        store.add_message(herons.id, "user", "Do herons eat fish?")
        gone = store.create_conversation(title="Owls, privately")
        store.add_message(gone.id, "user", "Owls are my secret.")
        store.forget_conversation(gone.id)
    answered = chat(server.url, [{"role": "user", "content": "Name one owl species."}]).json()

    reply = httpx.get(url, params={"q": "OWLS barn"})
    assert reply.status_code == 200, reply.text
    (hit,) = reply.json()["data"]
    listed = {c["id"]: c for c in httpx.get(url).json()["data"]}
    assert hit["id"] == owls.id
    assert {k: v for k, v in hit.items() if k not in ("snippet", "highlights")} == listed[owls.id]
    assert hit["snippet"] == "Barn owls nest in old barns."
    assert [hit["snippet"][a:b] for a, b in hit["highlights"]] == ["Barn", "owls", "barns"]

    # Newest first, paged like the listing; the forgotten one is never found.
    both = [c["id"] for c in httpx.get(url, params={"q": "owl"}).json()["data"]]
    assert both == [answered["conversation_id"], owls.id]
    paged = httpx.get(url, params={"q": "owl", "limit": 1, "offset": 1}).json()["data"]
    assert [c["id"] for c in paged] == [owls.id]
    assert httpx.get(url, params={"q": "secret"}).json()["data"] == []
    assert httpx.get(url, params={"q": "herons"}).json()["data"][0]["id"] == herons.id
    # Query syntax is text, never an error.
    for q in ['"', "owl OR", "NEAR(owl", "owl*", "-owl", "title:owl", "owl) AND (barn"]:
        assert httpx.get(url, params={"q": q}).status_code in (200, 400), q
    assert httpx.get(url, params={"q": '(owls) barn"'}).json()["data"][0]["id"] == owls.id

    for q, says in [
        ("", "no words"),
        ("   ", "no words"),
        ('" * ^', "no words"),
        ("x" * 201, "at most 200"),
    ]:
        bad = httpx.get(url, params={"q": q})
        assert bad.status_code == 400, (q, bad.text)
        error = bad.json()["error"]
        assert error["param"] == "q" and says in error["message"], (q, error)
    bad_limit = httpx.get(url, params={"q": "owl", "limit": 0})
    assert (bad_limit.status_code, bad_limit.json()["error"]["param"]) == (400, "limit")


def test_disconnect_stops_generation_and_keeps_the_partial_answer(server: ServerProcess) -> None:
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json={"messages": STORY, "stream": True, "max_tokens": 400, "temperature": 0},
        timeout=120,
    ) as response:
        message_id = response.headers["X-Whetstone-Message-Id"]
        events = sse_events(response)
        for _ in range(6):
            next(events)
    # 400 tokens take ~20 s here; a stopped generation frees the model at once.
    deadline = time.monotonic() + 10
    store = store_of(server.home)
    while store.get_message(message_id).finish_reason is None:
        assert time.monotonic() < deadline, "the partial answer was not stored"
        time.sleep(0.2)
    message = store.get_message(message_id)
    assert message.finish_reason == "cut_off" and message.content.strip()
    deadline = time.monotonic() + 3  # one decode step, not the ~20 s left of the answer
    while httpx.get(f"{server.url}/v1/status").json()["busy"]:
        assert time.monotonic() < deadline, "generation went on after the client left"
        time.sleep(0.1)
    assert "Paris" in chat(server.url, FRANCE).json()["choices"][0]["message"]["content"]


def test_a_locked_database_does_not_stall_other_requests(server: ServerProcess) -> None:
    """A training job holds the database for a moment now and then; the stored answer's
    writes wait for it off the event loop, so nothing else the server does waits."""
    import sqlite3

    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json={"messages": STORY, "stream": True, "max_tokens": 200, "temperature": 0},
        timeout=120,
    ) as response:
        message_id = response.headers["X-Whetstone-Message-Id"]
        events = sse_events(response)
        read = [next(events)]
        while not read[-1]["choices"][0]["delta"].get("content"):  # decoding has begun
            read.append(next(events))
        lock = sqlite3.connect(server.home / "whetstone.db", timeout=10)
        lock.execute("BEGIN IMMEDIATE")  # the write lock, held as a long write would hold it
        try:
            # The answer so far is flushed to the store once a second: those writes wait.
            locked_until = time.monotonic() + 3
            gaps = []
            while time.monotonic() < locked_until:
                before = time.monotonic()
                event = next(events, None)
                gaps.append(time.monotonic() - before)
                if event is None:
                    break
                read.append(event)
            asked = time.monotonic()
            health = httpx.get(f"{server.url}/health", timeout=30)
            waited = time.monotonic() - asked
        finally:
            lock.rollback()
            lock.close()
        assert health.status_code == 200
        assert waited < 1.0, f"/health waited {waited:.1f} s on the locked database"
        # Waiting on the lock, the server's busy timeout is 5 s; a token here takes ~0.1 s.
        assert max(gaps) < 4.0, f"the stream stalled {max(gaps):.1f} s on the locked database"
        read += list(events)
        text = "".join(
            (e["choices"][0]["delta"].get("content") or "") for e in read if e and e["choices"]
        )
    message = store_of(server.home).get_message(message_id)
    assert message.finish_reason == "length" and message.content == text


def test_a_full_queue_answers_503_with_retry_after(home_with_model: Path) -> None:
    server = ServerProcess(home_with_model, "--set", "server.max_queue=1").wait_ready()
    try:
        with httpx.stream(
            "POST",
            f"{server.url}/v1/chat/completions",
            json={"messages": STORY, "stream": True, "max_tokens": 400, "temperature": 0},
            timeout=120,
        ) as busy:
            events = sse_events(busy)
            next(events), next(events)
            waiting: dict = {}
            queued = threading.Thread(target=lambda: waiting.update(reply=chat(server.url, FRANCE)))
            queued.start()
            while httpx.get(f"{server.url}/v1/status").json()["queue_waiting"] < 1:
                time.sleep(0.05)
            rejected = chat(server.url, FRANCE)
            assert rejected.status_code == 503
            assert rejected.headers["Retry-After"] == "5"
            assert "busy" in rejected.json()["error"]["message"]
        queued.join(timeout=60)
        assert waiting["reply"].status_code == 200
    finally:
        server.stop()


def test_kill_9_mid_answer_keeps_the_partial_answer_marked_cut_off(home_with_model: Path) -> None:
    server = ServerProcess(home_with_model).wait_ready()
    try:
        with httpx.stream(
            "POST",
            f"{server.url}/v1/chat/completions",
            json={"messages": STORY, "stream": True, "max_tokens": 400, "temperature": 0},
            timeout=120,
        ) as response:
            message_id = response.headers["X-Whetstone-Message-Id"]
            store = store_of(home_with_model)
            # Kill once a flush has stored at least 3 words (on a loaded machine that takes
            # longer than on an idle one: wait for it, do not guess a time).
            deadline = time.monotonic() + 90
            for _ in sse_events(response):
                stored = store.get_message(message_id).content or ""
                if len(stored.split()) >= 3 or time.monotonic() > deadline:
                    break
            store.close()
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
    finally:
        server.stop()
    restarted = ServerProcess(home_with_model).wait_ready()
    try:
        message = store_of(home_with_model).get_message(message_id)
        assert message.finish_reason == "cut_off"
        assert len(message.content.split()) >= 3
        user = store_of(home_with_model).get_message(message.reply_to_id)
        assert user.content == STORY[0]["content"]
    finally:
        restarted.stop()


def test_sigterm_stops_the_worker_cleanly(home_with_model: Path) -> None:
    """What `systemctl stop` and the daemon send: the worker stops its generation thread,
    closes the store and forgets its address (uvicorn used to raise the signal again once it
    had stopped, and the process died before any of that)."""
    server = ServerProcess(home_with_model).wait_ready()
    try:
        answered = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=120,
        )
        assert answered.status_code == 200
        assert (home_with_model / "run" / "server.json").is_file()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0, server.output()
        assert "stopped: generation thread joined, store closed" in server.output()
        assert not (home_with_model / "run" / "server.json").exists()
    finally:
        server.stop()


def test_non_local_bind_requires_the_token(home_with_model: Path) -> None:
    refused = ServerProcess(home_with_model, "--host", "0.0.0.0")
    assert refused.proc.wait(timeout=60) == 2
    assert "no bearer token is set" in refused.output()
    refused.stop()

    token = run_cli("token", "--home", str(home_with_model)).stdout.strip()
    assert len(token) > 20
    assert (home_with_model / "token").stat().st_mode & 0o777 == 0o600
    server = ServerProcess(home_with_model, "--host", "0.0.0.0").wait_ready()
    try:
        assert chat(server.url, FRANCE).status_code == 401
        headers = {"Authorization": f"Bearer {token}"}
        ok = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": FRANCE, "max_tokens": 8},
            headers=headers,
            timeout=60,
        )
        assert ok.status_code == 200
        assert httpx.get(f"{server.url}/health").status_code == 200
        recorded = json.loads((home_with_model / "run" / "server.json").read_text())
        assert recorded["url"] == server.url and recorded["pid"] == server.proc.pid
    finally:
        server.stop()
    assert not (home_with_model / "run" / "server.json").exists()


def test_cli_finds_the_running_worker_and_promote_swaps_it(
    server: ServerProcess, prepared_model_dir: Path
) -> None:
    status = json.loads(run_cli("status", "--home", str(server.home), "--json").stdout)
    # A lone worker (`whetstone serve`, no daemon) is "serving"; the daemon says "running".
    assert status["run_state"] == "serving" and status["server"]["url"] == server.url
    assert status["daemon"] is None
    make_lora(server.home, "cli-cand", prepared_model_dir)
    promoted = run_cli("promote", "cli-cand", "--force", "--home", str(server.home))
    assert promoted.returncode == 0, promoted.stderr
    assert f"the API worker at {server.url} now serves it" in promoted.stdout
    assert httpx.get(f"{server.url}/v1/status").json()["adapter_id"] == "cli-cand"
    # Rolling back the first promotion returns to the base model, live.
    back = run_cli("rollback", "--home", str(server.home))
    assert back.returncode == 0, back.stderr
    assert "the base model" in back.stdout
    assert httpx.get(f"{server.url}/v1/status").json()["adapter_id"] is None


# ------------------------------------------------------------- candidates, promotion, training


def error_of(response: httpx.Response) -> str:
    return response.json()["error"]["message"]


def test_candidates_list_newest_first_with_decisions_and_reports(server: ServerProcess) -> None:
    from datetime import UTC, datetime

    from development.report import render
    from tests.test_report import full_report

    registry = Registry(server.home / "candidates")
    older = datetime(2026, 11, 20, 3, 0, tzinfo=UTC)
    newer = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)
    registry.create(
        make_meta("20261120-030000-aaaaaa", base_model=BASE, created_at=older), write_fake_adapter
    )
    judged = registry.create(
        make_meta("20261121-030000-bbbbbb", base_model=BASE, created_at=newer), write_fake_adapter
    )
    report = full_report() | {"candidate_id": judged.id}
    _, html_path = render(report, judged.path)
    store_of(server.home).record_evaluation(
        judged.id, decision="reject", rule="general_regression", report_path=str(html_path)
    )

    listing = httpx.get(f"{server.url}/v1/candidates")
    assert listing.status_code == 200, listing.text
    rows = listing.json()["data"]
    assert [r["id"] for r in rows] == ["20261121-030000-bbbbbb", "20261120-030000-aaaaaa"]
    assert rows[0]["decision"] == "reject" and rows[0]["rule"] == "general_regression"
    assert rows[1]["decision"] is None
    assert all(r["valid"] and not r["current"] for r in rows)
    # The same rows as `whetstone candidates --json` (which lists oldest first).
    cli_rows = json.loads(run_cli("candidates", "--home", str(server.home), "--json").stdout)
    assert cli_rows == rows[::-1]

    detail = httpx.get(f"{server.url}/v1/candidates/{judged.id}").json()
    assert detail["decision"] == "reject"
    assert "general-probe NLL rose 9.1%" in detail["report_markdown"]
    assert detail["report_html_path"] == str(html_path.absolute())
    assert detail["report_html_url"] == f"/v1/candidates/{judged.id}/report.html"
    page = httpx.get(f"{server.url}{detail['report_html_url']}")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert page.text == html_path.read_text()

    bare = httpx.get(f"{server.url}/v1/candidates/20261120-030000-aaaaaa").json()
    assert bare["report_markdown"] is None and bare["report_html_url"] is None
    assert bare["report_html_path"] is None
    no_page = httpx.get(f"{server.url}/v1/candidates/20261120-030000-aaaaaa/report.html")
    assert no_page.status_code == 404
    assert "20261120-030000-aaaaaa has no report yet" in error_of(no_page)

    # Reports planted as symlinks (to a file outside the home) are never read or served.
    secret = server.home.parent / "secret.txt"
    secret.write_text("not for the API")
    folder = Registry(server.home / "candidates").get("20261120-030000-aaaaaa").path
    for name in ("report.html", "report.md"):
        (folder / name).symlink_to(secret)
    planted = httpx.get(f"{server.url}/v1/candidates/20261120-030000-aaaaaa").json()
    assert planted["report_markdown"] is None and planted["report_html_url"] is None
    followed = httpx.get(f"{server.url}/v1/candidates/20261120-030000-aaaaaa/report.html")
    assert followed.status_code == 404 and "not for the API" not in followed.text

    for path in ("bad id!", "current"):
        bad = httpx.get(f"{server.url}/v1/candidates/{path}")
        assert bad.status_code == 400, bad.text
        assert f"invalid candidate id {path!r}" in error_of(bad)
    for suffix in ("", "/report.html"):
        unknown = httpx.get(f"{server.url}/v1/candidates/20991231-000000-abcdef{suffix}")
        assert unknown.status_code == 404, unknown.text
        assert "unknown candidate '20991231-000000-abcdef'" in error_of(unknown)


def test_promote_and_rollback_over_http_swap_what_serves(
    server: ServerProcess, prepared_model_dir: Path
) -> None:
    def serving() -> str | None:
        return httpx.get(f"{server.url}/health").json()["adapter_id"]

    def post(path: str, **kwargs) -> httpx.Response:
        return httpx.post(f"{server.url}{path}", timeout=120, **kwargs)

    nothing = post("/v1/rollback")
    assert nothing.status_code == 409
    assert "nothing to roll back" in error_of(nothing)

    make_lora(server.home, "api-a", prepared_model_dir, seed=1)
    make_lora(server.home, "api-b", prepared_model_dir, seed=2)

    refused = post("/v1/candidates/api-a/promote")
    assert refused.status_code == 409
    assert "api-a has not passed the gate: it has no evaluation yet" in error_of(refused)
    assert "force" in error_of(refused)
    assert serving() is None

    for body, field in (({"force": "maybe"}, "force"), ({"force": True, "now": 1}, "now")):
        bad = post("/v1/candidates/api-a/promote", json=body)
        assert bad.status_code == 400 and field in error_of(bad), bad.text
    assert post("/v1/candidates/no.such-one/promote", json={"force": True}).status_code == 404
    assert post("/v1/candidates/bad id!/promote", json={"force": True}).status_code == 400

    forced = post("/v1/candidates/api-a/promote", json={"force": True})
    assert forced.status_code == 200, forced.text
    assert forced.json() == {"current": "api-a", "previous": None, "serving": "api-a"}
    assert serving() == "api-a"

    # Rolling back the first promotion returns to the base model.
    back = post("/v1/rollback")
    assert back.status_code == 200, back.text
    assert back.json() == {"current": None, "previous": "api-a", "serving": None}
    assert serving() is None

    store_of(server.home).record_evaluation("api-b", decision="promote", rule="holdout_win")
    passed = post("/v1/candidates/api-b/promote")  # no body: force false, and it passed
    assert passed.status_code == 200, passed.text
    assert passed.json()["current"] == "api-b" and passed.json()["serving"] == "api-b"
    assert serving() == "api-b"

    back = post("/v1/rollback")
    assert back.json() == {"current": "api-a", "previous": "api-b", "serving": "api-a"}
    assert serving() == "api-a"
    rows = {r["id"]: r for r in httpx.get(f"{server.url}/v1/candidates").json()["data"]}
    assert rows["api-a"]["current"] and rows["api-b"]["previous"]

    # Registry-valid files that do not fit this model: the engine refuses them before
    # `current` moves, so nothing changes: api-a serves on and no promotion is recorded.
    registry = Registry(server.home / "candidates")
    registry.create(make_meta("misfit", base_model=BASE), write_fake_adapter)
    misfit = post("/v1/candidates/misfit/promote", json={"force": True})
    assert misfit.status_code == 409
    assert "misfit at" in error_of(misfit) and "does not load" in error_of(misfit)
    assert "nothing changed, still serving api-a" in error_of(misfit)
    assert serving() == "api-a"
    assert registry.current_id() == "api-a" and registry.previous_id() == "api-b"

    audit = [
        (p.action, p.candidate_id, p.forced, p.actor)
        for p in reversed(store_of(server.home).list_promotions())
    ]
    assert audit == [
        ("promote", "api-a", True, "api"),
        ("rollback", None, False, "api"),
        ("promote", "api-b", False, "api"),
        ("rollback", "api-a", False, "api"),
    ]


def _wait_for_run_end(home: Path, run_id: str, timeout: float = 120):
    from data.models import RUN_FINISHED

    store = store_of(home)
    try:
        deadline = time.monotonic() + timeout
        while (run := store.get_run(run_id)).status not in RUN_FINISHED:
            assert time.monotonic() < deadline, f"run {run_id} still {run.status}"
            time.sleep(0.3)
        return run
    finally:
        store.close()


def _gone_or_reaped(pid: int, timeout: float = 10) -> bool:
    """True once `pid` is neither running nor a zombie waiting for its parent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.2)
    return False


def test_train_over_http_runs_like_the_cli(server: ServerProcess) -> None:
    import subprocess
    import sys

    def post(body: object = None) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/train", json=body, timeout=60)

    unknown = post({"profile": "huge"})
    assert unknown.status_code == 400
    assert "unknown training profile 'huge'" in error_of(unknown)
    assert "quick_test" in error_of(unknown)
    for body, field in (
        ({"force": "maybe"}, "force"),
        ({"profile": "quick_test", "epochs": 3}, "epochs"),
    ):
        bad = post(body)
        assert bad.status_code == 400 and field in error_of(bad), bad.text
    assert store_of(server.home).list_runs() == []

    # No feedback at all: the run starts, and ends skipped with nothing to learn.
    started = post({"profile": "quick_test"})
    assert started.status_code == 202, started.text
    body = started.json()
    assert body["profile"] == "quick_test" and body["queued_with_daemon"] is False
    assert body["log"] == str(server.home / "logs" / f"{body['run_id']}.log")
    run = _wait_for_run_end(server.home, body["run_id"])
    assert run.status == "skipped" and "no feedback to learn from" in run.reason
    assert run.trigger == "manual" and Path(body["log"]).is_file()
    assert _gone_or_reaped(run.pid), "the finished training process was left a zombie"
    status = json.loads(run_cli("status", "--home", str(server.home), "--json").stdout)
    assert status["last_run"]["id"] == run.id and status["last_run"]["status"] == "skipped"

    # One run at a time: a live training process makes the next request 409.
    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "development.train"]
    )
    try:
        store = store_of(server.home)
        busy_run = store.create_run("quick_test", "manual")
        store.update_run(busy_run.id, status="running", pid=sleeper.pid)
        busy = post()  # no body: the default profile
        assert busy.status_code == 409, busy.text
        assert f"run {busy_run.id} is still training (pid {sleeper.pid})" in error_of(busy)
        store.update_run(busy_run.id, status="cancelled")
    finally:
        sleeper.kill()
        sleeper.wait()

    # With a daemon holding the home, the run is queued for its dispatcher, as by the CLI.
    from common.config import load_settings
    from common.run_state import HomeLock

    lock = HomeLock(load_settings(server.home))
    lock.acquire()  # this test process stands in for `whetstone up`
    try:
        queued = post({"profile": "quick_test", "force": True, "promote": False})
    finally:
        lock.release()
    assert queued.status_code == 202, queued.text
    assert queued.json()["queued_with_daemon"] is True
    run = store_of(server.home).get_run(queued.json()["run_id"])
    assert (run.status, run.pid, run.trigger) == ("queued", None, "manual")
    assert run.progress == {"stage": "queued", "args": ["--force", "--no-promote"]}
