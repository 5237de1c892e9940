"""Search of the person's history in the store, on real SQLite files: the full-text indexes of
migration 0005, what a query may hold, forgetting, edits, paging, the upgrade of an old home,
and the list's index."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from data.errors import InvalidInput
from data.search import SEARCH_MAX_CHARS, SEARCH_MAX_WORDS
from data.store import Store
from tests.test_store import REPO, _home_at, raw


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "whetstone.db"


@pytest.fixture
def store(db_path: Path):
    with Store(f"sqlite:///{db_path}") as opened:
        yield opened


def chat(store: Store, question: str, answer: str, *, title: str | None = None) -> str:
    conversation = store.create_conversation(title=title)
    store.add_message(conversation.id, "user", question)
    store.add_message(conversation.id, "assistant", answer, finish_reason="stop")
    return conversation.id


def found(store: Store, q: str, **kwargs: object) -> list[str]:
    return [hit.conversation.id for hit in store.search_conversations(q, **kwargs)]


def index_in_step(db_path: Path) -> None:
    """FTS5's own check that each index holds exactly the words of the text it indexes
    (rank 1: against the external content table); raises if not."""
    for fts in ("messages_fts", "conversations_fts"):
        raw(db_path, f"INSERT INTO {fts}({fts}, rank) VALUES ('integrity-check', 1)")


def test_words_in_any_order_case_and_accents_ignored(store: Store, db_path: Path) -> None:
    france = chat(store, "What is the capital of France?", "The capital of France is Paris.")
    coffee = chat(store, "A café au lait recipe?", "Warm the milk; don't boil it.")

    assert found(store, "paris capital") == [france]
    assert found(store, "CAPITAL   Paris") == [france]
    assert found(store, "cafe") == [coffee]  # accents folded
    assert found(store, "CAFÉ lait") == [coffee]
    assert found(store, "capital coffee") == []  # every word, in one message
    assert found(store, "capi fran") == [france]  # the starts of words
    assert found(store, "capi", prefix=False) == []
    assert found(store, "ca") == []  # too short to be a start: whole words only
    assert found(store, "don't") == [coffee]  # a phrase: "don" then "t"
    index_in_step(db_path)


@pytest.mark.parametrize(
    "q",
    [
        "AND",
        "OR",
        "NOT paris",
        "paris OR",
        "NEAR(paris capital)",
        '"paris',
        'paris"',
        '"paris" "',
        "paris*",
        "*paris",
        "^paris",
        "content:paris",
        "title: paris",
        "-paris",
        "(paris",
        "paris)",
        "a+b {x y} [z]",
        "'; DROP TABLE messages; --",
        "paris\x00capital",
        "\x02paris\x03",
    ],
)
def test_query_syntax_in_q_is_only_text(store: Store, q: str) -> None:
    """Nothing typed can break the FTS5 query or reach SQL: each word is quoted."""
    france = chat(store, "What is the capital of France?", "The capital of France is Paris.")
    logic = chat(store, "Explain AND, OR and NOT.", "They combine conditions.")
    hits = found(store, q)
    assert set(hits) <= {france, logic}
    assert store.counts()["conversations"] == 2


def test_operators_are_found_as_words(store: Store) -> None:
    chat(store, "What is the capital of France?", "The capital of France is Paris.")
    logic = chat(store, "Explain AND, OR and NOT.", "They combine conditions.")
    assert found(store, "and or not") == [logic]
    assert found(store, "NEAR(") == []  # a word no message holds, not an operator
    assert found(store, "^explain") == [logic]


@pytest.mark.parametrize(
    ("q", "says"),
    [
        ("", "no words"),
        ("   \n\t", "no words"),
        ("!!! ... ***", "no words"),
        ("x" * (SEARCH_MAX_CHARS + 1), f"at most {SEARCH_MAX_CHARS}"),
        (" ".join(["word"] * (SEARCH_MAX_WORDS + 1)), f"at most {SEARCH_MAX_WORDS}"),
        ("bad \ud800 text", "lone surrogate"),
        (42, "must be a string"),
    ],
)
def test_a_bad_query_is_refused_naming_q(store: Store, q: object, says: str) -> None:
    with pytest.raises(InvalidInput, match="q ") as error:
        store.search_conversations(q)  # type: ignore[arg-type]
    assert says in str(error.value)
    assert str(error.value).startswith("q ")


def test_forgotten_conversations_are_never_found_and_their_words_leave_the_file(
    store: Store, db_path: Path
) -> None:
    """The index is not a back door: forgetting takes the words out of it, and out of the
    file's bytes (the merged segments; freed pages are zeroed; the WAL is emptied)."""
    secret = chat(
        store,
        "Tell nobody about zanzibarquux.",
        "Zanzibarquux stays between us.",
        title="Plans for xylophonewhale",
    )
    kept = chat(store, "Is zanzibarquux a word?", "Not one I know.")
    assert set(found(store, "zanzibarquux")) == {secret, kept}
    assert found(store, "xylophonewhale") == [secret]

    store.forget_conversation(secret)

    assert found(store, "zanzibarquux") == [kept]
    assert found(store, "xylophonewhale") == []
    assert found(store, "between") == []
    index_in_step(db_path)
    kept_bytes = b"zanzibarquux"  # still in the other conversation: the check can see words
    assert kept_bytes in db_path.read_bytes()
    for path in (db_path, db_path.with_name(db_path.name + "-wal")):
        if path.exists():
            data = path.read_bytes()
            for word in (b"xylophonewhale", b"between", b"nobody"):
                assert word not in data, (path.name, word)


