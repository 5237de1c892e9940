"""Memory: notes the API worker gives the model from the next message on (issue 37).

A note is a fact the person taught: the question and the answer wanted. One is made from
every correction (source_message_id names the corrected answer, adapter_id the adapter that
answered wrong; an edit of the correction rewrites it), or by hand (POST /v1/memory: no
source). status says whether it is still given to the model: active; learned (the serving
adapter answers its question right without it: not injected, kept); forgotten (a tombstone:
text and question cleared, so an edit of the same correction can bring it back, while
forgetting the whole conversation deletes its notes).

notes_fts indexes question and text with FTS5 the way 0005 indexes messages: external
content, case and accents folded, triggers on insert, delete and an update of either column.
Only SQLite has FTS5: elsewhere the table is made and retrieval finds nothing.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels = None
depends_on = None

# As 0005's: "cafe" finds "Café".
_TOKENIZE = "unicode61 remove_diacritics 2"
_COLUMNS = ("question", "text")


def _triggers() -> list[str]:
    old = ", ".join(f"old.{c}" for c in _COLUMNS)
    new = ", ".join(f"new.{c}" for c in _COLUMNS)
    names = ", ".join(_COLUMNS)
    # An external-content FTS5 'delete' must be given the text as it was indexed.
    delete = (
        f"INSERT INTO notes_fts(notes_fts, rowid, {names}) VALUES ('delete', old.rowid, {old});"
    )
    insert = f"INSERT INTO notes_fts(rowid, {names}) VALUES (new.rowid, {new});"
    return [
        f"CREATE TRIGGER notes_fts_insert AFTER INSERT ON notes BEGIN {insert} END",
        f"CREATE TRIGGER notes_fts_delete AFTER DELETE ON notes BEGIN {delete} END",
        # OF question, text: a change of status alone leaves the index as it is.
        f"CREATE TRIGGER notes_fts_update AFTER UPDATE OF {names} ON notes "
        f"BEGIN {delete} {insert} END",
    ]


def upgrade() -> None:
    op.create_table(
        "notes",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("question", sa.Text(), nullable=True),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("source_message_id", sa.String(64), nullable=True),
        sa.Column("conversation_id", sa.String(64), nullable=True),
        sa.Column("adapter_id", sa.String(255), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('active', 'learned', 'forgotten')", name="ck_notes_status"),
        sa.PrimaryKeyConstraint("id", name="pk_notes"),
    )
    op.create_index("ix_notes_source_message_id", "notes", ["source_message_id"], unique=True)
    op.create_index("ix_notes_conversation_id", "notes", ["conversation_id"])
    op.create_index("ix_notes_created_at", "notes", ["created_at"])
    if op.get_bind().dialect.name != "sqlite":
        return
    op.execute(
        f"CREATE VIRTUAL TABLE notes_fts USING fts5({', '.join(_COLUMNS)}, content='notes', "
        f"content_rowid='rowid', tokenize='{_TOKENIZE}')"
    )
    for trigger in _triggers():
        op.execute(trigger)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for action in ("insert", "delete", "update"):
            op.execute(f"DROP TRIGGER IF EXISTS notes_fts_{action}")
        op.execute("DROP TABLE IF EXISTS notes_fts")
    op.drop_table("notes")
