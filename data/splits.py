"""Where each feedback item belongs, by the placement number in [0, 1) its answer got when it
first received feedback (stored with the message, so it never changes as feedback grows or
as the fractions are read):

    [0, holdout)                      frozen holdout: only the gate looks at it
    [holdout, holdout + validation)   held-out loss during training (early stopping)
    the rest                          trained on

Placements follow the golden-ratio sequence over the order feedback arrives in, counted
apart for each kind of feedback (placement_kind): the first n answers of each kind put
n * fraction of them in each split, give or take one. Corrections, liked answers and the
rest are counted apart because the gate counts held-out items with a target (a correction or
a rating of 4-5) and compares corrections with each other: when liked and disliked ratings
shared one sequence, the first day held out a low rating in place of a liked one and the
gate had 3 of the 4 items it needs. A hash of the message id (how feedback was placed
before the store kept placements; migration 0003 stores it for the answers it placed) gave
these shares only on average: a first day with ten corrections held out none of them about
one time in ten, and the gate could not judge the first night's adapter at all.

Plain code (no torch), so the daemon's recipe search splits exactly as training does."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the store places feedback with this module, and exports reads the store
    from data.exports import FeedbackItem

# 1/phi: consecutive multiples modulo 1 fill [0, 1) as evenly as any sequence can.
GOLDEN = (math.sqrt(5) - 1) / 2
# Where the sequence starts: 0.5 trains the person's very first answer (0 would hold it out).
START = 0.5


def spread_placement(ordinal: int) -> float:
    """The placement of the `ordinal`-th answer (0-based) of its kind to get feedback."""
    if ordinal < 0:
        raise ValueError(f"ordinal must be >= 0; got {ordinal}")
    return (START + ordinal * GOLDEN) % 1.0


PLACEMENT_KINDS = ("correction", "liked", "other")


def placement_kind(correction: str | None, rating: int | None) -> str:
    """Which placement sequence an answer's feedback joins: a correction, a rating of 4-5
    without one (the answer is a target as it stands), or anything else."""
    if correction is not None:
        return "correction"
    if rating is not None and rating >= 4:
        return "liked"
    return "other"


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
        if item.placement < holdout_fraction:
            holdout.append(item)
        elif item.placement < holdout_fraction + validation_fraction:
            validation.append(item)
        else:
            train.append(item)
    return Split(train, validation, holdout)
