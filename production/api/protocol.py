"""What whetstone's routes read and answer, as pydantic models: the request bodies of its own
routes, the body each route answers with, and the error object. The routes name them as
their response models, so /openapi.json documents what is really sent; the OpenAI request
bodies are in production.api.openai_schema.

The answers mirror the JSON the routes have always sent, key for key and in that order:

- A key sent only sometimes is typed `... | MISSING` (pydantic leaves it out of the JSON
  while it holds MISSING); a key always sent, even as null or a constant, has no default,
  so the schema says it is required.
- Response models forbid unknown keys and are strict (no "3" taken for 3, nor true for 1):
  a view in data/views.py that grows a key, or hands a value of another type, fails loudly
  instead of having it dropped or converted on the way out.
- What other modules own and describe (the daemon's run/daemon.json, the recipe search's
  summary, a candidate's metrics) stays an open JSON object here.

Torch-free (the import-linter contract chat-torch-free): the request handling and its
tests read these without loading a model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import MISSING, BaseModel, ConfigDict

# A JSON object whose keys another module owns.
JsonObject = dict[str, Any]


# --- request bodies of whetstone's own routes ---------------------------------------------


class FeedbackRequest(BaseModel):
    """POST /v1/feedback."""

    model_config = ConfigDict(extra="forbid")
    message_id: str
    # Kept as sent: the store's validation names what is wrong with each value.
    rating: Any = None
    correction: Any = None
    comment: Any = None


class ConversationPatch(BaseModel):
    """PATCH /v1/conversations/{id}: only the fields sent change (null clears one)."""

    model_config = ConfigDict(extra="forbid")
    title: str | None = None
    system_prompt: str | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None


class MemoryRequest(BaseModel):
    """POST /v1/memory: a note written by hand (the question it answers is optional)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    text: str
    question: str | None = None


class MemorySwitch(BaseModel):
    """PATCH /v1/memory: the memory on or off (memory.enabled, kept in config.toml)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    enabled: bool


class PromoteRequest(BaseModel):
    """POST /v1/candidates/{id}/promote (the body is optional)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    force: bool = False  # promote without a passing evaluation (integrity is still checked)


class TrainRequest(BaseModel):
    """POST /v1/train: what `whetstone train [--profile P] [--force] [--no-promote]` does."""

    model_config = ConfigDict(extra="forbid", strict=True)
    profile: str | None = None  # None: training.default_profile
    force: bool = False
    promote: bool = True


# --- answers ------------------------------------------------------------------------------


class Answer(BaseModel):
    """A response body: exactly these keys, each value as the route made it."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorDetail(Answer):
    message: str
    type: Literal["invalid_request_error", "server_error"]  # server_error: status >= 500
    param: str | None  # the parameter at fault, when one is
    code: str  # what went wrong, per status (errors.py)


class Error(Answer):
    """Every error, whatever sends it (a route, a handler, a guard, a stream that fails): the
    shape of OpenAI's errors."""

    error: ErrorDetail


class Health(Answer):
    status: Literal["ok"]
    adapter_id: str | None  # null: the base model serves


class ModelCard(Answer):
    """A name a request may use; each is an alias of what serves now."""

    id: str
    object: Literal["model"]
    created: int  # when this worker started
    owned_by: str
    adapter_id: str | None
    current: Literal[True] | MISSING = MISSING  # sent when an adapter serves


class ModelList(Answer):
    object: Literal["list"]
    data: list[ModelCard]


class GpuMemory(Answer):
    """This worker's GPU memory now and at its peak, GiB."""

    allocated_gib: float
    peak_gib: float
    reserved_gib: float
    limit_gib: float | None  # devices.memory_limit_gb
    card_gib: float


class RunningRun(Answer):
    id: str
    profile: str
    trigger: str
    progress: JsonObject


