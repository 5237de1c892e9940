"""Tool calls: an assistant turn's calls, the tool turns that answer them.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # SQLite cannot alter a CHECK constraint in place: batch mode copies the table.
    with op.batch_alter_table("messages", recreate="always") as batch:
        batch.add_column(sa.Column("tool_calls", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("tool_call_id", sa.String(64), nullable=True))
        batch.drop_constraint("ck_messages_role", type_="check")
        batch.create_check_constraint(
            "ck_messages_role", "role IN ('system', 'user', 'assistant', 'tool')"
        )


def downgrade() -> None:
    with op.batch_alter_table("messages", recreate="always") as batch:
        batch.drop_constraint("ck_messages_role", type_="check")
        batch.create_check_constraint("ck_messages_role", "role IN ('system', 'user', 'assistant')")
        batch.drop_column("tool_call_id")
        batch.drop_column("tool_calls")
