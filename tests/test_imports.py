"""`whetstone import`: ChatGPT's conversations.json, Open WebUI's chat export and OpenAI-format
JSONL (small files written from the formats' documentation, in tests/import_files/) into a
real store: what is kept (the branch seen last, times, sources), what becomes feedback (rated
and kept answers only), idempotence, refusals that store nothing, and where the imported
history goes (exports, a training run's rows) and where it does not (trend, watch)."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from common.config import load_settings
from data import imports, trend
from data.exports import feedback_items
from data.imports import ImportRefused, import_conversations, parse
from data.store import Store
from development.training_data import build
from tests.conftest import run_cli
from tests.test_training_data import base_answers, count_words

FILES = Path(__file__).with_name("import_files")
CHATGPT = FILES / "chatgpt_conversations.json"
OPENWEBUI = FILES / "openwebui_chats.json"
JSONL = FILES / "chats.jsonl"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path}/w.db")
    yield store
    store.close()


def imported(store: Store, path: Path, source: str | None = None) -> imports.ImportResult:
    return import_conversations(store, parse(path.read_bytes(), source))


def conversations(store: Store) -> dict[str, object]:
    """Every stored conversation with its messages, by title."""
    return {c.title: store.get_conversation(c.id) for c in store.list_conversations(limit=100)}


def said(conversation) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in conversation.messages]


def ratings(conversation) -> dict[str, tuple[int | None, str | None]]:
    return {
        m.content: (m.current_feedback.rating, m.current_feedback.comment)
        for m in conversation.messages
        if m.current_feedback is not None
    }


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def test_chatgpt_export_keeps_the_branch_seen_last_and_its_times(store: Store) -> None:
    result = imported(store, CHATGPT)
    assert result.as_dict() == {
        "source": "chatgpt",
        "conversations": 2,
        "messages": 8,
        "feedback": 1,
        "already_imported": 0,
    }
    found = conversations(store)
    sourdough = found["Sourdough starter"]
    # The hidden system message, the browsing step and its output are left out; the
    # person's custom instructions are the system prompt; an image's text part is kept.
    assert sourdough.system_prompt == "I bake on weekends.\n\nAnswer briefly."
    assert said(sourdough) == [
        ("user", "How often should I feed a sourdough starter?"),
        (
            "assistant",
            "Feed it once a day at room temperature, or once a week if it lives in the fridge.",
        ),
        ("user", "What does this bubble pattern mean?"),
        ("assistant", "Those are signs of an active starter."),
    ]
    assert (sourdough.source, sourdough.external_id) == (
        "chatgpt",
        "6630f0a0-0000-4000-8000-00000000000a",
    )
    assert sourdough.imported_at is not None
    assert sourdough.created_at == at(1714000000.0)
    assert sourdough.updated_at == at(1714000600.0)
    assert [m.created_at for m in sourdough.messages] == [
        at(1714000010.5),
        at(1714000030.0),
        at(1714000100.0),
        at(1714000110.0),
    ]
    first_answer = sourdough.messages[1]
    assert first_answer.reply_to_id == sourdough.messages[0].id
    assert first_answer.adapter_id is None and first_answer.finish_reason == "stop"
    assert first_answer.generation["imported"] == {"source": "chatgpt", "model": "gpt-4o"}
    assert ratings(sourdough) == {}  # nothing the person said about these answers

    # Regenerated once (the first answer is left), the next question edited (the first
    # version is left): the branch through current_node.
    lisbon = found["A day in Lisbon"]
    assert said(lisbon) == [
        ("user", "Plan a day in Lisbon."),
        (
            "assistant",
            "Begin in Alfama at sunrise, walk up to the castle, and end the day at a miradouro.",
        ),
        ("user", "Where should I eat dinner near Alfama?"),
        ("assistant", "Book a table at a fado house in Alfama."),
    ]
    # The answer kept after regenerating is an accepted answer; the last one is not.
    assert ratings(lisbon) == {
        lisbon.messages[1].content: (4, "imported: kept after regenerating it in ChatGPT")
    }
    # Both lists show the conversations by their own times, newest first.
    assert [c.title for c in store.list_conversations()] == [
        "A day in Lisbon",
        "Sourdough starter",
    ]


def test_the_export_zip_is_read_as_its_conversations_json(store: Store, tmp_path: Path) -> None:
    archive = tmp_path / "export.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("chat.html", "<html></html>")
        z.writestr("conversations.json", CHATGPT.read_text())
    assert imported(store, archive).conversations == 2


def test_open_webui_ratings_become_feedback(store: Store) -> None:
    result = imported(store, OPENWEBUI)
    assert (result.source, result.conversations, result.messages, result.feedback) == (
        "openwebui",
        2,
        7,
        3,
    )
    found = conversations(store)
    lists = found["Reversing a list"]
    assert lists.system_prompt == "You are a concise assistant."
    assert said(lists) == [
        ("user", "How do I reverse a list in Python?"),
        ("assistant", "Use reversed()."),  # rated, beside the branch: an earlier answer
        (
            "assistant",
            "Use my_list.reverse() to reverse it in place, or my_list[::-1] for a reversed copy.",
        ),
        ("user", "And how do I sort it in descending order?"),
        ("assistant", "Use my_list.sort(reverse=True)."),
    ]
    # Both answers reply to the question: a regenerated pair, the branch's answer latest.
    question, down, up = lists.messages[:3]
    assert down.reply_to_id == up.reply_to_id == question.id
    assert ratings(lists) == {
        "Use reversed().": (1, "Not helpful: too short to use"),
        up.content: (5, "clear"),
    }
    # The reasoning block is the answer's reasoning, not its text.
    assert lists.messages[4].reasoning == "The person wants the largest first."
    assert lists.messages[4].generation["imported"]["model"] == "llama3.1:8b"
    assert lists.created_at == at(1715000000) and lists.updated_at == at(1715000500)

    tea = found["Morning tea"]  # an older export: the messages list, no tree
    assert ratings(tea) == {"Black tea: it has more caffeine than green.": (5, None)}


def test_jsonl_answers_are_kept_unless_weighted_zero(store: Store) -> None:
    result = imported(store, JSONL)
    assert (result.source, result.conversations, result.messages, result.feedback) == (
        "jsonl",
        3,
        10,
        4,
    )
    found = conversations(store)
    japan = found["Capital of Japan?"]
    assert japan.system_prompt == "You are terse."
    assert ratings(japan) == {"Tokyo.": (4, "imported: an answer of a chat file (OpenAI format)")}
    assert japan.external_id.startswith("sha256:")
    # "weight": 0 is context only.
    assert set(ratings(found["Hi"])) == {"7"}
    oslo = found["Weather in Oslo?"]
    call, tool, answer = oslo.messages[1:]
    assert call.tool_calls[0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "Oslo"}',
    }
    assert call.finish_reason == "tool_calls" and tool.tool_call_id == "call_1"
    assert answer.reply_to_id == tool.id
    assert answer.generation["tools"][0]["function"]["name"] == "get_weather"


def test_importing_the_same_files_again_adds_nothing(store: Store) -> None:
    for path in (CHATGPT, OPENWEBUI, JSONL):
        imported(store, path)
    before = store.counts()
    for path in (CHATGPT, OPENWEBUI, JSONL):
        again = imported(store, path)
        assert (again.conversations, again.messages, again.feedback) == (0, 0, 0)
        assert again.already_imported == len(parse(path.read_bytes()))
    assert store.counts() == before
    # A conversation forgotten since stays forgotten.
    lisbon = next(c for c in store.list_conversations() if c.title == "A day in Lisbon")
    store.forget_conversation(lisbon.id)
    assert imported(store, CHATGPT).conversations == 0
    assert "A day in Lisbon" not in conversations(store)


@pytest.mark.parametrize(
    ("name", "broken", "source", "named"),
    [
        (
            "conversations.json",
            lambda d: d[1]["mapping"]["a1y-b"].update(parent="gone"),
            None,
            "conversation 1 (id 6630f0a0-0000-4000-8000-00000000000b, 'A day in Lisbon'): "
            "node gone is named but not in the tree",
        ),
        (
            "conversations.json",
            lambda d: d[0]["mapping"]["u1-a"]["message"].pop("author"),
            None,
            "node u1-a: the message has no author.role",
        ),
        (
            "openwebui.json",
            lambda d: d[0]["chat"]["history"]["messages"]["m2b"]["annotation"].update(rating=7),
            None,
            "message m2b: annotation.rating must be 1 (thumbs up) or -1 (down); got 7",
        ),
        (
            "chats.jsonl",
            lambda lines: lines.insert(1, '{"messages": [{"role": "user", "content": "x"}, '),
            "jsonl",
            "line 2: not JSON",
        ),
        (
            "chats.jsonl",
            lambda lines: lines.append(
                json.dumps({"messages": [{"role": "tool", "tool_call_id": "c9", "content": "{}"}]})
            ),
            "jsonl",
            "line 5: messages[0]: tool_call_id 'c9' answers no tool call",
        ),
    ],
)
def test_a_broken_file_is_refused_naming_the_entry_and_stores_nothing(
    store: Store, tmp_path: Path, name: str, broken, source: str | None, named: str
) -> None:
    if name.endswith(".jsonl"):
        lines = JSONL.read_text().splitlines()
        broken(lines)
        data = "\n".join(lines).encode()
    else:
        document = json.loads((CHATGPT if name == "conversations.json" else OPENWEBUI).read_text())
        broken(document)
        data = json.dumps(document).encode()
    with pytest.raises(ImportRefused) as refused:
        parse(data, source)
    assert named in str(refused.value)
    assert store.counts()["conversations"] == 0

    path = tmp_path / name
    path.write_bytes(data)
    home = tmp_path / "home"
    cli = run_cli("import", str(path), "--home", str(home))
    assert cli.returncode == 1 and named in " ".join(cli.stderr.split()), cli.stderr
    assert "nothing was imported" in cli.stderr
    with Store(f"sqlite:///{home}/whetstone.db") as after:
        assert after.counts()["conversations"] == 0


def test_one_transaction_a_failure_half_way_stores_nothing(store: Store) -> None:
    conversations_ = parse(CHATGPT.read_bytes())
    # The second conversation's time cannot be stored (the store takes only aware times):
    # the first, written before it in the same transaction, is rolled back with it.
    conversations_[1].created_at = datetime(2024, 4, 26)
    with pytest.raises(Exception, match="naive datetime"):
        import_conversations(store, conversations_)
    assert store.counts()["conversations"] == 0 and store.counts()["messages"] == 0


def test_unknown_files_and_formats_are_named(tmp_path: Path) -> None:
    refusals = {
        b'{"hello": 1}': "neither ChatGPT's conversations.json",
        b"[]": "holds no conversations",
        b"\xff\xfe": "not UTF-8",
        b"not json at all": "the file is not JSON",
        b'{"prompt": [], "chosen": [], "rejected": []}\n': "preference rows",
    }
    for data, named in refusals.items():
        with pytest.raises(ImportRefused, match=named):
            parse(data)
    with pytest.raises(ImportRefused, match="unknown format 'csv'"):
        parse(b"[]", "csv")
    # The format named wins over what the file looks like.
    with pytest.raises(ImportRefused, match="'mapping' must be"):
        parse(OPENWEBUI.read_bytes(), "chatgpt")


def test_imported_feedback_is_exported_and_in_a_training_runs_rows(
    store: Store, tmp_path: Path
) -> None:
    for path in (CHATGPT, OPENWEBUI, JSONL):
        imported(store, path)
    items = feedback_items(store)
    targets = {item.answer for item in items}
    # Rated and kept answers only; the answers nobody said anything about are context.
    assert "Those are signs of an active starter." not in targets
    assert "Book a table at a fado house in Alfama." not in targets
    assert "Hello! How can I help?" not in targets
    assert {"Tokyo.", "7", "Use reversed()."} <= targets

    settings = load_settings(tmp_path / "home", {"training": {"holdout_fraction": 0.2}})
    data = build(items, settings, base_answers(), count_words)
    ids = data.snapshot()["message_ids"]
    placed = set(ids["train"]) | set(ids["validation"]) | set(ids["holdout"])
    assert placed == {item.message_id for item in items}
    sft = json.dumps(data.sft)
    for item in data.split.train:
        if item.rating >= 4:
            assert json.dumps(item.answer)[1:-1] in sft, item.answer
    if any(item.rating == 1 for item in data.split.train):
        assert any(row["label"] is False for row in data.kto)

    home = tmp_path / "exported"
    out = tmp_path / "export"
    run_cli("import", str(OPENWEBUI), "--home", str(home))
    assert run_cli("import", str(JSONL), "--home", str(home)).returncode == 0
    exported = run_cli("export", "--home", str(home), "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    rows = {kind: (out / f"{kind}.jsonl").read_text() for kind in ("sft", "dpo", "kto", "tools")}
    assert "Tokyo." in rows["sft"] and "my_list[::-1]" in rows["sft"]
    # The thumbs up and the thumbs down on two answers to one question: a preference pair.
    (pair,) = [json.loads(line) for line in rows["dpo"].splitlines()]
    assert pair["chosen"][0]["content"].startswith("Use my_list.reverse()")
    assert pair["rejected"][0]["content"] == "Use reversed()."
    assert '"label": false' in rows["kto"]
    assert "get_weather" in rows["tools"] and "Weather in Oslo?" not in rows["sft"]


def test_imported_history_is_no_adapters_days_or_ratings(store: Store) -> None:
    imported(store, OPENWEBUI)
    # The answers are another model's: not the base model's ratings (the watch compares
    # those) and not a day of the trend.
    assert store.adapter_ratings(None) == []
    found = trend.trend(store, weeks=520, now=datetime(2024, 6, 1, tzinfo=UTC))
    assert found.days == [] and found.conversations == []


def test_the_cli_imports_and_says_what_it_did(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = run_cli("import", str(CHATGPT), "--home", str(home), "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {
        "source": "chatgpt",
        "conversations": 2,
        "messages": 8,
        "feedback": 1,
        "already_imported": 0,
    }
    again = run_cli("import", str(CHATGPT), "--home", str(home))
    assert again.returncode == 0, again.stderr
    assert "imported 0 conversations" in again.stdout
    assert "2 conversations were imported before" in again.stdout
    missing = run_cli("import", str(tmp_path / "nope.json"), "--home", str(home))
    assert missing.returncode == 1 and "cannot read" in missing.stderr