class LastRun(Answer):
    """How the newest finished run ended (data.views.run_outcome)."""

    id: str
    status: str
    profile: str
    trigger: str
    reason: str | None  # why it was skipped
    error: str | None
    candidate_id: str | None
    created_at: str
    # Sent when its candidate was evaluated: the gate's decision and what to do next.
    decision: str | MISSING = MISSING
    rule: str | MISSING = MISSING
    gate_reason: str | MISSING | None = MISSING
    next_step: str | MISSING | None = MISSING
    promoted: bool | MISSING = MISSING  # sent when the run made a candidate


class LastPromotion(Answer):
    action: str
    candidate_id: str | None  # null: back to the base model
    previous_id: str | None
    reason: str | None
    created_at: str


class PromptCache(Answer):
    """The kept conversation cache since the worker started (server.prompt_cache)."""

    enabled: bool
    requests: int
    hits: int  # requests that reused a kept prefix
    reused_tokens: int  # prompt tokens read from the cache
    prefilled_tokens: int  # prompt tokens computed


class Status(Answer):
    """GET /v1/status: this worker, then the daemon and training (orchestrator.status)."""

    run_state: Literal["running"]
    base_model: str
    backend: str
    decode: str
    device: str
    chat_format: str
    adapter_id: str | None
    adapter_loaded_at: str
    last_swap_error: str | None  # the adapter last refused, and why
    queue_waiting: int
    busy: bool
    requests_served: int
    started_at: str
    uptime_s: float
    context_window: int
    prompt_cache: PromptCache
    gpu_memory: GpuMemory | None  # null on the CPU
    # The supervising daemon's run/daemon.json (schedule, device plan, running job, recent
    # errors); null when this worker runs alone (`whetstone serve`).
    daemon: JsonObject | None
    running_run: RunningRun | None
    last_run: LastRun | None
    last_promotion: LastPromotion | None
    feedback_until_run: int | None  # ratings or corrections still to come (null: off)
    recipe: JsonObject  # the recipe the nightly run uses and the search's progress


class Reload(Answer):
    """POST /admin/reload: what serves after syncing with `current`."""

    adapter_id: str | None
    previous: str | MISSING | None = MISSING  # sent when it changed
    changed: bool
    seconds: float | MISSING = MISSING  # how long the swap took, when it changed


class CandidateRow(Answer):
    """One candidate folder (orchestrator.promotion.candidate_row)."""

    id: str
    current: bool
    previous: bool
    valid: bool
    error: str | None  # why the folder is not a usable adapter
    created_at: str | None
    base_model: str | None
    status: str | None
    decision: str | None  # the latest evaluation's
    rule: str | None
    reason: str | None
    scores: JsonObject  # the candidate's own numbers from that evaluation
    metrics: JsonObject  # from its meta.json (training's)


class CandidateList(Answer):
    data: list[CandidateRow]  # newest first


class CandidateDetail(CandidateRow):
    """GET /v1/candidates/{id}: the row and its evaluation report, once written."""

    report_markdown: str | None
    report_html_path: str | None
    report_html_url: str | None


class Swap(Answer):
    """What a promotion or a rollback made current, and what serves now."""

    current: str | None  # null: the base model
    previous: str | None
    serving: str | None


class TrainStarted(Answer):
    run_id: str
    profile: str
    queued_with_daemon: bool  # false: the run's process was started by this worker
    log: str


class Feedback(Answer):
    """The feedback row stored (a submission carries over the fields it does not set)."""

    id: str
    message_id: str
    rating: int | None
    correction: str | None
    comment: str | None
    created_at: str


class TrendDay(Answer):
    day: str
    adapter_id: str | None
    answers: int
    mean_rating: float | None
    corrected_share: float
    regenerations: int
    median_ttft_s: float | None
    tokens_per_s: float | None


class TrendConversations(Answer):
    day: str
    conversations: int
    turns_per_conversation: float | None
    tokens_per_conversation: float | None


