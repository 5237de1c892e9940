"""The request bodies of whetstone's own routes (the OpenAI ones are in
production.api.openai_schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message_id: str
    # Kept as sent: the store's validation names what is wrong with each value.
    rating: Any = None
    correction: Any = None
    comment: Any = None


class ConversationPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str | None = None
    system_prompt: str | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    force: bool = False  # promote without a passing evaluation (integrity is still checked)


class TrainRequest(BaseModel):
    """POST /v1/train: what `whetstone train [--profile P] [--force] [--no-promote]` does."""

    model_config = ConfigDict(extra="forbid", strict=True)
    profile: str | None = None  # None: training.default_profile
    force: bool = False
    promote: bool = True
