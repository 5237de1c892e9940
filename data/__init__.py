"""The whetstone store: SQLAlchemy models, Alembic migrations, queries and training exports."""

from data.errors import (
    FeedbackError,
    Gone,
    InvalidInput,
    NotFound,
    SchemaTooNewError,
    StoreError,
)
from data.store import Store

__all__ = [
    "FeedbackError",
    "Gone",
    "InvalidInput",
    "NotFound",
    "SchemaTooNewError",
    "Store",
    "StoreError",
]