class TrendEvent(Answer):
    at: str
    action: str
    candidate_id: str | None
    previous_id: str | None
    forced: bool


class Trend(Answer):
    """GET /v1/trend: `whetstone trend --json`, plus its text table."""

    since: str
    until: str
    days: list[TrendDay]  # per day and adapter
    conversations: list[TrendConversations]
    events: list[TrendEvent]  # promotions and rollbacks
    champions: list[JsonObject]  # at, candidate_id and the tracked scores it had
    weeks: int
    text: str


class ConversationSummary(Answer):
    id: str
    title: str | None
    system_prompt: str | None
    reasoning_effort: str | None
    created_at: str
    updated_at: str
    message_count: int | None  # null where the query did not count them


class SearchHit(ConversationSummary):
    snippet: str  # the text that matched
    highlights: list[list[int]]  # [start, end) of each matched word in the snippet


class ConversationList(Answer):
    data: list[ConversationSummary]  # newest first


class SearchResults(Answer):
    data: list[SearchHit]


class MessageFeedback(Answer):
    rating: int | None
    correction: str | None
    comment: str | None


class StoredMessage(Answer):
    id: str
    role: str
    content: str
    reasoning: str | None
    reply_to_id: str | None  # an answer's prompt
    adapter_id: str | None
    finish_reason: str | None  # null while it is being written
    completion_tokens: int | None
    latency_ms: float | None
    created_at: str
    feedback: MessageFeedback | None


class Conversation(ConversationSummary):
    messages: list[StoredMessage]  # in order; regenerated answers share a reply_to_id


class Forgotten(Answer):
    id: str
    forgotten: Literal[True]


class Note(Answer):
    """A note of the memory (GET/POST /v1/memory)."""

    id: str
    question: str | None  # the question it answers (null: written without one)
    text: str
    source_message_id: str | None  # the corrected answer (null: written by hand)
    adapter_id: str | None  # the adapter that answered wrong (null: the base model, or none)
    status: Literal["active", "learned"]  # learned: the adapter knows it, not injected
    created_at: str
    updated_at: str


class NoteList(Answer):
    data: list[Note]  # newest first
    enabled: bool  # memory.enabled: whether notes are given to the model


class MemoryState(Answer):
    """PATCH /v1/memory: whether notes are given to the model from now on."""

    enabled: bool


class Imported(Answer):
    """POST /v1/import: what `whetstone import FILE --json` prints."""

    source: Literal["chatgpt", "openwebui", "jsonl"]
    conversations: int  # imported now
    messages: int
    feedback: int  # rated and kept answers, recorded as ratings
    already_imported: int  # conversations imported before: skipped


# --- OpenAI's completion answers ----------------------------------------------------------


class PromptTokensDetails(Answer):
    cached_tokens: int  # read from the kept conversation cache, not prefilled


class Usage(Answer):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ToolCallFunction(Answer):
    name: str
    arguments: str  # JSON text


class ToolCall(Answer):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class AssistantMessage(Answer):
    role: Literal["assistant"]
    content: str | None  # null when the answer is only tool calls
    tool_calls: list[ToolCall] | MISSING = MISSING  # sent when the model called tools
    reasoning_content: str | MISSING = MISSING  # sent with include_reasoning


class TopLogprob(Answer):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Answer):
    content: list[TokenLogprob]
    refusal: None


class ChatChoice(Answer):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None  # with logprobs: true
    finish_reason: Literal["stop", "length", "tool_calls"]


class TextLogprobs(Answer):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class TextChoice(Answer):
    index: int
    text: str
    logprobs: TextLogprobs | None  # with logprobs: N
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletion(Answer):
    """POST /v1/chat/completions without stream (stream: true sends chat.completion.chunk
    events instead, as OpenAI does)."""

    id: str  # the stored answer's message id
    created: int
    model: str
    system_fingerprint: str  # whetstone-<adapter id>, or whetstone-base
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage
    adapter_id: str | None  # the adapter that answered (null: the base model)
    conversation_id: str  # the stored conversation it joined
    # The ids of the notes given to the model; sent only with memory.enabled.
    memory_notes: list[str] | MISSING = MISSING