def test_edits_of_the_text_are_followed(store: Store, db_path: Path) -> None:
    """A streamed answer's partial text, its final text, and renames are what is found."""
    conversation = store.create_conversation()
    store.add_message(conversation.id, "user", "Name a fruit.")
    answer = store.add_message(conversation.id, "assistant", "")
    store.save_partial(answer.id, "Apple, or maybe")
    assert found(store, "apple") == [conversation.id]
    store.complete_message(answer.id, content="Banana.", finish_reason="stop")
    assert found(store, "apple") == []
    assert found(store, "banana") == [conversation.id]

    store.rename_conversation(conversation.id, "Orchard notes")
    assert found(store, "orchard") == [conversation.id]
    store.rename_conversation(conversation.id, "Kitchen")
    assert found(store, "orchard") == []
    assert found(store, "kitchen") == [conversation.id]
    store.rename_conversation(conversation.id, None)
    assert found(store, "kitchen") == []
    index_in_step(db_path)


def test_newest_first_paged_with_a_snippet_of_the_newest_match(store: Store) -> None:
    ids = [chat(store, f"Tell me about owls, part {n}.", f"Owls, part {n}.") for n in range(5)]
    other = chat(store, "And herons?", "Herons wade.")
    newest_first = ids[::-1]
    assert found(store, "owls") == newest_first
    assert found(store, "owls", limit=2) == newest_first[:2]
    assert found(store, "owls", limit=2, offset=2) == newest_first[2:4]
    assert found(store, "owls", offset=5) == []
    # Touching a conversation moves it to the top, as in the list.
    store.add_message(ids[0], "user", "More owls please, in the barn.")
    assert found(store, "owls")[0] == ids[0]
    assert found(store, "owls") == [c.id for c in store.list_conversations() if c.id != other]

    hit = store.search_conversations("owls barn")[0]
    assert hit.conversation.id == ids[0]
    assert hit.conversation.message_count == 3
    assert hit.snippet == "More owls please, in the barn."
    assert [hit.snippet[a:b] for a, b in hit.highlights] == ["owls", "barn"]

    # Only the title matched: the title is the snippet.
    titled = chat(store, "Something else", "Indeed.", title="Birds of the marsh")
    (hit,) = store.search_conversations("marsh")
    assert (hit.conversation.id, hit.snippet) == (titled, "Birds of the marsh")
    assert [hit.snippet[a:b] for a, b in hit.highlights] == ["marsh"]


def test_a_long_message_gives_a_short_snippet_on_one_line(store: Store) -> None:
    words = " ".join(f"filler{n}" for n in range(200))
    conversation = chat(store, "Long one", f"{words}\n\nthe needle\nis here\n\n{words}")
    (hit,) = store.search_conversations("needle")
    assert hit.conversation.id == conversation
    assert "\n" not in hit.snippet and len(hit.snippet) < 200
    assert hit.snippet.startswith("…") and hit.snippet.endswith("…")
    assert [hit.snippet[a:b] for a, b in hit.highlights] == ["needle"]


