"""Notes learned: whether an adapter answers a note's question right without it (issue 37).

The evaluation of a candidate asks it the questions of the memory's notes, without notes, and
records each answer's verdict here under the candidate's id. While an adapter serves, the
notes it answers right are not given to the model (learned); a rollback serves another
adapter, whose own checks apply, so the notes the rolled-back adapter retired come back.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "note_checks",
        sa.Column("note_id", sa.String(64), nullable=False),
        sa.Column("adapter_id", sa.String(255), nullable=False),
        sa.Column("answered_right", sa.Boolean(), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["note_id"], ["notes.id"], name="fk_note_checks_note_id_notes", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("note_id", "adapter_id", name="pk_note_checks"),
    )
    op.create_index("ix_note_checks_adapter_id", "note_checks", ["adapter_id"])


def downgrade() -> None:
    op.drop_index("ix_note_checks_adapter_id", table_name="note_checks")
    op.drop_table("note_checks")
