"""The Responses API as its clients use it: the openai SDK (`client.responses.create`,
`.stream`, `.parse`, `.retrieve`) against a real server on 127.0.0.1, on the embedded model
and on a tiny random GPT-OSS (harmony: reasoning effort, analysis as reasoning items, calls
on the commentary channel). And POST /v1/import, the CLI's import over HTTP.

Every exchange is checked where it is stored: a conversation like a chat, its answer the
response's message, rated by the response id or the message id."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from data.store import Store
from tests.conftest import ServerProcess, link_model
from tests.tiny_models import model_home, tiny_gpt_oss, tiny_llama

pytestmark = pytest.mark.slow

FILES = Path(__file__).with_name("import_files")
PARIS = "What is the capital of France?"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
TIME = {
    "type": "function",
    "name": "get_time",
    "description": "The local time in a timezone",
    "parameters": {
        "type": "object",
        "properties": {"timezone": {"type": "string", "enum": ["UTC", "CET"]}},
        "required": ["timezone"],
        "additionalProperties": False,
    },
}
PLACE = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, prepared_model_dir: Path):
    home = link_model(tmp_path_factory.mktemp("responses") / "home", prepared_model_dir)
    proc = ServerProcess(home).wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(served: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)


def stored(home: Path, response_id: str):
    """The stored answer of a response and its conversation."""
    message_id = "msg_" + response_id.removeprefix("resp_")
    with Store(f"sqlite:///{home}/whetstone.db") as store:
        message = store.get_message(message_id)
        return message, store.get_conversation(message.conversation_id)


SDK_ONLY = ("parsed", "parsed_arguments")


def unparsed(dumped: object) -> object:
    """A response's dump less the `parsed` fields the SDK's stream helper adds."""
    if isinstance(dumped, dict):
        return {k: unparsed(v) for k, v in dumped.items() if k not in SDK_ONLY}
    if isinstance(dumped, list):
        return [unparsed(v) for v in dumped]
    return dumped


def conversation_count(url: str) -> int:
    return len(httpx.get(f"{url}/v1/conversations", params={"limit": 500}).json()["data"])


def test_a_response_whole_and_streamed_is_the_stored_answer(
    client: openai.OpenAI, served: ServerProcess
) -> None:
    whole = client.responses.create(
        model="whetstone", input=PARIS, max_output_tokens=30, temperature=0
    )
    assert whole.status == "completed" and whole.object == "response"
    assert "Paris" in whole.output_text
    (item,) = whole.output
    assert item.type == "message" and item.status == "completed"
    assert whole.usage.output_tokens > 0 and whole.usage.input_tokens > 0
    assert whole.usage.total_tokens == whole.usage.input_tokens + whole.usage.output_tokens
    assert (whole.max_output_tokens, whole.temperature, whole.store) == (30, 0.0, True)

    with client.responses.stream(
        model="whetstone", input=PARIS, max_output_tokens=30, temperature=0
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == final.output_text == whole.output_text
    assert final.id == events[0].response.id
    details = {"input_tokens_details"}
    assert final.usage.model_dump(exclude=details) == whole.usage.model_dump(exclude=details)
    # The same input again: the worker's kept cache holds all of it but the last token.
    cached = final.usage.input_tokens_details.cached_tokens
    assert cached == whole.usage.input_tokens - 1

    # Stored as a chat is: the response is its answer's message; GET reads it back.
    for response in (whole, final):
        message, conversation = stored(served.home, response.id)
        assert message.content == response.output_text and message.finish_reason == "stop"
        assert response.output[0].id == message.id
        assert [m.role for m in conversation.messages] == ["user", "assistant"]
        assert conversation.messages[0].content == PARIS
        assert message.generation["endpoint"] == "responses"
        again = client.responses.retrieve(response.id)
        assert unparsed(again.model_dump()) == unparsed(response.model_dump())
    listed = httpx.get(f"{served.url}/v1/conversations").json()["data"]
    assert {conversation.id, whole.model_extra["conversation_id"]} <= {c["id"] for c in listed}

    cut = client.responses.create(model="whetstone", input=PARIS, max_output_tokens=3)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 3


def test_the_exchange_is_ratable_by_its_response_or_message_id(
    client: openai.OpenAI, served: ServerProcess
) -> None:
    response = client.responses.create(
        model="whetstone", input="Name a colour.", max_output_tokens=12, temperature=0
    )
    by_response = httpx.post(
        f"{served.url}/v1/feedback", json={"message_id": response.id, "rating": 2}
    )
    assert by_response.status_code == 200, by_response.text
    message_id = response.output[0].id
    assert by_response.json()["message_id"] == message_id
    corrected = httpx.post(
        f"{served.url}/v1/feedback", json={"message_id": message_id, "correction": "Blue."}
    )
    assert corrected.status_code == 200 and corrected.json()["rating"] == 2
    conversation = httpx.get(
        f"{served.url}/v1/conversations/{response.model_extra['conversation_id']}"
    ).json()
    answer = conversation["messages"][-1]
    assert answer["id"] == message_id
    assert answer["feedback"] == {"rating": 2, "correction": "Blue.", "comment": None}
    unknown = httpx.post(
        f"{served.url}/v1/feedback", json={"message_id": "resp_0000000000000000", "rating": 2}
    )
    assert unknown.status_code == 404


def test_previous_response_id_continues_the_conversation(
    client: openai.OpenAI, served: ServerProcess
) -> None:
    first = client.responses.create(
        model="whetstone",
        instructions="You are terse.",
        input="My cat is called Miso.",
        max_output_tokens=16,
        temperature=0,
    )
    second = client.responses.create(
        model="whetstone",
        instructions="You are terse.",
        input="What is my cat called?",
        previous_response_id=first.id,
        max_output_tokens=16,
        temperature=0,
    )
    assert second.previous_response_id == first.id
    conversation_id = first.model_extra["conversation_id"]
    assert second.model_extra["conversation_id"] == conversation_id
    _, conversation = stored(served.home, second.id)
    assert [(m.role, m.content) for m in conversation.messages] == [
        ("user", "My cat is called Miso."),
        ("assistant", first.output_text),
        ("user", "What is my cat called?"),
        ("assistant", second.output_text),
    ]
    assert conversation.system_prompt == "You are terse."
    # The second prompt holds the first exchange.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens

    # From the first answer again: a branch, in a conversation of its own with that history.
    branch = client.responses.create(
        model="whetstone",
        instructions="You are terse.",
        input="Is Miso a good name?",
        previous_response_id=first.id,
        max_output_tokens=8,
        temperature=0,
    )
    assert branch.model_extra["conversation_id"] != conversation_id
    _, forked = stored(served.home, branch.id)
    assert [m.content for m in forked.messages[:3]] == [
        "My cat is called Miso.",
        first.output_text,
        "Is Miso a good name?",
    ]
    _, original = stored(served.home, second.id)
    assert len(original.messages) == 4  # untouched

    # Not kept for the Responses API: store false; unknown and forgotten ids.
    unstored = client.responses.create(
        model="whetstone", input="Hi", store=False, max_output_tokens=4, temperature=0
    )
    assert unstored.store is False
    for missing in (unstored.id, "resp_0000000000000000", "nonsense"):
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(missing)
        with pytest.raises(openai.NotFoundError) as refused:
            client.responses.create(
                model="whetstone", input="Hi", previous_response_id=missing, max_output_tokens=2
            )
        assert refused.value.body["param"] == "previous_response_id"
    # Its conversation is kept, as every exchange is.
    assert stored(served.home, unstored.id)[0].content == unstored.output_text
    httpx.delete(f"{served.url}/v1/conversations/{conversation_id}")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)


def test_a_forced_function_call_then_its_output_is_answered(
    client: openai.OpenAI, served: ServerProcess
) -> None:
    called = client.responses.create(
        model="whetstone",
        input="What's the weather in Paris?",
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=60,
        temperature=0,
    )
    assert called.status == "completed"
    (call,) = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    assert [t.name for t in called.tools] == ["get_weather", "get_time"]

    answered = client.responses.create(
        model="whetstone",
        previous_response_id=called.id,
        input=[
            {
                "type": "function_call_output",
                "call_id": call.call_id,
                "output": '{"sky": "sunny", "temp_c": 21}',
            }
        ],
        tools=[WEATHER, TIME],
        max_output_tokens=30,
        temperature=0,
    )
    assert answered.status in ("completed", "incomplete") and answered.output
    message, conversation = stored(served.home, answered.id)
    assert [m.role for m in conversation.messages] == ["user", "assistant", "tool", "assistant"]
    first, tool = conversation.messages[1:3]
    assert first.finish_reason == "tool_calls"
    assert first.tool_calls[0]["function"] == {"name": "get_weather", "arguments": call.arguments}
    assert tool.tool_call_id == call.call_id and "sunny" in tool.content
    assert message.reply_to_id == tool.id
    assert message.generation["tools"][0]["function"]["name"] == "get_weather"

    # Named, streamed: the call comes as an item, its arguments whole in one delta.
    with client.responses.stream(
        model="whetstone",
        input="What's the weather in Paris?",
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "name": "get_time"},
        parallel_tool_calls=False,
        max_output_tokens=60,
        temperature=0,
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    (streamed_call,) = [item for item in final.output if item.type == "function_call"]
    assert streamed_call.name == "get_time"
    assert json.loads(streamed_call.arguments)["timezone"] in ("UTC", "CET")
    (delta,) = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert delta.delta == streamed_call.arguments
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done.arguments == streamed_call.arguments and done.item_id == streamed_call.id
    # A call whose output never came cannot be answered.
    with pytest.raises(openai.BadRequestError) as orphan:
        client.responses.create(
            model="whetstone",
            input=[{"type": "function_call_output", "call_id": "call_nope", "output": "{}"}],
            max_output_tokens=2,
        )
    assert orphan.value.body["param"] == "input"
    assert "input[0].call_id" in orphan.value.body["message"]


def test_text_format_json_schema_answers_valid_json(client: openai.OpenAI) -> None:
    from pydantic import BaseModel

    answer = client.responses.create(
        model="whetstone",
        input=PARIS + " Answer in JSON.",
        text={"format": {"type": "json_schema", "name": "place", "schema": PLACE, "strict": True}},
        max_output_tokens=40,
        temperature=0,
    )
    place = json.loads(answer.output_text)
    assert set(place) == {"city", "country"} and place["city"] == "Paris"
    assert answer.text.format.type == "json_schema"

    class Place(BaseModel):
        city: str
        country: str

    parsed = client.responses.parse(
        model="whetstone",
        input=PARIS + " Answer in JSON.",
        text_format=Place,
        max_output_tokens=40,
        temperature=0,
    )
    assert parsed.output_parsed.city == "Paris"
    anything = client.responses.create(
        model="whetstone",
        input="Describe a cat.",
        text={"format": {"type": "json_object"}},
        max_output_tokens=60,
        temperature=0,
    )
    assert anything.status == "completed"
    assert isinstance(json.loads(anything.output_text), dict)
    with pytest.raises(openai.BadRequestError) as unenforced:
        client.responses.create(
            model="whetstone",
            input=PARIS,
            text={
                "format": {
                    "type": "json_schema",
                    "name": "x",
                    "schema": {"type": "array", "uniqueItems": True},
                }
            },
        )
    assert unenforced.value.body["param"] == "text.format"
    assert "`uniqueItems` at /" in unenforced.value.body["message"]


def codex_tools() -> list[dict]:
    """Function tools as Codex declares them (strict false; an enum: a random model writes
    a free string until max_output_tokens)."""
    return [
        {
            "type": "function",
            "name": name,
            "description": description,
            "strict": False,
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string", "enum": ["README.md", "src"]}},
                "required": ["path"],
                "additionalProperties": False,
            },
        }
        for name, description in (("list_dir", "List a folder"), ("read_file", "Read a file"))
    ]


def codex_request(items: list, tool_choice: str = "auto") -> dict:
    """The body Codex CLI sends (codex-rs ResponsesApiRequest) for a model configured with
    model_supports_reasoning_summaries = true: instructions, the whole input, function
    tools, tool_choice auto, parallel_tool_calls false (gpt-oss), reasoning with effort and
    summary auto, store false, stream, include reasoning.encrypted_content, prompt_cache_key
    (its thread id), client_metadata. Added for the test only: max_output_tokens and
    temperature (a tiny random model would run on), and tool_choice required where the
    round must call (a random model does not choose a tool)."""
    return dict(
        model="whetstone",
        instructions="You are Codex, a coding agent. Use the tools to look at the project.",
        input=items,
        tools=codex_tools(),
        tool_choice=tool_choice,
        parallel_tool_calls=False,
        reasoning={"effort": "low", "summary": "auto"},
        store=False,
        include=["reasoning.encrypted_content"],
        prompt_cache_key="019a5c7e-codex-thread",
        extra_body={"client_metadata": {"x-codex-installation-id": "install-1"}},
        max_output_tokens=160,
        temperature=0,
    )


def as_codex_sends(item) -> dict:
    """An output item as Codex serialises it back into the next input (codex-rs
    protocol ResponseItem): no ids or status; a reasoning item's summary and
    encrypted_content, its reasoning_text content left out."""
    if item.type == "reasoning":
        return {
            "type": "reasoning",
            "summary": [s.model_dump() for s in item.summary],
            "encrypted_content": item.encrypted_content,
        }
    if item.type == "function_call":
        return {k: getattr(item, k) for k in ("type", "name", "arguments", "call_id")}
    return {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": part.text} for part in item.content],
    }


def test_a_codex_style_loop_streams_through_the_sdk_helper(harmony: ServerProcess) -> None:
    """Codex's requests on GPT-OSS (harmony): a developer and an environment message, then
    several call / output round trips, streamed, store false, the whole input sent each
    time with the reasoning items fed back by their encrypted_content: every stream parses
    with the SDK's helper, each reasoning item comes summarised and signed, and the rounds
    are one stored conversation."""
    client = openai.OpenAI(base_url=f"{harmony.url}/v1", api_key="unused", max_retries=0)

    def text(role: str, said: str) -> dict:
        return {"type": "message", "role": role, "content": [{"type": "input_text", "text": said}]}

    items: list = [
        text(
            "developer", "<permissions instructions>Sandbox: read-only.</permissions instructions>"
        ),
        text("user", "<environment_context><cwd>/work/demo</cwd></environment_context>"),
        text("user", "What does the README of this project say?"),
    ]
    finals = []
    thoughts = 0
    for round_, choice in enumerate(["required", "required", "required", "auto"]):
        with client.responses.stream(**codex_request(items, choice)) as stream:
            events = list(stream)
        assert not [e for e in events if e.type in ("error", "response.failed")], events[-1]
        final = events[-1].response
        assert events[-1].type in ("response.completed", "response.incomplete"), round_
        finals.append(final)
        assert final.store is False and final.prompt_cache_key == "019a5c7e-codex-thread"
        calls = [item for item in final.output if item.type == "function_call"]
        if choice == "required":
            assert len(calls) == 1, (round_, final.output)
        for item in final.output:
            if item.type == "reasoning":
                thoughts += 1
                said = item.content[0].text
                assert [s.text for s in item.summary] == [said]
                assert item.encrypted_content
        items += [as_codex_sends(item) for item in final.output]
        items += [
            {"type": "function_call_output", "call_id": c.call_id, "output": f"README.md\n{i}"}
            for i, c in enumerate(calls)
        ]
    assert thoughts, "the model thought before some call: its reasoning went back signed"
    conversations = {f.model_extra["conversation_id"] for f in finals}
    assert len(conversations) == 1
    _, conversation = stored(harmony.home, finals[-1].id)
    assert [m.role for m in conversation.messages][-7:] == ["assistant", "tool"] * 3 + ["assistant"]
    assert len({f.id for f in finals}) == 4


def test_unsupported_and_unknown_parameters_are_refused_by_name(served: ServerProcess) -> None:
    refused = {
        "bogus": {"bogus": 1},
        "include": {"include": ["file_search_call.results"]},
        "prompt_cache_retention": {"prompt_cache_retention": "24h"},
        "background": {"background": True},
        "truncation": {"truncation": "auto"},
        "conversation": {"conversation": "conv_1"},
        "top_logprobs": {"top_logprobs": 2},
        "reasoning.effort": {"reasoning": {"effort": "minimal"}},
        "reasoning.summary": {"reasoning": {"summary": "concise"}},
        "text.verbosity": {"text": {"verbosity": "low"}},
        "tools": {"tools": [{"type": "web_search"}]},
        "tool_choice": {"tool_choice": "required"},
        "metadata": {"metadata": {str(i): "x" for i in range(17)}},
        "input": {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
        "max_output_tokens": {"max_output_tokens": 10**6},
        "model": {"model": "gpt-4"},
        "stream_options.include_obfuscation": {"stream_options": {"include_obfuscation": True}},
    }
    before = conversation_count(served.url)
    for param, body in refused.items():
        response = httpx.post(
            f"{served.url}/v1/responses",
            json={"model": "whetstone", "input": "Hi", "max_output_tokens": 2} | body,
        )
        assert response.status_code in (400, 404), (param, response.text)
        error = response.json()["error"]
        assert error["param"] == param, (param, error)
        assert isinstance(error["code"], str) and error["message"], error
    assert conversation_count(served.url) == before  # refused before anything was stored
    # Metadata within OpenAI's bounds is kept with the response.
    kept = httpx.post(
        f"{served.url}/v1/responses",
        json={"input": "Hi", "max_output_tokens": 2, "metadata": {"task": "demo"}},
    ).json()
    assert kept["metadata"] == {"task": "demo"}
    assert httpx.get(f"{served.url}/v1/responses/{kept['id']}").json()["metadata"] == {
        "task": "demo"
    }


def test_import_over_http(served: ServerProcess) -> None:
    url = f"{served.url}/v1/import"
    before = conversation_count(served.url)
    body = (FILES / "openwebui_chats.json").read_bytes()
    first = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
    assert first.status_code == 200, first.text
    assert first.json() == {
        "source": "openwebui",
        "conversations": 2,
        "messages": 7,
        "feedback": 3,
        "already_imported": 0,
    }
    again = httpx.post(url, content=body).json()
    assert (again["conversations"], again["already_imported"]) == (0, 2)
    jsonl = (FILES / "chats.jsonl").read_bytes()
    assert httpx.post(url, content=jsonl, params={"format": "jsonl"}).json()["feedback"] == 4
    assert conversation_count(served.url) == before + 5

    broken = jsonl.replace(b'"role": "user", "content": "Hi"', b'"role": "robot"')
    refused = httpx.post(url, content=broken)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == "body" and "line 2: messages[0]: role must be" in error["message"]
    wrong = httpx.post(url, content=body, params={"format": "csv"})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "format"
    assert conversation_count(served.url) == before + 5


def test_prompt_cache_key_is_kept_and_shown(client: openai.OpenAI, served: ServerProcess) -> None:
    """What Codex sends with every request: prompt_cache_key (its thread id, a routing hint
    that changes no answer: shown on the response and kept for GET), client_metadata (kept
    with the answer's record), and, configured for reasoning, reasoning.summary and include
    reasoning.encrypted_content: the embedded model writes no reasoning, so there is no
    reasoning item to summarise or sign, and the answer is the same as without them."""
    asked = dict(model="whetstone", input=PARIS, max_output_tokens=8, temperature=0)
    plain = client.responses.create(**asked)
    codex = client.responses.create(
        **asked,
        prompt_cache_key="019a-thread",
        reasoning={"summary": "auto"},
        include=["reasoning.encrypted_content"],
        extra_body={"client_metadata": {"x-codex-installation-id": "install-1"}},
    )
    assert codex.prompt_cache_key == "019a-thread"
    assert codex.output_text == plain.output_text
    assert [item.type for item in codex.output] == ["message"]
    assert codex.reasoning.summary == "auto"
    kept = client.responses.retrieve(codex.id)
    assert kept.prompt_cache_key == "019a-thread" and kept.reasoning.summary == "auto"
    assert plain.prompt_cache_key is None
    message, _ = stored(served.home, codex.id)
    assert message.generation["response"]["client_metadata"] == {
        "x-codex-installation-id": "install-1"
    }


# ------------------------------------------------------------------- harmony (GPT-OSS)


@pytest.fixture(scope="module")
def harmony(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("harmony-responses")
    # A window of 2048: Codex's loop resends the whole conversation (tools, every call,
    # output and analysis) each round; the tiny tokenizer spends about a token per byte.
    home = model_home(
        root / "home", tiny_gpt_oss(root / "model"), chat_format="harmony", max_seq_length=2048
    )
    proc = ServerProcess(home).wait_ready()
    yield proc
    proc.stop()


CITY = WEATHER | {
    "parameters": {
        "type": "object",
        # An enum: a random model writes a free string until max_tokens.
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
        "required": ["city"],
        "additionalProperties": False,
    }
}


def test_reasoning_effort_reaches_the_harmony_prompt(harmony: ServerProcess) -> None:
    """reasoning.effort is harmony's `Reasoning:` line: a response at an effort is the chat
    completion asked at that effort (same prompt tokens, same greedy reasoning and answer),
    and another effort makes another prompt. The analysis channel is the reasoning item,
    streamed as reasoning_text deltas, stored as the answer's reasoning. (A JSON answer: its
    grammar lets a harmony model think first, and this random one does.)"""
    client = openai.OpenAI(base_url=f"{harmony.url}/v1", api_key="unused", max_retries=0)
    ask = [{"role": "user", "content": "Tell me a story."}]

    def chat(effort: str) -> tuple[int, str, str]:
        answer = client.chat.completions.create(
            model="whetstone",
            messages=ask,
            reasoning_effort=effort,
            response_format={"type": "json_object"},
            temperature=0,
            max_tokens=64,
            extra_body={"include_reasoning": True},
        )
        message = answer.choices[0].message
        reasoning = message.model_extra.get("reasoning_content") or ""
        return answer.usage.prompt_tokens, message.content or "", reasoning

    body = {
        "model": "whetstone",
        "input": ask,
        "text": {"format": {"type": "json_object"}},
        "temperature": 0,
        "max_output_tokens": 64,
    }

    def said(r) -> tuple[int, str, str]:
        reasoning = "".join(
            part.text for item in r.output if item.type == "reasoning" for part in item.content
        )
        return r.usage.input_tokens, r.output_text, reasoning

    high = client.responses.create(**body, reasoning={"effort": "high"})
    low = client.responses.create(**body, reasoning={"effort": "low"})
    assert high.reasoning.effort == "high" and low.reasoning.effort == "low"
    assert said(high) == chat("high")
    assert said(low) == chat("low")
    assert said(high) != said(low), "the effort changes the prompt"
    reasoning = said(high)[2]
    assert reasoning, "the model thought first: a reasoning item"
    assert [item.type for item in high.output] == ["reasoning", "message"]
    assert high.output[0].id == "rs_" + high.id.removeprefix("resp_")
    assert high.usage.output_tokens_details.reasoning_tokens > 0
    message, _ = stored(harmony.home, high.id)
    assert message.generation["reasoning_effort"] == "high"
    assert message.reasoning == reasoning and message.content == high.output_text

    with client.responses.stream(**body, reasoning={"effort": "high"}) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert events[2].item.type == "reasoning"
    streamed = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert (streamed, text) == (reasoning, high.output_text)
    (done,) = [e for e in events if e.type == "response.reasoning_text.done"]
    assert done.text == reasoning
    assert events[-1].type == f"response.{high.status}"
    thought = events[-1].response.output[0]
    assert (thought.type, thought.content[0].text) == ("reasoning", reasoning)


def test_harmony_function_calls_on_the_commentary_channel(harmony: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{harmony.url}/v1", api_key="unused", max_retries=0)
    body = dict(
        model="whetstone",
        input="What's the weather in Paris?",
        tools=[CITY],
        tool_choice="required",
        reasoning={"effort": "low"},
        temperature=0,
        max_output_tokens=160,
    )
    called = client.responses.create(**body)
    (call,) = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather"
    assert json.loads(call.arguments)["city"] in ("Paris", "Rome")
    with client.responses.stream(**body) as stream:
        list(stream)
        final = stream.get_final_response()
    (streamed,) = [item for item in final.output if item.type == "function_call"]
    assert streamed.arguments == call.arguments
    answered = client.responses.create(
        model="whetstone",
        previous_response_id=called.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        tools=[CITY],
        temperature=0,
        max_output_tokens=8,
    )
    assert answered.output


JSON_THOUGHT = dict(
    model="whetstone",
    input=[{"role": "user", "content": "Tell me a story."}],
    # A JSON answer: its grammar lets a harmony model think first, and this random one does.
    text={"format": {"type": "json_object"}},
    temperature=0,
    max_output_tokens=64,
)


def test_reasoning_summary_is_the_reasoning_itself(harmony: ServerProcess) -> None:
    """reasoning.summary auto or detailed: there is no summariser, so the reasoning item's
    one summary part is its reasoning text, whole and streamed as the summary events the
    SDK parses (part added, text deltas, text done, part done); the answer is the same."""
    client = openai.OpenAI(base_url=f"{harmony.url}/v1", api_key="unused", max_retries=0)
    plain = client.responses.create(**JSON_THOUGHT, reasoning={"effort": "high"})
    (thought,) = [item for item in plain.output if item.type == "reasoning"]
    said = thought.content[0].text
    assert said and thought.summary == []
    for kind in ("auto", "detailed"):
        summed = client.responses.create(
            **JSON_THOUGHT, reasoning={"effort": "high", "summary": kind}
        )
        assert summed.reasoning.summary == kind
        assert summed.output_text == plain.output_text
        (item,) = [i for i in summed.output if i.type == "reasoning"]
        assert [(s.type, s.text) for s in item.summary] == [("summary_text", said)]
        assert client.responses.retrieve(summed.id).output[0].summary == item.summary

    with client.responses.stream(
        **JSON_THOUGHT, reasoning={"effort": "high", "summary": "auto"}
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    summary_events = [k for k in kinds if "reasoning_summary" in k]
    assert summary_events[0] == "response.reasoning_summary_part.added"
    assert summary_events[-2:] == [
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
    ]
    deltas = [e for e in events if e.type == "response.reasoning_summary_text.delta"]
    assert "".join(e.delta for e in deltas) == said
    assert {(e.summary_index, e.item_id) for e in deltas} == {(0, final.output[0].id)}
    (done,) = [e for e in events if e.type == "response.reasoning_summary_text.done"]
    assert done.text == said
    assert final.output[0].summary[0].text == said


def test_reasoning_goes_back_by_its_encrypted_content(harmony: ServerProcess) -> None:
    """include reasoning.encrypted_content (store false, as Codex asks): the reasoning item
    carries its text signed; sent back before the function call it led to, it is that
    call's analysis in the next prompt (harmony keeps it: more input tokens than without
    it); a changed token, or one another server made, is refused naming the item."""
    client = openai.OpenAI(base_url=f"{harmony.url}/v1", api_key="unused", max_retries=0)
    signed = client.responses.create(
        **JSON_THOUGHT,
        reasoning={"effort": "low"},
        store=False,
        include=["reasoning.encrypted_content"],
    )
    (thought,) = [item for item in signed.output if item.type == "reasoning"]
    token = thought.encrypted_content
    assert token and thought.content[0].text not in token
    call = {
        "type": "function_call",
        "name": "get_weather",
        "arguments": json.dumps({"city": "Paris"}),
        "call_id": "call_1",
    }
    ask = {"type": "message", "role": "user", "content": "What's the weather in Paris?"}
    output = {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}
    reasoning = {"type": "reasoning", "summary": [], "encrypted_content": token}

    def input_tokens(items: list) -> int:
        answered = client.responses.create(
            model="whetstone",
            input=items,
            tools=[CITY],
            store=False,
            temperature=0,
            max_output_tokens=1,
        )
        return answered.usage.input_tokens

    without = input_tokens([ask, call, output])
    with_thought = input_tokens([ask, reasoning, call, output])
    analysis = len(thought.content[0].text.encode())  # byte-level BPE: a token per byte at most
    assert with_thought > without, "the analysis before the call is in the prompt"
    assert with_thought - without <= analysis + 16  # and the analysis message's frame

    changed = token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB")
    for bad in (changed, "gAAAAABo-openai-encrypted-reasoning"):
        response = httpx.post(
            f"{harmony.url}/v1/responses",
            json={
                "model": "whetstone",
                "input": [ask, reasoning | {"encrypted_content": bad}, call, output],
                "max_output_tokens": 1,
            },
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "input"
        assert error["message"].startswith("input[1].encrypted_content:"), error


def test_a_reasoning_key_that_cannot_sign_refuses_before_answering(tmp_path: Path) -> None:
    """<home>/reasoning.key damaged or readable by others: a request that asks for signed
    reasoning gets a server error naming the file and what to do, before anything is
    generated or stored; mended, the same request is answered."""
    home = model_home(tmp_path / "home", tiny_llama(tmp_path / "model"))
    key = home / "reasoning.key"
    key.write_text("not hex\n")
    key.chmod(0o600)
    proc = ServerProcess(home).wait_ready()
    try:
        asked = {
            "model": "whetstone",
            "input": PARIS,
            "max_output_tokens": 4,
            "include": ["reasoning.encrypted_content"],
        }
        url = f"{proc.url}/v1/responses"
        before = conversation_count(proc.url)
        damaged = httpx.post(url, json=asked, timeout=60)
        assert damaged.status_code == 500, damaged.text
        error = damaged.json()["error"]
        assert error["type"] == "server_error"
        assert f"{key} holds no key of 32 bytes" in error["message"], error
        key.write_text("ab" * 32 + "\n")
        key.chmod(0o644)
        shared = httpx.post(url, json=asked, timeout=60)
        assert shared.status_code == 500, shared.text
        assert f"chmod 600 {key}" in shared.json()["error"]["message"]
        assert conversation_count(proc.url) == before  # nothing was answered or kept
        key.chmod(0o600)
        mended = httpx.post(url, json=asked, timeout=60)
        assert mended.status_code == 200, mended.text
        assert conversation_count(proc.url) == before + 1
    finally:
        proc.stop()
