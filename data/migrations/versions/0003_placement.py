"""Stored split placements: each answer with feedback keeps the number that places it.

Answers that already have feedback keep the placement they had (a hash of the id, computed
here), so no answer moves between the holdout and training on upgrade.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels = None
depends_on = None


def _hash_placement(message_id: str) -> float:
    # A copy of data.splits.hash_placement as it was at 0003: a migration must not change
    # when the application's code does.
    digest = hashlib.sha256(f"whetstone-split:{message_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("placement", sa.Float(), nullable=True))
    connection = op.get_bind()
    ids = connection.execute(sa.text("SELECT DISTINCT message_id FROM feedback")).scalars().all()
    if ids:
        connection.execute(
            sa.text("UPDATE messages SET placement = :placement WHERE id = :id"),
            [{"id": message_id, "placement": _hash_placement(message_id)} for message_id in ids],
        )


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("placement")
