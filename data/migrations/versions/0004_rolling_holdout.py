"""Placements that do not depend on the order feedback arrives in, and a rolling holdout.

New columns on messages: placement_kind and placement_ordinal (which per-kind sequence an
answer's placement was drawn from, and where in it), used_at (when a training run first
used it: its placement never changes after) and judged_at (when a gate first judged on it, or
on the candidate whose run validated on it: from then on it is trained on).

Existing answers: used_at and judged_at come from the runs' data snapshots (an answer in a
run's snapshot was used then; one in the holdout or validation split of a run whose
candidate was evaluated was judged then). Ordinals are counted again per kind in the order
feedback first came. An answer no run has used gets the placement of its ordinal: before
this revision an answer rated and then corrected kept the "other" placement it got first,
and every later answer of that kind got the same number (the holdout took half of a
newcomer's feedback). An answer a run has used keeps its placement, so nothing a gate judged
on or a run trained on moves.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import json
import math

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels = None
depends_on = None

# Copies of data.splits as they are at 0004: a migration must not change when the code does.
_GOLDEN = (math.sqrt(5) - 1) / 2
_START = 0.5


def _spread(ordinal: int) -> float:
    return (_START + ordinal * _GOLDEN) % 1.0


def _kind(correction: str | None, rating: int | None) -> str:
    if correction is not None:
        return "correction"
    if rating is not None and rating >= 4:
        return "liked"
    return "other"


def _snapshot(value: object) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("placement_kind", sa.String(16), nullable=True))
        batch.add_column(sa.Column("placement_ordinal", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("used_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("judged_at", sa.DateTime(timezone=True), nullable=True))
    connection = op.get_bind()

    used: dict[str, object] = {}
    judged: dict[str, object] = {}
    evaluated = {
        row.candidate_id: row.created_at
        for row in connection.execute(
            sa.text(
                "SELECT candidate_id, MIN(created_at) AS created_at FROM evaluations "
                "GROUP BY candidate_id"
            )
        )
    }
    runs = connection.execute(
        sa.text(
            "SELECT candidate_id, created_at, started_at, data_snapshot FROM training_runs "
            "ORDER BY created_at"
        )
    )
    for run in runs:
        ids = _snapshot(run.data_snapshot).get("message_ids") or {}
        when = run.started_at or run.created_at
        for split in ("train", "validation", "holdout"):
            for message_id in ids.get(split) or []:
                used.setdefault(message_id, when)
        if run.candidate_id in evaluated:
            for message_id in (ids.get("holdout") or []) + (ids.get("validation") or []):
                judged.setdefault(message_id, evaluated[run.candidate_id])

    placed = connection.execute(
        sa.text(
            "SELECT m.id, m.placement, f.rating, f.correction, "
            "(SELECT MIN(g.created_at) FROM feedback g WHERE g.message_id = m.id) AS first "
            "FROM messages m JOIN feedback f ON f.message_id = m.id AND f.is_current "
            "WHERE m.placement IS NOT NULL ORDER BY first, m.id"
        )
    ).all()
    counts = {"correction": 0, "liked": 0, "other": 0}
    updates = []
    for row in placed:
        kind = _kind(row.correction, row.rating)
        ordinal = counts[kind]
        counts[kind] += 1
        updates.append(
            {
                "id": row.id,
                "kind": kind,
                "ordinal": ordinal,
                "placement": row.placement if row.id in used else _spread(ordinal),
                "used_at": used.get(row.id),
                "judged_at": judged.get(row.id),
            }
        )
    if updates:
        connection.execute(
            sa.text(
                "UPDATE messages SET placement_kind = :kind, placement_ordinal = :ordinal, "
                "placement = :placement, used_at = :used_at, judged_at = :judged_at "
                "WHERE id = :id"
            ),
            updates,
        )


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("judged_at")
        batch.drop_column("used_at")
        batch.drop_column("placement_ordinal")
        batch.drop_column("placement_kind")
