"""Exceptions raised by the store, one base class so callers can catch them all.

The HTTP layer maps them: NotFound -> 404, Gone -> 410, InvalidInput -> 422.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the store raises on purpose."""


class SchemaTooNewError(StoreError):
    """The database was migrated by a newer whetstone than this one."""


class NotFound(StoreError, LookupError):
    """No row with the given id."""


class Gone(StoreError):
    """The row existed but its conversation was forgotten (a tombstone remains)."""


class InvalidInput(StoreError, ValueError):
    """A value given to the store is not one it accepts; the message says which."""


class FeedbackError(InvalidInput):
    """Feedback that cannot be recorded; nothing stored changes when this is raised."""


class FeedbackTargetNotFound(FeedbackError, NotFound):
    """Feedback for a message id the store does not hold (never stored, or forgotten)."""


class FeedbackTargetGone(FeedbackError, Gone):
    """Feedback for a message of a forgotten conversation."""
