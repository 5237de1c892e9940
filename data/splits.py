"""Where each feedback item belongs, by the placement number in [0, 1) its answer got when it
first received feedback (stored with the message):

    [0, holdout)                      the holdout: the gate judges on it, then it is trained on
    [holdout, holdout + validation)   held-out loss during training (early stopping), then
                                      trained on
    the rest                          trained on

The rolling holdout: a held-out item stays out of training until a gate has judged a
candidate on it, and a validation item until a gate has judged the candidate whose run
stopped early on it (the store's judged_at for both); every later run trains on it. So a
fact taught once is learned, one night late when it happened to be held out. The gate stays
honest: it judges only held-out items no gate has judged yet, and an item is trained on only
after it was judged, so neither the candidate nor the champion (nor any adapter either
continued from) was trained on what it is judged on. Placements never change once a run used
an item (the store's used_at), so an item a run trained on never moves into the holdout.

Placements follow the golden-ratio sequence, counted apart for each kind of feedback
(placement_kind): the first n answers of each kind put n * fraction of them in each split,
give or take one. The kind is that of the answer's feedback as it stands: an answer rated and
then corrected (the TUI's order) is placed as a correction, drawn again from that sequence
while no run has used it, and the place it left in the other sequence goes to the next answer
of that kind. Corrections, liked answers and the rest are counted apart because the gate
counts held-out items with a target (a correction or a rating of 4-5) and compares
corrections with each other: when liked and disliked ratings shared one sequence, the first
day held out a low rating in place of a liked one. A hash of the message id (how feedback was
placed before the store kept placements; migration 0003) gave these shares only on average.

Plain code (no torch), so the daemon's recipe search splits exactly as training does."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Placed(Protocol):
    """What a split needs of a feedback item (data.exports.FeedbackItem): the store places
    feedback with this module and exports reads the store, so the item's type is not named."""

    @property
    def judged(self) -> bool: ...

    @property
    def placement(self) -> float: ...


Item = TypeVar("Item", bound=Placed)

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
class Split(Generic[Item]):
    train: list[Item]
    validation: list[Item]
    holdout: list[Item]


def split_items(
    items: Iterable[Item], holdout_fraction: float, validation_fraction: float
) -> Split[Item]:
    train: list[Item] = []
    validation: list[Item] = []
    holdout: list[Item] = []
    for item in items:
        if item.judged:
            train.append(item)
        elif item.placement < holdout_fraction:
            holdout.append(item)
        elif item.placement < holdout_fraction + validation_fraction:
            validation.append(item)
        else:
            train.append(item)
    return Split(train, validation, holdout)
