"""The request body of OpenAI's Responses API (POST /v1/responses), as whetstone takes it.

Every parameter the openai SDK's `client.responses.create` can send is declared: honoured, or
refused by name (a 400 with `param` set) where whetstone has nothing that does it; unknown
parameters are refused too. The input items, tools and text format are checked where they
are translated into a chat request (production.api.responses), which names the item at fault
(`input[3].content[0]`). README.md's Responses section lists each parameter.

Torch-free (the import-linter contract chat-torch-free).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from production.api.openai_schema import refuse, refuse_present

# OpenAI's bounds on metadata: 16 pairs, keys of 64 characters, values of 512.
METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512
# What harmony's system message can say ("Reasoning: low"); OpenAI's other efforts have no
# counterpart there.
EFFORTS = ("low", "medium", "high")
ENCRYPTED = "reasoning.encrypted_content"


# reasoning.summary: there is no summariser model. "auto" (the most detailed summariser
# available) and "detailed" get the reasoning itself as the one summary part: the most
# detailed summary there is, and nothing is made up. "concise" would need a model that
# shortens it, so it is refused by name. (Codex CLI sends its model_reasoning_summary,
# "auto" unless configured.)
SUMMARIES = ("auto", "detailed")


class ReasoningConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None  # OpenAI's deprecated name of summary
    context: Any = None
    mode: Any = None

    @field_validator("effort")
    @classmethod
    def _effort(cls, value: str | None) -> str | None:
        if value is not None and value not in EFFORTS:
            raise ValueError(
                f"{value!r} is not supported: harmony models (GPT-OSS) reason at "
                f"{', '.join(EFFORTS)}"
            )
        return value

    @field_validator("summary", "generate_summary")
    @classmethod
    def _summary(cls, value: str | None) -> str | None:
        if value is None or value in SUMMARIES:
            return value
        if value == "concise":
            raise ValueError(
                "'concise' is not supported: there is no summariser model; 'auto' or "
                "'detailed' give the reasoning itself as its summary"
            )
        raise ValueError(f"auto, concise or detailed; got {value!r}")

    @field_validator("context", "mode")
    @classmethod
    def _refused(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            raise ValueError(f"not supported: {_REASONING_REFUSED[info.field_name or '']}")
        return value

    def summary_kind(self) -> str | None:
        return self.summary or self.generate_summary


_REASONING_REFUSED = {
    "context": "earlier reasoning is never part of the prompt here",
    "mode": "there is one reasoning mode",
}


class TextFormat(BaseModel):
    """text.format: plain text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, min_length=1, max_length=64)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema":
            if self.name is None or self.schema_ is None:
                raise ValueError("type json_schema needs a name and a schema")
        elif any(v is not None for v in (self.name, self.schema_, self.strict, self.description)):
            raise ValueError(f"type {self.type} takes no name, schema, strict or description")
        return self


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: TextFormat | None = None
    verbosity: Any = None

    @field_validator("verbosity")
    @classmethod
    def _verbosity(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("not supported: the model has no verbosity control; ask in the prompt")
        return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_obfuscation: Literal[False] | None = None


class ResponsesRequest(BaseModel):
    """POST /v1/responses."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    # A string is one user message; a list holds messages, function calls and their outputs,
    # and reasoning items (checked in production.api.responses, which names the item).
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    store: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    previous_response_id: str | None = Field(None, min_length=1, max_length=64)
    metadata: dict[str, str] | None = None
    user: str | None = None  # recorded with the answer
    safety_identifier: str | None = None  # recorded with the answer
    service_tier: Literal["auto", "default"] | None = None
    truncation: Any = None  # "disabled" only
    background: bool | None = None
    # "reasoning.encrypted_content" only: the reasoning item carries its text signed
    # (production.api.reasoning_token) for a client that keeps nothing (store: false).
    include: list[str] | None = None
    # A routing hint for OpenAI's prompt caches; it never changes an answer. One worker
    # serves every request here, so every request reaches the one cache there is: kept with
    # the response and shown on it, nothing else.
    prompt_cache_key: str | None = Field(None, max_length=1024)
    # Codex CLI's (x-codex-installation-id, ...): about the client, never about the answer;
    # kept with the answer's record (generation.response.client_metadata).
    client_metadata: dict[str, str] | None = None
    # Refused by name: accepted-and-ignored would mislead the client.
    top_logprobs: Any = None
    max_tool_calls: Any = None
    prompt: Any = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None
    conversation: Any = None
    context_management: Any = None
    moderation: Any = None
    image: Any = None
    access_programs: Any = None
    background_options: Any = None

    @field_validator("metadata", "client_metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > METADATA_PAIRS:
            raise ValueError(f"at most {METADATA_PAIRS} pairs; got {len(value)}")
        for key, text in value.items():
            if len(key) > METADATA_KEY_CHARS:
                raise ValueError(f"key {key[:20]!r}... is over {METADATA_KEY_CHARS} characters")
            if len(text) > METADATA_VALUE_CHARS:
                raise ValueError(f"the value of {key!r} is over {METADATA_VALUE_CHARS} characters")
        return value

    @model_validator(mode="after")
    def _refusals(self) -> ResponsesRequest:
        refused = {
            "top_logprobs": "log-probabilities are sent by /v1/chat/completions (logprobs)",
            "max_tool_calls": "there are no hosted tools; a turn makes one call, or one per "
            "function with parallel_tool_calls",
            "prompt": "there are no stored prompt templates; send instructions and input",
            "prompt_cache_retention": "there is no prompt cache to keep",
            "prompt_cache_options": "there is no prompt cache",
            "conversation": "OpenAI's conversation objects are not kept; continue with "
            "previous_response_id (whetstone's conversations: GET /v1/conversations)",
            "context_management": "there is no compaction: the conversation must fit the "
            "context window",
            "moderation": "there is no moderation model",
            "image": "whetstone answers in text",
            "access_programs": "there are no access programs",
            "background_options": "responses are not run in the background",
        }
        refuse_present(self, refused)
        if self.background:
            refuse("background", "a response is generated while the request waits (or streams)")
        if self.truncation not in (None, "disabled"):
            refuse(
                "truncation",
                f"{self.truncation!r}: a conversation longer than the context window is "
                "refused, never cut (truncation 'disabled')",
            )
        for value in self.include or []:
            if value != ENCRYPTED:
                refuse("include", f"{value!r}: only {ENCRYPTED!r} is sent on request")
        return self

    def wants_encrypted(self) -> bool:
        return ENCRYPTED in (self.include or [])
