"""Imported history: where a conversation came from, its id there, and when it came.

New columns on conversations: source (null for a conversation made here; "chatgpt",
"openwebui" or "jsonl" for one imported by `whetstone import`), external_id (the export's own
id of the conversation, or a hash of a JSONL line that has none) and imported_at. A
conversation is imported once: (source, external_id) is unique, so importing the same file
again adds nothing, and a forgotten imported conversation (its tombstone keeps both) is not
brought back by importing its export again. Conversations made here hold nulls there, which
the unique constraint never compares.

Only columns are added and dropped (ALTER TABLE, never a batch rebuild on SQLite): the table
is not rebuilt, so the full-text triggers and rowids of 0005 stay as they are.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("conversations", sa.Column("source", sa.String(32), nullable=True))
    op.add_column("conversations", sa.Column("external_id", sa.String(255), nullable=True))
    op.add_column(
        "conversations", sa.Column("imported_at", sa.DateTime(timezone=True), nullable=True)
    )
    # A unique index, not a table constraint: SQLite adds one without rebuilding the table.
    op.create_index(
        "uq_conversations_source_external_id",
        "conversations",
        ["source", "external_id"],
        unique=True,
    )


def downgrade() -> None:
    op.drop_index("uq_conversations_source_external_id", table_name="conversations")
    # ALTER TABLE ... DROP COLUMN (SQLite 3.35+), not a batch rebuild: rebuilding the table
    # would drop 0005's full-text triggers with it.
    for column in ("imported_at", "external_id", "source"):
        op.drop_column("conversations", column)
