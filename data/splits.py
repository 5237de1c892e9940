"""Where each feedback item belongs: placed by a hash of its message id, so the placement
never changes as feedback grows (it depends only on the id and the configured fractions):

    [0, holdout)                      frozen holdout: only the gate looks at it
    [holdout, holdout + validation)   held-out loss during training (early stopping)
    the rest                          trained on

Plain code (no torch), so the daemon's recipe search splits exactly as training does."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from data.exports import FeedbackItem


def placement(message_id: str) -> float:
    """A stable number in [0, 1) for a message id (sha256, not Python's salted hash)."""
    digest = hashlib.sha256(f"whetstone-split:{message_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class Split:
    train: list[FeedbackItem]
    validation: list[FeedbackItem]
    holdout: list[FeedbackItem]


def split_items(
    items: Iterable[FeedbackItem], holdout_fraction: float, validation_fraction: float
) -> Split:
    train, validation, holdout = [], [], []
    for item in items:
        where = placement(item.message_id)
        if where < holdout_fraction:
            holdout.append(item)
        elif where < holdout_fraction + validation_fraction:
            validation.append(item)
        else:
            train.append(item)
    return Split(train, validation, holdout)