class TextCompletion(Answer):
    """POST /v1/completions without stream."""

    id: str
    created: int
    model: str
    system_fingerprint: str
    object: Literal["text_completion"]
    choices: list[TextChoice]
    usage: Usage
    adapter_id: str | None
    conversation_id: str


# --- OpenAI's Responses API ---------------------------------------------------------------


class OutputText(Answer):
    type: Literal["output_text"]
    text: str
    annotations: list[JsonObject]  # always empty: no citations
    logprobs: list[JsonObject]  # always empty: /v1/chat/completions sends log-probabilities


class OutputMessage(Answer):
    """The answer's text: its id is the stored answer's message id (rate it by that id)."""

    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class ReasoningText(Answer):
    type: Literal["reasoning_text"]
    text: str


class SummaryText(Answer):
    type: Literal["summary_text"]
    text: str  # the reasoning itself: there is no summariser model


class ReasoningItem(Answer):
    """A harmony model's analysis channel, as text; with reasoning.summary (auto or
    detailed) the same text as its one summary part; with include
    reasoning.encrypted_content the text signed (production.api.reasoning_token), which a
    later request sends back in its place."""

    id: str
    type: Literal["reasoning"]
    status: Literal["in_progress", "completed", "incomplete"]
    summary: list[SummaryText]  # empty unless reasoning.summary was asked
    content: list[ReasoningText]
    encrypted_content: str | MISSING = MISSING


class FunctionCallItem(Answer):
    id: str
    type: Literal["function_call"]
    status: Literal["in_progress", "completed", "incomplete"]
    call_id: str  # what the function_call_output answering it names
    name: str
    arguments: str  # JSON text, valid against the function's parameters


class InputTokensDetails(Answer):
    cached_tokens: int  # read from the kept conversation cache (0 for answers before it)
    cache_write_tokens: int  # 0: the cache is kept without a write step


class OutputTokensDetails(Answer):
    reasoning_tokens: int  # the analysis text's tokens


class ResponseUsage(Answer):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseError(Answer):
    code: Literal["server_error"]
    message: str


class IncompleteDetails(Answer):
    reason: Literal["max_output_tokens", "cancelled"]


class ResponseReasoning(Answer):
    effort: Literal["low", "medium", "high"] | None
    summary: Literal["auto", "detailed"] | None  # as asked


class ResponseObject(Answer):
    """POST /v1/responses without stream, and GET /v1/responses/{id}: OpenAI's response
    object. stream: true sends its events instead (response.created ... response.completed),
    each event's response in this shape."""

    id: str  # resp_<hex>: the stored answer is msg_<hex> (X-Whetstone-Message-Id)
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed", "cancelled"]
    background: Literal[False]
    error: ResponseError | None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    max_tool_calls: None
    model: str
    output: list[OutputMessage | ReasoningItem | FunctionCallItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: ResponseReasoning
    service_tier: Literal["default"]
    store: bool
    temperature: float | None
    text: JsonObject  # {"format": {...}} as asked
    tool_choice: str | JsonObject
    tools: list[JsonObject]  # the function tools as asked
    top_logprobs: None
    top_p: float | None
    truncation: Literal["disabled"]
    usage: ResponseUsage | None  # null while it is being generated
    user: str | None
    safety_identifier: str | None
    metadata: dict[str, str]
    prompt_cache_key: str | None  # as asked: kept and shown, it changes no answer
    adapter_id: str | None  # the adapter that answered (null: the base model)
    conversation_id: str  # the stored conversation it joined
    # The ids of the notes given to the model; sent only with memory.enabled.
    memory_notes: list[str] | MISSING = MISSING
