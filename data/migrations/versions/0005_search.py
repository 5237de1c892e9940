"""Search of the person's history: full-text indexes over messages and titles, and an index
that serves the conversation list in its order.

messages_fts and conversations_fts are SQLite FTS5 tables with external content: they hold
only the index (the text itself stays in messages.content and conversations.title, which
snippet() reads back through the rowid). Triggers keep them in step with every insert,
update of the text, and delete, including the deletes of a forgotten conversation (its
messages go, its title is cleared), so forgotten text is never found. Rows already stored
are indexed here ('rebuild' reads the whole content table).

The index is keyed on the tables' implicit rowid. A later migration that rebuilds messages
or conversations (batch mode with recreate) drops these triggers with the old table and may
number the rows again: it must create the triggers again and 'rebuild' both indexes
(tests/test_store.py checks the index against the text at the newest revision).

ix_conversations_listed: the list (not forgotten, newest first) read in index order instead
of a scan and a sort; partial, so tombstones cost it nothing.

Only SQLite has FTS5: on another database only the list's index is made, and the store
searches with LIKE there.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels = None
depends_on = None

# Case and accents folded: "cafe" finds "Café".
_TOKENIZE = "unicode61 remove_diacritics 2"

_FTS = [
    ("messages_fts", "messages", "content"),
    ("conversations_fts", "conversations", "title"),
]


def _triggers(fts: str, table: str, column: str) -> list[str]:
    # An external-content FTS5 'delete' must be given the text as it was indexed: old.<column>.
    delete = (
        f"INSERT INTO {fts}({fts}, rowid, {column}) VALUES ('delete', old.rowid, old.{column});"
    )
    insert = f"INSERT INTO {fts}(rowid, {column}) VALUES (new.rowid, new.{column});"
    return [
        f"CREATE TRIGGER {fts}_insert AFTER INSERT ON {table} BEGIN {insert} END",
        f"CREATE TRIGGER {fts}_delete AFTER DELETE ON {table} BEGIN {delete} END",
        # OF <column>: the many updates of other columns (updated_at, placements) skip it.
        f"CREATE TRIGGER {fts}_update AFTER UPDATE OF {column} ON {table} "
        f"BEGIN {delete} {insert} END",
    ]


def upgrade() -> None:
    op.create_index(
        "ix_conversations_listed",
        "conversations",
        ["updated_at", "id"],
        sqlite_where=sa.text("forgotten_at IS NULL"),
        postgresql_where=sa.text("forgotten_at IS NULL"),
    )
    if op.get_bind().dialect.name != "sqlite":
        return
    for fts, table, column in _FTS:
        op.execute(
            f"CREATE VIRTUAL TABLE {fts} USING fts5({column}, content='{table}', "
            f"content_rowid='rowid', tokenize='{_TOKENIZE}')"
        )
        for trigger in _triggers(fts, table, column):
            op.execute(trigger)
        op.execute(f"INSERT INTO {fts}({fts}) VALUES ('rebuild')")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for fts, _, _ in _FTS:
            for action in ("insert", "delete", "update"):
                op.execute(f"DROP TRIGGER IF EXISTS {fts}_{action}")
            op.execute(f"DROP TABLE IF EXISTS {fts}")
    op.drop_index("ix_conversations_listed", table_name="conversations")
