"""The memory (issue 37): notes from corrections in the store (migration 0007), found for a
message by its content words, forgotten for good; given to the model by the API worker from
the next request on, never stored as turns nor trained on; its HTTP routes and CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import ConfigError, load_settings, set_in_config
from data.db import head_revision
from data.store import Store
from production.api.memory import with_notes
from tests.conftest import run_cli
from tests.test_store import _home_at, raw

MIN_SCORE = 0.5  # memory.min_score's default


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "whetstone.db"


@pytest.fixture
def store(db_path: Path):
    with Store(f"sqlite:///{db_path}") as opened:
        yield opened


def corrected(store: Store, question: str, wrong: str, right: str, adapter: str | None = None):
    conversation = store.create_conversation()
    store.add_message(conversation.id, "user", question)
    answer = store.add_message(
        conversation.id, "assistant", wrong, finish_reason="stop", adapter_id=adapter
    )
    store.add_feedback(answer.id, rating=1, correction=right)
    return conversation.id, answer.id


def found(store: Store, message: str) -> list[str]:
    return [hit.note.text for hit in store.relevant_notes(message, min_score=MIN_SCORE)]


def in_index(db_path: Path, word: str) -> list[tuple]:
    return raw(db_path, f"SELECT rowid FROM notes_fts WHERE notes_fts MATCH '{word}'")


def test_a_correction_becomes_a_note_and_its_edit_rewrites_it(store: Store) -> None:
    _, answer = corrected(store, "What is my cat's name?", "Felix.", "Mochi.", adapter="cand_1")
    (note,) = store.list_notes()
    assert (note.question, note.text, note.source_message_id) == (
        "What is my cat's name?",
        "Mochi.",
        answer,
    )
    assert (note.adapter_id, note.status) == ("cand_1", "active")
    store.add_feedback(answer, correction="Your cat is called Pixel.")
    (edited,) = store.list_notes()
    assert (edited.id, edited.text) == (note.id, "Your cat is called Pixel.")
    assert found(store, "What do I call my cat?") == ["Your cat is called Pixel."]
    # A new rating alone carries the correction over: the note stays as it is.
    store.add_feedback(answer, rating=2)
    assert [n.text for n in store.list_notes()] == ["Your cat is called Pixel."]


def test_a_note_is_found_by_its_subject_not_by_stopwords(store: Store) -> None:
    corrected(store, "What is my cat's name?", "Felix.", "Your cat's name is Mochi.")
    corrected(store, "Where do I work?", "At a bank.", "You work at Brightline Robotics.")
    store.add_note(
        "Your sister Anna was born on 14 March.", question="When is my sister's birthday?"
    )
    assert found(store, "What do I call my cat?") == ["Your cat's name is Mochi."]
    assert found(store, "Which company do I work for?") == ["You work at Brightline Robotics."]
    assert found(store, "On which day is my sister's birthday?") == [
        "Your sister Anna was born on 14 March."
    ]
    for unrelated in (
        "What is the capital of France?",
        "What is my favourite colour?",
        "Who wrote Romeo and Juliet?",
        "How many legs does a spider have?",
        "What do bees make?",
        "What is it?",
    ):
        assert found(store, unrelated) == [], unrelated


def test_forgetting_a_note_takes_its_text_out_of_the_file(store: Store, db_path: Path) -> None:
    note = store.add_note("Zanzibarcat is her name.", question="Who is Quokkalina?")
    assert in_index(db_path, "zanzibarcat")
    store.forget_note(note.id)
    store.forget_note(note.id)  # idempotent
    assert store.list_notes() == []
    assert found(store, "zanzibarcat quokkalina") == []
    assert in_index(db_path, "zanzibarcat") == in_index(db_path, "quokkalina") == []
    assert raw(db_path, "SELECT question, text, status FROM notes") == [(None, "", "forgotten")]
    store.close()
    for word in (b"anzibarcat", b"uokkalina"):
        assert word not in db_path.read_bytes()


def test_forgetting_a_corrections_note_keeps_the_correction(store: Store, db_path: Path) -> None:
    """The note goes; the correction stays feedback to train on (forgetting the conversation
    removes both)."""
    _, answer = corrected(store, "What is my cat's name?", "Felix.", "Zanzibarcat is her name.")
    (note,) = store.list_notes()
    store.forget_note(note.id)
    assert in_index(db_path, "zanzibarcat") == []
    assert store.current_feedback(answer).correction == "Zanzibarcat is her name."
    # A rating later carries the correction over without bringing the note back.
    store.add_feedback(answer, rating=2)
    assert store.list_notes() == []


def test_forgetting_the_conversation_forgets_its_notes(store: Store, db_path: Path) -> None:
    conversation, _ = corrected(store, "Quillfeather?", "No idea.", "Quillfeather is my horse.")
    store.add_note("Kept by hand.")
    store.forget_conversation(conversation)
    assert [n.text for n in store.list_notes()] == ["Kept by hand."]
    assert in_index(db_path, "quillfeather") == []
    store.close()
    assert b"uillfeather" not in db_path.read_bytes()


def test_bad_notes_are_refused_by_name(store: Store) -> None:
    from data.errors import InvalidInput

    for text, question, field in (("  ", None, "text"), (5, None, "text"), ("ok", 3, "question")):
        with pytest.raises(InvalidInput, match=f"^{field} "):
            store.add_note(text, question=question)  # type: ignore[arg-type]
    assert store.list_notes() == []


def test_a_home_at_0006_upgrades_and_keeps_its_corrections(tmp_path: Path) -> None:
    db_file = tmp_path / "old.db"
    connection = _home_at("0006", db_file)  # conv_1
    connection.executescript(
        "INSERT INTO messages (id, conversation_id, position, role, content, created_at) VALUES "
        "('msg_0', 'conv_1', 0, 'user', 'Where do I live?', '2026-01-01 00:00:00');"
        "INSERT INTO messages (id, conversation_id, position, role, content, reply_to_id, "
        "finish_reason, created_at) VALUES ('msg_1', 'conv_1', 1, 'assistant', 'Paris.', "
        "'msg_0', 'stop', '2026-01-01 00:00:00');"
        "INSERT INTO feedback (id, message_id, rating, correction, is_current, created_at) "
        "VALUES ('fb_1', 'msg_1', 1, 'You live in Utrecht.', 1, '2026-01-01 00:00:01');"
    )
    connection.commit()
    connection.close()
    with Store(f"sqlite:///{db_file}") as store:
        assert store.schema_revision == head_revision()
        conversation = store.get_conversation("conv_1")
        assert [m.content for m in conversation.messages] == ["Where do I live?", "Paris."]
        assert store.current_feedback("msg_1").correction == "You live in Utrecht."
        # Corrections stored before the memory existed make no note: only new teaching does.
        assert store.list_notes() == []
        store.add_feedback("msg_1", correction="You live in Utrecht, since 2020.")
        assert found(store, "Which city do I live in?") == ["You live in Utrecht, since 2020."]


def test_notes_join_the_prompt_in_the_formats_way() -> None:
    from types import SimpleNamespace

    from data.memory import NoteHit

    hit = NoteHit(SimpleNamespace(question="What is my cat's name?", text="Mochi."), 1.0, -1.0)
    bare = NoteHit(SimpleNamespace(question=None, text="I am vegetarian."), 1.0, -1.0)
    turns = [{"role": "user", "content": "What do I call my cat?"}]
    assert with_notes("plain", "Be brief.", turns, [hit]) == (
        "Be brief.",
        [
            {"role": "user", "content": "What is my cat's name?"},
            {"role": "assistant", "content": "Mochi."},
            *turns,
        ],
    )
    system, same = with_notes("plain", None, turns, [bare])
    assert system is None
    assert same == [
        {"role": "user", "content": "Remember: I am vegetarian.\n\nWhat do I call my cat?"}
    ]
    system, same = with_notes("harmony", "Be brief.", turns, [hit])
    assert same == turns
    assert system is not None and system.startswith("Be brief.\n\nRemember: ")
    assert "Mochi." in system
    assert with_notes("plain", None, turns, []) == (None, turns)


def test_the_cli_lists_and_forgets_notes(home: Path) -> None:
    with Store(f"sqlite:///{home / 'whetstone.db'}") as store:
        note = store.add_note("Mochi is the cat.", question="What is my cat's name?")
    listed = run_cli("memory", "list", "--home", str(home), "--json")
    assert listed.returncode == 0, listed.stderr
    assert [n["id"] for n in json.loads(listed.stdout)["data"]] == [note.id]
    assert json.loads(listed.stdout)["enabled"] is False
    forgot = run_cli("memory", "forget", note.id, "--home", str(home))
    assert forgot.returncode == 0, forgot.stderr
    assert f"forgot note {note.id}" in forgot.stdout
    again = run_cli("memory", "forget", "note_unknown", "--home", str(home))
    assert again.returncode == 1 and "unknown note note_unknown" in again.stderr
    bad = run_cli("memory", "forget", "--home", str(home))
    assert bad.returncode == 2 and "forget needs the note's ID" in bad.stderr
    with Store(f"sqlite:///{home / 'whetstone.db'}") as store:
        assert store.list_notes() == []


def test_memory_on_and_off_edit_the_config_and_keep_its_comments(home: Path) -> None:
    """`whetstone memory on|off` with no worker running: memory.enabled in config.toml,
    the person's comments and other keys kept; a WHETSTONE_ variable that would win over
    the file is refused by name and nothing is written."""
    config = home / "config.toml"
    config.write_text("# my settings\n[server]\nport = 9123  # not the default\n")
    on = run_cli("memory", "on", "--home", str(home))
    assert on.returncode == 0, on.stderr
    assert "memory on (memory.enabled = true in config.toml)" in on.stdout
    assert "# my settings" in config.read_text() and "port = 9123  # not the default" in (
        config.read_text()
    )
    listed = run_cli("memory", "list", "--home", str(home), "--json")
    assert json.loads(listed.stdout)["enabled"] is True
    off = run_cli("memory", "off", "--home", str(home), "--json")
    assert json.loads(off.stdout) == {"enabled": False}
    assert load_settings(home).memory.enabled is False and load_settings(home).server.port == 9123
    written = config.read_text()
    shadowed = run_cli(
        "memory", "on", "--home", str(home), env={"WHETSTONE_MEMORY__ENABLED": "false"}
    )
    assert shadowed.returncode == 1 and "WHETSTONE_MEMORY__ENABLED" in shadowed.stderr
    assert config.read_text() == written
    bad = run_cli("memory", "off", "x", "--home", str(home))
    assert bad.returncode == 2 and "off takes no ID" in bad.stderr


def test_a_value_the_config_refuses_leaves_the_file_as_it_was(home: Path) -> None:
    config = home / "config.toml"
    config.write_text("[memory]\nmax_notes = 2  # two\n")
    with pytest.raises(ConfigError, match="max_notes"):
        set_in_config(home, "memory.max_notes", 0)
    assert config.read_text() == "[memory]\nmax_notes = 2  # two\n"
    assert not [p for p in home.iterdir() if p.name.endswith(".tmp")]


def test_a_note_the_serving_adapter_learned_is_retired_and_a_rollback_restores_it(
    store: Store, db_path: Path
) -> None:
    conversation, _ = corrected(store, "What is my cat's name?", "Felix.", "Mochi.")
    corrected(store, "Which city do I live in?", "Paris.", "You live in Lyon.")
    cat, city = sorted(store.list_notes(), key=lambda n: n.text)
    # Night 1's candidate answered the cat's question right without the note, not the city's.
    store.record_note_checks("night-1", {cat.id: True, city.id: False})

    def given(serving: str | None, message: str) -> list[str]:
        hits = store.relevant_notes(message, min_score=MIN_SCORE, serving_adapter=serving)
        return [hit.note.text for hit in hits]

    # While night 1 serves, its learned note is no longer given; the other still is.
    assert given("night-1", "Tell me my cat's name.") == []
    assert given("night-1", "Which city do I live in?") == ["You live in Lyon."]
    assert store.learned_notes("night-1") == {cat.id}
    # Rolled back to the adapter before it (or the base): that one never learned it.
    assert given("night-0", "Tell me my cat's name.") == ["Mochi."]
    assert given(None, "Tell me my cat's name.") == ["Mochi."]
    # The next evaluation asks first what the champion has not learned, then what it has.
    assert [n.id for n in store.notes_to_check("night-1", 10)] == [city.id, cat.id]
    assert [n.id for n in store.notes_to_check("night-1", 1)] == [city.id]
    # A later check replaces the earlier: night 1 asked again and wrong, the note is back.
    store.record_note_checks("night-1", {cat.id: False})
    assert given("night-1", "Tell me my cat's name.") == ["Mochi."]
    # Forgetting the conversation deletes its note and the note's checks.
    store.forget_conversation(conversation)
    assert raw(db_path, f"SELECT count(*) FROM note_checks WHERE note_id = '{cat.id}'") == [(0,)]
    store.record_note_checks("night-2", {cat.id: True})  # a note deleted since: left out
    assert raw(db_path, "SELECT count(*) FROM note_checks") == [(1,)]


def test_the_cli_lists_a_note_as_learned_while_the_adapter_that_learned_it_serves(
    home: Path,
) -> None:
    from candidates import Registry
    from tests.test_cli import BASE
    from tests.test_registry import make_meta, write_fake_adapter

    registry = Registry(home / "candidates")
    for candidate in ("night-1", "night-2"):
        registry.create(make_meta(candidate, base_model=BASE), write_fake_adapter)
    with Store(f"sqlite:///{home / 'whetstone.db'}") as store:
        note = store.add_note("Mochi is the cat.", question="What is my cat's name?")
        store.record_note_checks("night-2", {note.id: True})

    def status() -> str:
        listed = run_cli("memory", "list", "--home", str(home), "--json")
        assert listed.returncode == 0, listed.stderr
        (only,) = json.loads(listed.stdout)["data"]
        return only["status"]

    assert status() == "active"  # the base serves
    for candidate in ("night-1", "night-2"):
        promoted = run_cli("promote", candidate, "--home", str(home), "--force")
        assert promoted.returncode == 0, promoted.stderr
    assert status() == "learned"
    assert run_cli("rollback", "--home", str(home)).returncode == 0
    assert status() == "active"


@pytest.mark.slow
def test_a_candidate_is_asked_the_notes_without_them_and_its_verdicts_kept(
    home_with_model: Path,
) -> None:
    """The evaluation's check on the real embedded model: a note whose question the model
    answers right without it (a general fact) is recorded as learned by the candidate; one it
    cannot know (the person's cat) is not; with the memory off nothing is asked."""
    from common.config import load_settings
    from development import modeling
    from development.evaluate import check_notes

    settings = load_settings(home_with_model, {"memory": {"enabled": True}})
    with Store(settings.db_url) as store:
        cat = store.add_note("Your cat is called Mochi.", question="What is my cat's name?")
        greece = store.add_note("Athens.", question="What is the capital of Greece?")
        model, tokenizer = modeling.load_base(settings, "cpu", for_training=False)
        off = load_settings(home_with_model)
        assert check_notes(model, tokenizer, off, store, "night-1", None) == {}
        assert store.learned_notes("night-1") == set()
        checked = check_notes(model, tokenizer, settings, store, "night-1", None)
        assert checked == {"checked": 2, "answered_right": 1}
        assert store.learned_notes("night-1") == {greece.id}
        assert cat.id not in store.learned_notes("night-1")


@pytest.mark.slow
def test_a_correction_is_answered_in_the_next_request_and_never_trained_as_a_note(
    tmp_path: Path, prepared_model_dir: Path
) -> None:
    """With memory.enabled, through the openai SDK against a real server on the embedded
    model: the person rates a wrong answer and then corrects it (the TUI's two requests); a
    new conversation asking the same in other words is answered with the correction, its
    note named in `memory_notes`; an unrelated question gets no note and its usual answer;
    the memory-assisted conversation is stored (and so trained on) without the note."""
    import httpx
    import openai

    from common.config import load_settings
    from data import exports
    from tests.conftest import ServerProcess, link_model

    home = link_model(tmp_path / "home", prepared_model_dir)
    (home / "config.toml").write_text("[memory]\nenabled = true\n")
    server = ServerProcess(home).wait_ready()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0)

        def ask(question: str) -> openai.types.chat.ChatCompletion:
            return client.chat.completions.create(
                model="whetstone",
                messages=[{"role": "user", "content": question}],
                temperature=0,
                max_tokens=24,
            )

        wrong = ask("What is my cat's name?")
        assert "mochi" not in wrong.choices[0].message.content.lower()
        assert wrong.model_extra["memory_notes"] == []
        for body in ({"rating": 1}, {"correction": "Your cat's name is Mochi."}):
            sent = httpx.post(f"{server.url}/v1/feedback", json={"message_id": wrong.id, **body})
            assert sent.status_code == 200, sent.text
        (note,) = httpx.get(f"{server.url}/v1/memory").json()["data"]
        # Bad notes are refused by name and add nothing.
        for body, named in (({"text": "  "}, "text"), ({"text": "x", "colour": "red"}, "colour")):
            refused = httpx.post(f"{server.url}/v1/memory", json=body)
            assert refused.status_code == 400, refused.text
            assert named in refused.json()["error"]["message"], refused.text
        assert len(httpx.get(f"{server.url}/v1/memory").json()["data"]) == 1

        helped = ask("Tell me the name of my cat.")
        assert "mochi" in helped.choices[0].message.content.lower(), helped
        assert helped.model_extra["memory_notes"] == [note["id"]]
        # The Responses API says so too, made and read back.
        response = client.responses.create(
            model="whetstone",
            input="Tell me the name of my cat.",
            temperature=0,
            max_output_tokens=24,
        )
        assert "mochi" in response.output_text.lower(), response
        assert response.model_extra["memory_notes"] == [note["id"]]
        again = client.responses.retrieve(response.id)
        assert again.model_extra["memory_notes"] == [note["id"]]
        # `memory: false` asks the adapter alone (what the benchmarks measure as learned).
        alone = client.chat.completions.create(
            model="whetstone",
            messages=[{"role": "user", "content": "Tell me the name of my cat."}],
            temperature=0,
            max_tokens=24,
            extra_body={"memory": False},
        )
        assert alone.model_extra["memory_notes"] == []
        assert "mochi" not in alone.choices[0].message.content.lower()
        unrelated = ask("What is the capital of France?")
        assert unrelated.model_extra["memory_notes"] == []
        assert "paris" in unrelated.choices[0].message.content.lower()

        # Off from the CLI while the worker runs: the worker follows from the next message.
        off = run_cli("memory", "off", "--home", str(home))
        assert off.returncode == 0 and "follows from the next message" in off.stdout, off
        assert "enabled = false" in (home / "config.toml").read_text()
        without = ask("Tell me the name of my cat.")
        assert "memory_notes" not in without.model_extra
        assert "mochi" not in without.choices[0].message.content.lower()
        assert httpx.get(f"{server.url}/v1/memory").json()["enabled"] is False
        refused = httpx.patch(f"{server.url}/v1/memory", json={"enabled": "yes"})
        assert refused.status_code == 400 and "enabled" in refused.text
        assert httpx.patch(f"{server.url}/v1/memory", json={"enabled": True}).json() == {
            "enabled": True
        }

        # Stored as asked: the note was in the prompt only. Rated, the answer is a training
        # row whose context is the person's one question.
        rated = httpx.post(f"{server.url}/v1/feedback", json={"message_id": helped.id, "rating": 5})
        assert rated.status_code == 200, rated.text
    finally:
        server.stop()
    with Store(load_settings(home).db_url) as store:
        items = {item.message_id: item for item in exports.feedback_items(store)}
    assert items[helped.id].context == [{"role": "user", "content": "Tell me the name of my cat."}]
