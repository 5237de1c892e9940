"""The store on real SQLite files: migrations, conversations, feedback, forget, concurrency."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from data.db import head_revision, make_engine, migrate, schema_version
from data.errors import FeedbackError, Gone, InvalidInput, NotFound, SchemaTooNewError
from data.models import Base, Message, include_name, new_id
from data.splits import spread_placement
from data.store import Store

REPO = Path(__file__).resolve().parent.parent
TABLES = {
    "conversations",
    "messages",
    "feedback",
    "training_runs",
    "candidates",
    "evaluations",
    "promotions",
}


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "whetstone.db"  # the parent folder does not exist yet


@pytest.fixture
def store(db_path: Path):
    with Store(f"sqlite:///{db_path}") as opened:
        yield opened


def raw(db_path: Path, sql: str, *params: object) -> list[tuple]:
    """Query the file with the plain sqlite3 module, outside SQLAlchemy."""
    connection = sqlite3.connect(db_path)
    try:
        return connection.execute(sql, params).fetchall()
    finally:
        connection.close()


def table_dump(db_path: Path) -> dict[str, list[tuple]]:
    return {table: sorted(raw(db_path, f"SELECT * FROM {table}")) for table in sorted(TABLES)}


def answered(store: Store, question: str = "What is 2+2?", answer: str = "4") -> Message:
    conversation = store.create_conversation()
    store.add_message(conversation.id, "user", question)
    return store.add_message(conversation.id, "assistant", answer, finish_reason="stop")


# --- migrations -------------------------------------------------------------------------


def test_migration_creates_schema_in_wal_mode(store: Store, db_path: Path) -> None:
    names = {row[0] for row in raw(db_path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert names >= TABLES | {"alembic_version"}
    assert raw(db_path, "PRAGMA journal_mode") == [("wal",)]
    assert store.schema_revision == "0009" == head_revision()
    assert schema_version(store.engine) == "0009"
    assert raw(db_path, "SELECT version_num FROM alembic_version") == [("0009",)]


def test_engine_pragmas(db_path: Path) -> None:
    engine = make_engine(f"sqlite:///{db_path}", busy_timeout_ms=1234)
    try:
        with engine.connect() as connection:

            def pragma(name: str) -> object:
                return connection.exec_driver_sql(f"PRAGMA {name}").scalar()

            assert pragma("journal_mode") == "wal"
            assert pragma("busy_timeout") == 1234
            assert pragma("foreign_keys") == 1
            assert pragma("synchronous") == 1  # NORMAL
        assert schema_version(engine) is None
    finally:
        engine.dispose()


def test_migrate_is_idempotent_on_reopen(db_path: Path) -> None:
    url = f"sqlite:///{db_path}"
    with Store(url) as first:
        conversation = first.create_conversation(title="kept")
    with Store(url) as second:
        assert second.schema_revision == "0009"
        assert migrate(second.engine) == "0009"
        assert second.get_conversation(conversation.id).title == "kept"
    assert raw(db_path, "SELECT count(*) FROM alembic_version") == [(1,)]


def test_newer_schema_is_refused_and_left_untouched(db_path: Path) -> None:
    url = f"sqlite:///{db_path}"
    with Store(url) as store:
        store.create_conversation(title="from the future")
    connection = sqlite3.connect(db_path)
    connection.execute("UPDATE alembic_version SET version_num = '0042_from_the_future'")
    connection.commit()
    connection.close()
    before = table_dump(db_path)
    digest = hashlib.sha256(db_path.read_bytes()).hexdigest()

    for opener in (lambda: Store(url), lambda: Store(url, migrate=False)):
        with pytest.raises(SchemaTooNewError) as error:
            opener()
        message = str(error.value)
        assert "0042_from_the_future" in message
        assert "0009" in message
        assert "upgrade whetstone" in message

    assert raw(db_path, "SELECT version_num FROM alembic_version") == [("0042_from_the_future",)]
    assert table_dump(db_path) == before
    assert hashlib.sha256(db_path.read_bytes()).hexdigest() == digest


def test_orm_metadata_matches_migration(store: Store) -> None:
    with store.engine.connect() as connection:
        # The full-text index tables (FTS5, made by 0005) are not the ORM's.
        opts = {"compare_type": True, "include_name": include_name}
        context = MigrationContext.configure(connection, opts=opts)
        assert compare_metadata(context, Base.metadata) == []


def test_alembic_cli_with_shipped_ini(tmp_path: Path) -> None:
    db_file = tmp_path / "cli" / "w.db"
    ini = str(REPO / "data" / "alembic.ini")
    command = [sys.executable, "-m", "alembic", "-c", ini, "-x", f"url=sqlite:///{db_file}"]
    result = subprocess.run(
        [*command, "upgrade", "head"],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # the ini must work from any folder
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert raw(db_file, "SELECT version_num FROM alembic_version") == [("0009",)]


def _upgrade(db_file: Path, revision: str) -> None:
    """Migrate the store only up to `revision`, by the shipped Alembic CLI."""
    ini = str(REPO / "data" / "alembic.ini")
    command = [sys.executable, "-m", "alembic", "-c", ini, "-x", f"url=sqlite:///{db_file}"]
    old = subprocess.run(
        [*command, "upgrade", revision],
        capture_output=True,
        text=True,
        cwd=db_file.parent,
        timeout=60,
    )
    assert old.returncode == 0, old.stderr


def _home_at(revision: str, db_file: Path) -> sqlite3.Connection:
    """A store migrated only up to `revision` by the shipped Alembic CLI, holding one
    conversation (conv_1); the open connection writes what that schema had."""
    _upgrade(db_file, revision)
    connection = sqlite3.connect(db_file)
    connection.execute(
        "INSERT INTO conversations (id, title, created_at, updated_at) "
        "VALUES ('conv_1', 'old', '2026-01-01 00:00:00', '2026-01-01 00:00:00')"
    )
    return connection


def test_upgrade_from_0001_keeps_every_message_and_takes_tool_turns(tmp_path: Path) -> None:
    """A home made before tool calls (0001) opens under the newest schema with nothing lost."""
    db_file = tmp_path / "old.db"
    connection = _home_at("0001", db_file)
    for position, (role, reply) in enumerate([("user", None), ("assistant", "msg_0")]):
        connection.execute(
            "INSERT INTO messages (id, conversation_id, position, role, content, reply_to_id, "
            "finish_reason, created_at) VALUES (?, 'conv_1', ?, ?, ?, ?, ?, "
            "'2026-01-01 00:00:00')",
            (f"msg_{position}", position, role, f"{role} said", reply, "stop" if reply else None),
        )
    connection.commit()
    connection.close()

    with Store(f"sqlite:///{db_file}") as store:
        assert store.schema_revision == "0009"
        conversation = store.get_conversation("conv_1")
        assert [(m.role, m.content) for m in conversation.messages] == [
            ("user", "user said"),
            ("assistant", "assistant said"),
        ]
        call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        asked = store.add_message(
            "conv_1", "assistant", "", finish_reason="tool_calls", tool_calls=[call]
        )
        result = store.add_message("conv_1", "tool", "42", tool_call_id="call_1")
        answer = store.add_message(
            "conv_1", "assistant", "It is 42.", reply_to_id=result.id, finish_reason="stop"
        )
        stored = store.get_conversation("conv_1").messages
        assert stored[2].tool_calls == [call] and stored[2].id == asked.id
        assert stored[3].role == "tool" and stored[3].tool_call_id == "call_1"
        assert stored[4].reply_to_id == answer.reply_to_id == result.id
        with pytest.raises(InvalidInput, match="tool_calls"):
            store.add_message(
                "conv_1", "assistant", "", tool_calls=["not a call"], finish_reason="stop"
            )


def test_upgrade_to_0003_keeps_every_answer_in_the_split_it_had(tmp_path: Path) -> None:
    """Answers rated before placements were stored keep the hash placement they had: an
    answer moving from training into the holdout would let the gate judge on training data.
    New feedback after the upgrade is placed by the store."""
    db_file = tmp_path / "old.db"
    connection = _home_at("0002", db_file)
    turns = [
        ("msg_user", "user", None),
        ("msg_0123456789abcdef", "assistant", "msg_user"),
        ("msg_unrated", "assistant", "msg_user"),
    ]
    for position, (message_id, role, reply) in enumerate(turns):
        connection.execute(
            "INSERT INTO messages (id, conversation_id, position, role, content, reply_to_id, "
            "finish_reason, created_at) VALUES (?, 'conv_1', ?, ?, 'said', ?, ?, "
            "'2026-01-01 00:00:00')",
            (message_id, position, role, reply, "stop" if reply else None),
        )
    for number, is_current in ((1, 0), (2, 1)):  # an old row and the current one
        connection.execute(
            "INSERT INTO feedback (id, message_id, rating, is_current, created_at) "
            "VALUES (?, 'msg_0123456789abcdef', ?, ?, '2026-01-01 00:00:00')",
            (f"fb_{number}", number, is_current),
        )
    connection.commit()
    connection.close()

    url = f"sqlite:///{db_file}"
    _upgrade(db_file, "0003")
    rows = raw(db_file, "SELECT id, placement FROM messages WHERE role = 'assistant'")
    # Pinned: sha256 of "whetstone-split:<id>", the placement 0002 computed on every read.
    assert dict(rows)["msg_0123456789abcdef"] == pytest.approx(0.5115599720317932, abs=1e-15)
    assert dict(rows)["msg_unrated"] is None

    with Store(url) as store:
        assert store.schema_revision == "0009"
        # No run used it: 0004 places it as the first low rating of the home.
        assert store.get_message("msg_0123456789abcdef").placement == spread_placement(0)
        store.add_feedback("msg_unrated", rating=1)
        # The home's second answer rated low: the migrated one (rated 2) counts as the first.
        assert store.get_message("msg_unrated").placement == spread_placement(1)


# --- conversations and messages ---------------------------------------------------------


def test_new_id_format() -> None:
    made = new_id("conv")
    assert made.startswith("conv_") and len(made) == len("conv_") + 16
    int(made.removeprefix("conv_"), 16)
    assert new_id("conv") != made


def test_conversation_and_message_round_trip(store: Store) -> None:
    conversation = store.create_conversation(
        system_prompt="Be terse.", reasoning_effort="low", title="Math"
    )
    assert conversation.id.startswith("conv_")
    assert conversation.created_at.tzinfo is UTC
    user = store.add_message(conversation.id, "user", "What is 2+2?")
    draft = store.add_message(conversation.id, "assistant", "", adapter_id="cand-1")
    assert draft.completed_at is None and draft.reply_to_id == user.id
    done = store.complete_message(
        draft.id,
        content="4",
        finish_reason="stop",
        reasoning="Simple addition.",
        prompt_tokens=12,
        completion_tokens=1,
        latency_ms=80.5,
        ttft_ms=20.0,
        generation={"temperature": 0.7, "top_p": 0.9},
        base_model="smollm2",
    )
    assert done.completed_at is not None and done.completed_at.tzinfo is UTC
    user2 = store.add_message(conversation.id, "user", "And 3+3?")
    regen = store.add_message(
        conversation.id, "assistant", "6", reply_to_id=user2.id, finish_reason="stop"
    )
    again = store.add_message(
        conversation.id, "assistant", "Six", reply_to_id=user2.id, finish_reason="stop"
    )

    loaded = store.get_conversation(conversation.id)
    assert (loaded.system_prompt, loaded.reasoning_effort, loaded.title) == (
        "Be terse.",
        "low",
        "Math",
    )
    assert [(m.position, m.role, m.content) for m in loaded.messages] == [
        (0, "user", "What is 2+2?"),
        (1, "assistant", "4"),
        (2, "user", "And 3+3?"),
        (3, "assistant", "6"),
        (4, "assistant", "Six"),
    ]
    assert regen.reply_to_id == again.reply_to_id == user2.id
    assert all(m.current_feedback is None for m in loaded.messages)
    answer = store.get_message(done.id)
    assert answer.reasoning == "Simple addition."
    assert answer.generation == {"temperature": 0.7, "top_p": 0.9}
    assert (answer.prompt_tokens, answer.completion_tokens) == (12, 1)
    assert (answer.latency_ms, answer.ttft_ms, answer.adapter_id) == (80.5, 20.0, "cand-1")
    assert loaded.updated_at >= loaded.created_at

    listed = store.list_conversations()
    assert [(c.id, c.message_count) for c in listed] == [(conversation.id, 5)]


def test_list_rename_update(store: Store) -> None:
    older = store.create_conversation(title="older")
    newer = store.create_conversation(title="newer")
    assert [c.id for c in store.list_conversations()] == [newer.id, older.id]
    store.add_message(older.id, "user", "bump")
    assert [c.id for c in store.list_conversations()] == [older.id, newer.id]
    assert [c.id for c in store.list_conversations(limit=1, offset=1)] == [newer.id]

    assert store.rename_conversation(newer.id, "  renamed ").title == "renamed"
    updated = store.update_conversation(newer.id, reasoning_effort="high")
    assert (updated.system_prompt, updated.reasoning_effort) == (None, "high")
    updated = store.update_conversation(newer.id, system_prompt="x", reasoning_effort=None)
    assert (updated.system_prompt, updated.reasoning_effort) == ("x", None)


def test_bad_message_input_is_named(store: Store) -> None:
    conversation = store.create_conversation()
    user = store.add_message(conversation.id, "user", "hi")
    cases = [
        (lambda: store.add_message(conversation.id, "bot", "x"), "role"),
        (lambda: store.add_message(conversation.id, "user", None), "content"),
        (lambda: store.add_message(conversation.id, "user", "x", colour=1), "colour"),
        (
            lambda: store.add_message(conversation.id, "assistant", "x", finish_reason="done"),
            "finish_reason",
        ),
        (
            lambda: store.add_message(
                conversation.id, "assistant", "x", generation={"reasoning_effort": "max"}
            ),
            "reasoning_effort",
        ),
        (lambda: store.create_conversation(reasoning_effort="extreme"), "reasoning_effort"),
        (lambda: store.add_message(conversation.id, "assistant", "x", reply_to_id="nope"), "nope"),
        (lambda: store.add_message(conversation.id, "user", "x", reply_to_id=user.id), "reply"),
        (lambda: store.add_message(conversation.id, "assistant", "x", prompt_tokens=-1), "tokens"),
    ]
    for call, named in cases:
        with pytest.raises(InvalidInput, match=named):
            call()
    with pytest.raises(NotFound, match="conv_missing"):
        store.add_message("conv_missing", "user", "x")
    with pytest.raises(NotFound, match="msg_missing"):
        store.get_message("msg_missing")
    assert store.get_conversation(conversation.id).message_count == 1


# --- feedback ---------------------------------------------------------------------------


def test_feedback_validation_names_the_problem_and_changes_nothing(
    store: Store, db_path: Path
) -> None:
    answer = answered(store)
    store.add_feedback(answer.id, rating=3, comment="meh")
    user = store.get_conversation(answer.conversation_id).messages[0]
    forgotten = answered(store, "secret question", "secret answer")
    store.forget_conversation(forgotten.conversation_id)
    before = table_dump(db_path)

    cases = [
        ({"rating": 0}, answer.id, "rating must be a whole number from 1 to 5; got 0"),
        ({"rating": 6}, answer.id, "got 6"),
        ({"rating": 4.5}, answer.id, r"got 4\.5 \(float\)"),
        ({"rating": True}, answer.id, r"got True \(bool\)"),
        ({"rating": "abc"}, answer.id, r"got 'abc' \(str\)"),
        ({"correction": ""}, answer.id, "correction is empty"),
        ({"correction": "  \n\t"}, answer.id, "correction is empty"),
        ({}, answer.id, "no feedback given"),
        ({"rating": 5}, "msg_x", "unknown message msg_x"),
        ({"rating": 5}, user.id, f"apply to assistant answers; {user.id} is a user message"),
        ({"correction": "better"}, user.id, "is a user message"),
        ({"rating": 5}, forgotten.id, f"unknown message {forgotten.id}.*forgotten"),
    ]
    for kwargs, message_id, named in cases:
        with pytest.raises(FeedbackError, match=named) as error:
            store.add_feedback(message_id, **kwargs)
        assert isinstance(error.value, ValueError)
    assert table_dump(db_path) == before
    current = store.current_feedback(answer.id)
    assert (current.rating, current.comment) == (3, "meh")


def test_feedback_merges_and_keeps_history(store: Store) -> None:
    answer = answered(store)
    assert store.current_feedback(answer.id) is None
    first = store.add_feedback(answer.id, rating=4)
    assert first.id.startswith("fb_") and first.is_current
    second = store.add_feedback(answer.id, correction="Four.")
    assert (second.rating, second.correction, second.comment) == (4, "Four.", None)
    third = store.add_feedback(answer.id, rating=2, comment="too short")
    assert (third.rating, third.correction, third.comment) == (2, "Four.", "too short")

    current = store.current_feedback(answer.id)
    assert current.id == third.id
    history = store.feedback_history(answer.id)
    assert [(f.rating, f.correction, f.is_current) for f in history] == [
        (4, None, False),
        (4, "Four.", False),
        (2, "Four.", True),
    ]
    assert store.get_message(answer.id).current_feedback.id == third.id
    assert store.counts()["feedback"] == 1


def test_database_allows_one_current_feedback_per_message(store: Store, db_path: Path) -> None:
    answer = answered(store)
    store.add_feedback(answer.id, rating=4)
    connection = sqlite3.connect(db_path)
    try:
        with pytest.raises(sqlite3.IntegrityError):
            connection.execute(
                "INSERT INTO feedback (id, message_id, rating, is_current, created_at) "
                "VALUES ('fb_dup', ?, 5, 1, '2026-01-01 00:00:00')",
                (answer.id,),
            )
        with pytest.raises(sqlite3.IntegrityError):
            connection.execute(
                "INSERT INTO feedback (id, message_id, rating, is_current, created_at) "
                "VALUES ('fb_bad', ?, 9, 0, '2026-01-01 00:00:00')",
                (answer.id,),
            )
    finally:
        connection.close()


def test_feedback_high_water(store: Store) -> None:
    assert store.feedback_high_water() is None
    assert store.count_feedback_since(None) == 0
    first = store.add_feedback(answered(store).id, rating=5)
    mark = store.feedback_high_water()
    assert mark == first.created_at and mark.tzinfo is UTC
    assert store.count_feedback_since(mark) == 0
    store.add_feedback(answered(store).id, rating=1)
    store.add_feedback(first.message_id, correction="edited")
    assert store.count_feedback_since(mark) == 2
    assert store.count_feedback_since(None) == 2
    assert store.count_feedback_since(mark - timedelta(days=1)) == 2


# --- forget -----------------------------------------------------------------------------


def test_forget_removes_content_keeps_tombstone(store: Store, db_path: Path) -> None:
    conversation = store.create_conversation(system_prompt="SECRET-SYSTEM", title="SECRET-TITLE")
    store.add_message(conversation.id, "user", "SECRET-QUESTION")
    answer = store.add_message(
        conversation.id, "assistant", "SECRET-ANSWER", reasoning="SECRET-THOUGHT"
    )
    store.add_feedback(answer.id, rating=5, correction="SECRET-CORRECTION", comment="SECRET-NOTE")
    kept = answered(store, "other question", "other answer")

    store.forget_conversation(conversation.id)
    store.forget_conversation(conversation.id)  # idempotent

    for table in ("conversations", "messages", "feedback"):
        for row in raw(db_path, f"SELECT * FROM {table}"):
            assert not any("SECRET" in str(value) for value in row), (table, row)
    assert raw(
        db_path, "SELECT count(*) FROM messages WHERE conversation_id = ?", conversation.id
    ) == [(0,)]
    assert raw(
        db_path,
        "SELECT title, system_prompt, forgotten_at IS NOT NULL FROM conversations WHERE id = ?",
        conversation.id,
    ) == [(None, None, 1)]
    with pytest.raises(Gone, match="forgotten"):
        store.get_conversation(conversation.id)
    with pytest.raises(Gone):
        store.add_message(conversation.id, "user", "again")
    with pytest.raises(NotFound):
        store.get_message(answer.id)
    assert [c.id for c in store.list_conversations()] == [kept.conversation_id]
    counts = store.counts()
    assert (counts["conversations"], counts["forgotten_conversations"]) == (1, 1)
    assert (counts["messages"], counts["feedback"]) == (2, 0)
    with pytest.raises(NotFound):
        store.forget_conversation("conv_never")
    # Nor in the files' bytes: not in freed pages of the database, not in its write-ahead log.
    for path in (db_path, db_path.with_name(db_path.name + "-wal")):
        if path.exists():
            assert b"SECRET" not in path.read_bytes(), path.name


# --- runs, candidates, evaluations, promotions ------------------------------------------


def test_training_runs(store: Store) -> None:
    assert store.latest_run() is None
    first = store.create_run("quick", "manual")
    assert (first.status, first.progress, first.data_snapshot) == ("queued", {}, {})
    running = store.update_run(first.id, status="running", pid=4242, progress={"step": 1})
    assert running.started_at is not None and running.finished_at is None
    done = store.update_run(
        first.id,
        status="succeeded",
        candidate_id="20260101-quick",
        data_snapshot={"feedback": 3, "high_water": "2026-01-01T00:00:00+00:00"},
    )
    assert done.finished_at is not None and done.started_at == running.started_at
    second = store.create_run("standard", "nightly")
    store.update_run(second.id, status="skipped", reason="only 2 new feedback items")

    assert store.get_run(first.id).data_snapshot["feedback"] == 3
    assert [r.id for r in store.list_runs(10)] == [second.id, first.id]
    assert store.latest_run().id == second.id
    assert store.latest_run("succeeded").id == first.id
    assert store.latest_run("failed") is None
    assert store.counts()["runs"]["skipped"] == 1
    with pytest.raises(InvalidInput, match="status"):
        store.update_run(first.id, status="exploded")
    with pytest.raises(InvalidInput, match="colour"):
        store.update_run(first.id, colour="red")
    with pytest.raises(NotFound, match="run_missing"):
        store.get_run("run_missing")


def test_candidates_evaluations_promotions(store: Store) -> None:
    run = store.create_run("quick", "manual")
    candidate = store.record_candidate("20260101-0001", base_model="smollm2", run_id=run.id)
    assert (candidate.status, candidate.metrics) == ("trained", {})
    with pytest.raises(InvalidInput, match="already recorded"):
        store.record_candidate("20260101-0001", base_model="smollm2")
    updated = store.update_candidate(candidate.id, status="evaluated", metrics={"win_rate": 0.6})
    assert store.get_candidate_record(candidate.id).metrics == {"win_rate": 0.6}
    assert updated.status == "evaluated"
    with pytest.raises(NotFound):
        store.get_candidate_record("pruned-long-ago")

    evaluation = store.record_evaluation(
        candidate.id,
        champion_id=None,
        metrics={"win_rate": 0.6},
        decision="promote",
        rule="win_rate >= 0.55",
        report_path="/home/candidates/20260101-0001/report.md",
    )
    store.record_evaluation("pruned-long-ago", decision="reject", rule="loss diverged")
    assert [e.id for e in store.list_evaluations(candidate.id)] == [evaluation.id]
    assert len(store.list_evaluations()) == 2
    with pytest.raises(InvalidInput, match="decision"):
        store.record_evaluation(candidate.id, decision="maybe", rule="x")

    store.record_promotion("promote", candidate.id, None, forced=False, actor="cli")
    # History stays recordable for candidates no longer on disk (no foreign keys).
    store.record_promotion("rollback", None, "pruned-long-ago", reason="bad", actor="scheduler")
    log = store.list_promotions(10)
    assert [(p.action, p.candidate_id, p.previous_id) for p in log] == [
        ("rollback", None, "pruned-long-ago"),
        ("promote", candidate.id, None),
    ]
    with pytest.raises(InvalidInput, match="action"):
        store.record_promotion("demote", None)
    assert store.counts()["candidates"] == 1


# --- concurrency --------------------------------------------------------------------------


def test_two_stores_write_concurrently(db_path: Path) -> None:
    url = f"sqlite:///{db_path}"
    first, second = Store(url), Store(url)
    try:
        conversation = first.create_conversation()
        errors: list[BaseException] = []
        start = threading.Barrier(2)

        def writer(store: Store, name: str) -> None:
            try:
                start.wait()
                for index in range(50):
                    store.add_message(conversation.id, "user", f"{name}-{index}")
                    store.list_conversations()
            except BaseException as error:  # reported below, with the thread's name
                errors.append(error)

        threads = [
            threading.Thread(target=writer, args=(store, name))
            for store, name in ((first, "a"), (second, "b"))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        messages = first.get_conversation(conversation.id).messages
        assert [m.position for m in messages] == list(range(100))
        assert sorted(m.content for m in messages) == sorted(
            [f"a-{i}" for i in range(50)] + [f"b-{i}" for i in range(50)]
        )
    finally:
        first.close()
        second.close()


def test_timestamps_are_utc(store: Store) -> None:
    answer = answered(store)
    before = datetime.now(UTC)
    feedback = store.add_feedback(answer.id, rating=4)
    assert feedback.created_at.tzinfo is UTC
    assert before - timedelta(seconds=5) <= feedback.created_at <= datetime.now(UTC)


def test_upgrade_to_0004_keeps_what_runs_used_and_places_the_rest_by_kind(tmp_path: Path) -> None:
    """Before 0004 an answer rated and then corrected kept the placement of a low rating, and
    every later correction got the same number (a newcomer's holdout took half of the
    feedback). The upgrade places again only what no run used; what a gate judged on is
    marked judged (trained on from now on), what a run trained on stays where it was."""
    db_file = tmp_path / "old.db"
    connection = _home_at("0003", db_file)
    connection.execute(
        "INSERT INTO messages (id, conversation_id, position, role, content, created_at) "
        "VALUES ('msg_user', 'conv_1', 0, 'user', 'q', '2026-01-01 00:00:00')"
    )
    answers = {  # id: (placement stored, rating, correction)
        "msg_judged": (0.118, 1, "fixed"),
        "msg_trained": (0.5, 5, None),
        "msg_free_a": (0.118, 1, "fixed a"),
        "msg_free_b": (0.118, 1, "fixed b"),
    }
    for position, (message_id, (placement, rating, correction)) in enumerate(answers.items(), 1):
        connection.execute(
            "INSERT INTO messages (id, conversation_id, position, role, content, reply_to_id, "
            "finish_reason, created_at, placement) VALUES (?, 'conv_1', ?, 'assistant', 'a', "
            "'msg_user', 'stop', '2026-01-01 00:00:00', ?)",
            (message_id, position, placement),
        )
        connection.execute(
            "INSERT INTO feedback (id, message_id, rating, correction, is_current, created_at) "
            "VALUES (?, ?, ?, ?, 1, ?)",
            (f"fb_{position}", message_id, rating, correction, f"2026-01-0{position} 00:00:00"),
        )
    snapshot = {
        "message_ids": {"train": ["msg_trained"], "validation": [], "holdout": ["msg_judged"]}
    }
    connection.execute(
        "INSERT INTO training_runs (id, status, profile, trigger, candidate_id, data_snapshot, "
        "progress, created_at, started_at) VALUES ('run_1', 'succeeded', 'quick_test', 'manual', "
        "'cand-1', ?, '{}', '2026-01-03 00:00:00', '2026-01-03 00:00:01')",
        (json.dumps(snapshot),),
    )
    connection.execute(
        "INSERT INTO evaluations (id, candidate_id, metrics, decision, rule, created_at) "
        "VALUES ('eval_1', 'cand-1', '{}', 'reject', 'holdout_win', '2026-01-03 00:10:00')"
    )
    connection.commit()
    connection.close()

    with Store(f"sqlite:///{db_file}") as store:
        judged, trained = store.get_message("msg_judged"), store.get_message("msg_trained")
        assert judged.placement == 0.118 and trained.placement == 0.5  # used: never moved
        assert judged.used_at is not None and judged.judged_at is not None
        assert trained.used_at is not None and trained.judged_at is None
        free_a, free_b = store.get_message("msg_free_a"), store.get_message("msg_free_b")
        assert (free_a.placement_kind, free_a.placement_ordinal) == ("correction", 1)
        assert free_a.placement == spread_placement(1)
        assert free_b.placement == spread_placement(2)  # no longer stuck in the holdout
        assert free_a.used_at is None and free_a.judged_at is None
        # The next correction continues the sequence.
        conversation = store.create_conversation()
        store.add_message(conversation.id, "user", "q")
        new = store.add_message(conversation.id, "assistant", "a", finish_reason="stop")
        store.add_feedback(new.id, rating=1)
        store.add_feedback(new.id, correction="fixed too")
        assert store.get_message(new.id).placement == spread_placement(3)


def test_a_runs_outcome_in_words_says_promoted_rejected_or_skipped(tmp_path: Path) -> None:
    """The daemon's log line when a run ends: "succeeded" alone read the same for a promotion
    and a reject."""
    from data.views import outcome_line, run_outcome

    store = Store(f"sqlite:///{tmp_path}/w.db")
    try:
        won = store.create_run("quick_test", "manual")
        store.update_run(won.id, status="succeeded", candidate_id="cand-won")
        store.record_evaluation("cand-won", decision="promote", rule="all_passed")
        store.record_promotion("promote", "cand-won")
        lost = store.create_run("quick_test", "nightly")
        store.update_run(lost.id, status="succeeded", candidate_id="cand-lost")
        store.record_evaluation(
            "cand-lost",
            decision="reject",
            rule="general_regression",
            metrics={"reason": "2 general answers got worse", "next_step": "teach more"},
        )
        skipped = store.create_run("quick_test", "feedback")
        store.update_run(skipped.id, status="skipped", reason="3 new examples; 8 needed")
        lines = [
            outcome_line(run_outcome(store, store.get_run(r.id))) for r in (won, lost, skipped)
        ]
    finally:
        store.close()
    assert lines[0] == "candidate cand-won promoted: it serves now (`whetstone report cand-won`)"
    assert lines[1] == (
        "candidate cand-lost not promoted (general_regression): 2 general answers got worse. "
        "Next: teach more"
    )
    assert lines[2] == "skipped: 3 new examples; 8 needed"
