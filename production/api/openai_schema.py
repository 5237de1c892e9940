"""The OpenAI request bodies whetstone takes: chat completions and completions.

Every parameter the openai SDK can send is declared here, and each is either honoured or
refused by name (a 400 with `param` set); unknown parameters are refused too (`extra="forbid"`)
so nothing a client relies on is silently dropped. README.md's API section lists each one.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from data.errors import InvalidInput
from data.validation import unencodable

# OpenAI's bound on top_logprobs.
MAX_TOP_LOGPROBS = 20


def _storable(value: str) -> str:
    """Text the store (UTF-8) and the tokenizer can take: no lone surrogates."""
    try:
        unencodable("text", value)
    except InvalidInput as exc:
        raise ValueError(str(exc).removeprefix("text ")) from None
    return value


class Refused(ValueError):
    """A known OpenAI parameter whetstone does not support: refused by name."""


def refuse(name: str, why: str) -> None:
    raise ValueError(f"{name} is not supported: {why}")


def refuse_present(request: BaseModel, refused: dict[str, str]) -> None:
    """Refuse the first of `refused` (parameter: why) that `request` was sent with."""
    for name, why in refused.items():
        if getattr(request, name) is not None:
            refuse(name, why)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str

    _check_text = field_validator("text")(_storable)


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _json(cls, value: str) -> str:
        try:
            json.loads(value)
        except ValueError:
            raise ValueError("must be a JSON text (OpenAI sends arguments as a string)") from None
        return value


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=64)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    # An assistant turn's reasoning, as answers send it (include_reasoning): a harmony prompt
    # keeps the analysis that came before a tool call and drops the rest (as GPT-OSS's
    # template does); other formats never show earlier reasoning to the model.
    reasoning_content: str | None = None
    # What the SDK echoes back when a client appends a response's message: accepted empty.
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: Any = None
    function_call: Any = None

    @field_validator("content")
    @classmethod
    def _check_content(cls, value: Any) -> Any:
        return _storable(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _per_role(self) -> ChatMessage:
        if self.audio is not None or self.function_call is not None:
            refuse("audio" if self.audio is not None else "function_call", "use tool_calls")
        if self.role == "assistant":
            if self.content is None and not self.tool_calls:
                raise ValueError("an assistant message needs content or tool_calls")
        elif self.tool_calls:
            raise ValueError(f"tool_calls belong to assistant messages, not {self.role}")
        elif self.reasoning_content is not None:
            raise ValueError(f"reasoning_content belongs to assistant messages, not {self.role}")
        if self.role == "tool":
            if not self.tool_call_id:
                raise ValueError("a tool message needs the tool_call_id it answers")
        elif self.tool_call_id is not None:
            raise ValueError(f"tool_call_id belongs to tool messages, not {self.role}")
        elif self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.name is not None and self.role != "tool":
            refuse("name", "whetstone serves one person; put names in the content")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: Literal[False] | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self


class _Sampling(BaseModel):
    """The parameters chat and completions share."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's; vLLM and llama.cpp take it
    max_tokens: int | None = Field(None, ge=1)
    # torch seeds are 64-bit: the range torch.manual_seed takes.
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    n: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # recorded with the answer
    safety_identifier: str | None = None  # recorded with the answer
    service_tier: Literal["auto", "default"] | None = None

    @field_validator("n")
    @classmethod
    def _one(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only n = 1 is supported: one model answers one request at a time")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("a stop sequence cannot be empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit():
                raise ValueError(f"keys are token ids; {token!r} is not one")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases are -100..100; token {token} has {bias}")
        return value

    def recorded(self) -> dict[str, Any]:
        """What the stored answer keeps beyond the resolved sampling settings."""
        names = ("presence_penalty", "frequency_penalty", "logit_bias", "user", "safety_identifier")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    modalities: list[Literal["text"]] | None = None
    # Refused by name: accepted-and-ignored would mislead the client.
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    functions: Any = None
    function_call: Any = None
    verbosity: Any = None
    prompt_cache_key: Any = None
    prompt_cache_retention: Any = None
    # whetstone's own
    include_reasoning: bool = False
    conversation_id: str | None = None
    regenerate: bool = False
    # None: the config's memory.enabled; false: no notes for this request (what the adapter
    # alone answers); true while the memory is off is refused (prepare_chat).
    memory: bool | None = None

    @field_validator("messages")
    @classmethod
    def _shape(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        for index, message in enumerate(messages):
            if message.role in ("system", "developer") and index != 0:
                raise ValueError(f"messages[{index}]: a system message may only come first")
        if messages[-1].role not in ("user", "tool"):
            raise ValueError("the last message must be the user's (role 'user') or a tool result")
        calls: dict[str, str] = {}
        for index, message in enumerate(messages):
            for call in message.tool_calls or []:
                calls[call.id] = call.function.name
            if message.role == "tool" and message.tool_call_id not in calls:
                raise ValueError(
                    f"messages[{index}]: tool_call_id {message.tool_call_id!r} answers no "
                    "tool call of an earlier assistant message"
                )
        return messages

    @model_validator(mode="after")
    def _refusals(self) -> ChatRequest:
        refused = {
            "audio": "whetstone answers in text",
            "prediction": "predicted outputs need speculative decoding, which is not built",
            "web_search_options": "there is no web search",
            "functions": "use tools (functions was replaced by tools)",
            "function_call": "use tool_choice (function_call was replaced by tool_choice)",
            "verbosity": "the model has no verbosity control; ask in the prompt",
            "prompt_cache_key": "there is no prompt cache to route",
            "prompt_cache_retention": "there is no prompt cache to keep",
        }
        refuse_present(self, refused)
        if self.store is False:
            refuse(
                "store",
                "whetstone keeps every exchange to learn from (forget one with "
                "DELETE /v1/conversations/ID)",
            )
        if self.metadata:
            refuse("metadata", "answers carry no metadata; use conversation titles")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice is not None and not self.tools:
            raise ValueError("tool_choice needs tools")
        if self.parallel_tool_calls is not None and not self.tools:
            raise ValueError("parallel_tool_calls needs tools")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice.function.name not in names:
                raise ValueError(
                    f"tool_choice names {self.tool_choice.function.name!r}, which is not one of "
                    f"the tools ({', '.join(names)})"
                )
        if self.tools:
            names = [t.function.name for t in self.tools]
            if len(set(names)) != len(names):
                raise ValueError("tools: two functions have the same name")
            uses_tools = self.tool_choice != "none"
            if uses_tools and self.response_format and self.response_format.type != "text":
                raise ValueError(
                    "response_format with tools: a tool call and a JSON answer cannot both "
                    "constrain one answer; set tool_choice 'none' or drop response_format"
                )
        return self


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("one prompt per request (a list of exactly one string)")
        return value

    @model_validator(mode="after")
    def _refusals(self) -> CompletionRequest:
        if self.echo:
            refuse("echo", "the prompt's own log-probabilities are not computed")
        if self.suffix:
            refuse("suffix", "fill-in-the-middle needs a model trained for it")
        if self.best_of not in (None, 1):
            refuse("best_of", "one model answers one request at a time (best_of = 1)")
        return self

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]