def test_tool_output_and_system_prompts_are_not_searched(store: Store) -> None:
    conversation = store.create_conversation(system_prompt="You love quokkas.")
    store.add_message(conversation.id, "user", "Look it up.")
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    store.add_message(
        conversation.id, "assistant", "", finish_reason="tool_calls", tool_calls=[call]
    )
    store.add_message(conversation.id, "tool", "quokka facts", tool_call_id="call_1")
    assert found(store, "quokka") == []
    assert found(store, "quokkas") == []


def test_an_old_home_upgrades_and_its_messages_are_found(tmp_path: Path) -> None:
    """A home at 0004 (before search) gets its stored messages and titles indexed by 0005,
    and not the tombstone of one it forgot."""
    db_file = tmp_path / "old.db"
    connection = _home_at("0004", db_file)  # conv_1, titled "old"
    connection.execute(
        "INSERT INTO conversations (id, title, created_at, updated_at, forgotten_at) "
        "VALUES ('conv_gone', NULL, '2026-01-01 00:00:00', '2026-01-02 00:00:00', "
        "'2026-01-03 00:00:00')"
    )
    for position, (role, content) in enumerate(
        [("user", "How do I prune a fig tree?"), ("assistant", "Prune figs in late winter.")]
    ):
        connection.execute(
            "INSERT INTO messages (id, conversation_id, position, role, content, created_at) "
            "VALUES (?, 'conv_1', ?, ?, ?, '2026-01-01 00:00:00')",
            (f"msg_{position}", position, role, content),
        )
    connection.commit()
    connection.close()

    with Store(f"sqlite:///{db_file}") as store:
        assert store.schema_revision == "0009"
        assert found(store, "prune winter") == ["conv_1"]
        assert found(store, "old") == ["conv_1"]  # the title
        (hit,) = store.search_conversations("tree")
        assert hit.snippet == "How do I prune a fig tree?"
        # New messages are indexed by the triggers from now on.
        store.add_message("conv_1", "user", "And apricots?")
        assert found(store, "apricots") == ["conv_1"]
    index_in_step(db_file)
    triggers = {
        row[0] for row in raw(db_file, "SELECT name FROM sqlite_master WHERE type = 'trigger'")
    }
    assert triggers == {
        f"{fts}_{action}"
        for fts in ("messages_fts", "conversations_fts", "notes_fts")
        for action in ("insert", "update", "delete")
    }


def test_downgrade_to_0004_and_back(tmp_path: Path) -> None:
    """0005 undone by the shipped Alembic CLI leaves no trigger or index table behind, and
    the next start indexes everything again."""
    db_file = tmp_path / "w.db"
    with Store(f"sqlite:///{db_file}") as store:
        conversation = chat(store, "Kept?", "Kept, yes.")
    ini = str(REPO / "data" / "alembic.ini")
    command = [sys.executable, "-m", "alembic", "-c", ini, "-x", f"url=sqlite:///{db_file}"]
    result = subprocess.run(
        [*command, "downgrade", "0004"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    names = {r[0] for r in raw(db_file, "SELECT name FROM sqlite_master")}
    assert not {n for n in names if "fts" in n or n == "ix_conversations_listed"}, names
    with Store(f"sqlite:///{db_file}") as store:
        assert found(store, "kept") == [conversation]
    index_in_step(db_file)


def test_the_list_and_a_search_read_the_list_index_without_a_sort(store: Store) -> None:
    """At 5,000 conversations a scan and a sort of all of them for each page is what made
    the list slow; the partial index gives the order."""
    for n in range(3):
        chat(store, f"q{n}", f"a{n}")
    with store.engine.connect() as connection:
        plan = connection.exec_driver_sql(
            "EXPLAIN QUERY PLAN SELECT id FROM conversations WHERE forgotten_at IS NULL "
            "ORDER BY updated_at DESC, id DESC LIMIT 50 OFFSET 4950"
        ).all()
    details = [row[3] for row in plan]
    assert any("ix_conversations_listed" in d for d in details), details
    assert not any("TEMP B-TREE" in d for d in details), details


def test_sqlite3_module_has_fts5() -> None:
    """The index needs FTS5 in the sqlite3 library Python was built with."""
    connection = sqlite3.connect(":memory:")
    try:
        connection.execute("CREATE VIRTUAL TABLE t USING fts5(x)")
    finally:
        connection.close()
