"""The OpenAI API as real clients use it: the openai SDK against a real server on 127.0.0.1,
on the embedded model (the hermes tool format, SmolLM2's chat template) and on a tiny random
GPT-OSS (harmony: tools declared in the developer message, calls on the commentary channel).

Every family of parameters is checked streamed and not: stop sequences, structured output,
tools, log-probabilities, penalties and logit bias, models and errors, /v1/completions.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from data.store import Store
from tests.conftest import ServerProcess, link_model
from tests.tiny_models import model_home, tiny_gpt_oss

pytestmark = pytest.mark.slow

COUNT = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
PARIS = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
WEATHER = [{"role": "user", "content": "What's the weather in Paris?"}]
PLACE = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["timezone"],
        },
    },
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, prepared_model_dir: Path):
    home = link_model(tmp_path_factory.mktemp("openai") / "home", prepared_model_dir)
    proc = ServerProcess(home).wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(served: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)


def stored_answer(home: Path, message_id: str):
    store = Store(f"sqlite:///{home}/whetstone.db")
    try:
        for summary in store.list_conversations(limit=20):
            for m in store.get_conversation(summary.id).messages:
                if m.id == message_id:
                    return m, store.get_conversation(summary.id)
    finally:
        store.close()
    raise AssertionError(f"{message_id} not stored")


def streamed(stream) -> tuple[str, list, str | None, list]:
    """(content, tool-call deltas, finish_reason, logprobs) of a chat stream."""
    text, calls, finish, logprobs = [], [], None, []
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        text.append(choice.delta.content or "")
        calls.extend(choice.delta.tool_calls or [])
        if choice.logprobs and choice.logprobs.content:
            logprobs.extend(choice.logprobs.content)
        finish = choice.finish_reason or finish
    return "".join(text), calls, finish, logprobs


def test_stop_sequences_end_the_answer_before_the_stop_text(
    client: openai.OpenAI, served: ServerProcess
) -> None:
    free = client.chat.completions.create(
        model="whetstone", messages=COUNT, temperature=0, max_tokens=30
    )
    assert "4, 5" in free.choices[0].message.content  # the model does count past 5
    stopped = client.chat.completions.create(
        model="whetstone", messages=COUNT, temperature=0, max_tokens=30, stop=["5", "never"]
    )
    text = stopped.choices[0].message.content
    assert free.choices[0].message.content.startswith(text) and "5" not in text
    assert "4" in text and stopped.choices[0].finish_reason == "stop"
    # The stored answer is what the client saw.
    stored, _ = stored_answer(served.home, stopped.id)
    assert stored.content == text and stored.finish_reason == "stop"

    stream = client.chat.completions.create(
        model="whetstone", messages=COUNT, temperature=0, max_tokens=30, stop="5", stream=True
    )
    content, _, finish, _ = streamed(stream)
    assert content == text and finish == "stop"


def _place(text: str) -> dict:
    place = json.loads(text)
    assert set(place) == {"city", "country"}, place
    assert all(isinstance(v, str) for v in place.values())
    return place


def test_json_schema_and_json_object_answers_parse(client: openai.OpenAI) -> None:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "place", "schema": PLACE, "strict": True},
    }
    answer = client.chat.completions.create(
        model="whetstone",
        messages=PARIS,
        temperature=0,
        max_tokens=40,
        response_format=response_format,
    )
    assert _place(answer.choices[0].message.content)["city"] == "Paris"
    content, _, finish, _ = streamed(
        client.chat.completions.create(
            model="whetstone",
            messages=PARIS,
            temperature=0,
            max_tokens=40,
            response_format=response_format,
            stream=True,
        )
    )
    assert content == answer.choices[0].message.content and finish == "stop"
    anything = client.chat.completions.create(
        model="whetstone",
        messages=[{"role": "user", "content": "Describe a cat."}],
        temperature=0,
        max_tokens=60,
        response_format={"type": "json_object"},
    )
    assert anything.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(anything.choices[0].message.content), dict)


def test_the_sdks_parse_helper_gets_a_typed_object(client: openai.OpenAI) -> None:
    from pydantic import BaseModel

    class Place(BaseModel):
        city: str
        country: str

    parsed = client.chat.completions.parse(
        model="whetstone", messages=PARIS, temperature=0, max_tokens=40, response_format=Place
    )
    assert parsed.choices[0].message.parsed.city == "Paris"


def test_required_and_named_tool_calls_then_the_tool_result_turn(
    client: openai.OpenAI, served: ServerProcess
) -> None:
    tools = [WEATHER_TOOL, TIME_TOOL]
    answer = client.chat.completions.create(
        model="whetstone",
        messages=WEATHER,
        temperature=0,
        max_tokens=60,
        tools=tools,
        tool_choice="required",
        parallel_tool_calls=False,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    named = client.chat.completions.create(
        model="whetstone",
        messages=WEATHER,
        temperature=0,
        max_tokens=60,
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        stream=True,
    )
    _, deltas, finish, _ = streamed(named)
    assert finish == "tool_calls" and [d.function.name for d in deltas] == ["get_time"]
    assert json.loads(deltas[0].function.arguments)["timezone"] in ("UTC", "CET")

    # The result goes back as the SDK's own message plus a tool turn; the answer continues
    # the same stored conversation, and the calls and results are in the record.
    follow = [
        *WEATHER,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "temp_c": 21}'},
    ]
    after = client.chat.completions.create(
        model="whetstone", messages=follow, temperature=0, max_tokens=30, tools=tools
    )
    assert after.choices[0].finish_reason in ("stop", "length", "tool_calls")
    first, conversation = stored_answer(served.home, answer.id)
    second, same = stored_answer(served.home, after.id)
    assert same.id == conversation.id
    assert first.finish_reason == "tool_calls"
    assert first.tool_calls[0]["function"]["name"] == "get_weather"
    roles = [m.role for m in same.messages]
    assert roles == ["user", "assistant", "tool", "assistant"], roles
    tool_turn = same.messages[2]
    assert tool_turn.tool_call_id == call.id and "sunny" in tool_turn.content
    assert second.reply_to_id == tool_turn.id
    assert first.generation["tools"][0]["function"]["name"] == "get_weather"


def test_logprobs_and_top_logprobs(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="whetstone",
        messages=COUNT,
        temperature=0,
        max_tokens=6,
        logprobs=True,
        top_logprobs=3,
    )
    entries = answer.choices[0].logprobs.content
    assert len(entries) == answer.usage.completion_tokens == 6
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(values[0])
    assert "".join(e.token for e in entries) == answer.choices[0].message.content
    _, _, _, streamed_entries = streamed(
        client.chat.completions.create(
            model="whetstone",
            messages=COUNT,
            temperature=0,
            max_tokens=6,
            logprobs=True,
            stream=True,
        )
    )
    assert [e.token for e in streamed_entries] == [e.token for e in entries]


def test_logit_bias_and_penalties_change_the_answer(
    client: openai.OpenAI, prepared_model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepared_model_dir)

    def token_id(text: str) -> int:
        (token,) = tokenizer(text, add_special_tokens=False)["input_ids"]
        return token

    def greedy(**more) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(
            model="whetstone", messages=COUNT, temperature=0, **{"max_tokens": 12} | more
        )

    plain = greedy(logprobs=True)
    first = plain.choices[0].logprobs.content[0].token
    banned = greedy(logit_bias={str(token_id(first)): -100})
    assert not banned.choices[0].message.content.startswith(first)
    forced = greedy(logit_bias={str(token_id(" seven")): 100}, max_tokens=3)
    assert forced.choices[0].message.content.split() == ["seven"] * 3
    repeated = client.chat.completions.create(
        model="whetstone",
        messages=[{"role": "user", "content": "Say 'dog dog dog dog dog dog dog dog'."}],
        temperature=0,
        max_tokens=16,
    )
    penalised = client.chat.completions.create(
        model="whetstone",
        messages=[{"role": "user", "content": "Say 'dog dog dog dog dog dog dog dog'."}],
        temperature=0,
        max_tokens=16,
        frequency_penalty=2.0,
        presence_penalty=1.0,
    )
    dogs = repeated.choices[0].message.content.lower().count("dog")
    assert penalised.choices[0].message.content.lower().count("dog") < dogs


def test_top_p_alone_samples_and_seed_repeats(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return (
            client.chat.completions.create(
                model="whetstone",
                messages=[{"role": "user", "content": "Tell me a story."}],
                top_p=0.99,
                seed=seed,
                max_tokens=16,
            )
            .choices[0]
            .message.content
        )

    first = sample(1)
    assert sample(1) == first
    assert any(sample(seed) != first for seed in (2, 3))


def test_models_and_errors_have_openai_shapes(client: openai.OpenAI, served: ServerProcess) -> None:
    listed = [m.id for m in client.models.list().data]
    assert listed[0] == "whetstone" and "embedded:smollm2-135m-instruct" in listed
    for model_id in listed:
        assert client.models.retrieve(model_id).id == model_id
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4")
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4", messages=COUNT, max_tokens=2)
    assert unknown.value.body["param"] == "model"

    route = httpx.get(f"{served.url}/v1/nothing-here")
    assert route.status_code == 404 and route.json()["error"]["code"] == "not_found"
    method = httpx.put(f"{served.url}/v1/models")
    assert method.status_code == 405 and method.json()["error"]["code"] == "method_not_allowed"

    bad = {
        "top_logprobs": {"logprobs": True, "top_logprobs": 50},
        "tool_choice": {
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "nope"}},
        },
        "response_format": {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "objectx"}},
            }
        },
        "n": {"n": 2},
        "store": {"store": False},
        "functions": {"functions": [{"name": "f"}]},
        "bogus": {"bogus": 1},
        "memory": {"memory": True},  # the memory is off in this home: asked for, refused
        "logit_bias": {"logit_bias": {"999999": 1}},
        "messages": {
            "messages": [*COUNT, {"role": "tool", "tool_call_id": "call_x", "content": "{}"}]
        },
    }

    def stored() -> int:
        conversations = httpx.get(f"{served.url}/v1/conversations", params={"limit": 500})
        return len(conversations.json()["data"])

    before = stored()
    for param, body in bad.items():
        response = httpx.post(
            f"{served.url}/v1/chat/completions",
            json={"model": "whetstone", "messages": COUNT, "max_tokens": 2} | body,
        )
        assert response.status_code == 400, (param, response.text)
        error = response.json()["error"]
        assert error["param"] == param and isinstance(error["code"], str), (param, error)
    assert stored() == before  # refused before anything was stored
    unenforced = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
    }
    response = httpx.post(
        f"{served.url}/v1/chat/completions",
        json={"model": "whetstone", "messages": COUNT, "response_format": unenforced},
    )
    assert (
        response.status_code == 400 and "`uniqueItems` at /" in response.json()["error"]["message"]
    )
    tool = WEATHER_TOOL | {
        "function": WEATHER_TOOL["function"]
        | {"parameters": {"type": "object", "not": {"required": ["city"]}}}
    }
    response = httpx.post(
        f"{served.url}/v1/chat/completions",
        json={"model": "whetstone", "messages": COUNT, "tools": [tool]},
    )
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "tools"
    assert "get_weather's parameters: `not` at /" in error["message"]
    assert stored() == before
    weeks = httpx.get(f"{served.url}/v1/trend", params={"weeks": 0})
    assert weeks.status_code == 400 and weeks.json()["error"]["param"] == "weeks"


def test_completions_stream_and_not_and_are_logged(
    client: openai.OpenAI, served: ServerProcess
) -> None:
    done = client.completions.create(
        model="whetstone", prompt="The capital of France is", max_tokens=4, temperature=0
    )
    text = done.choices[0].text
    assert "Paris" in text and done.choices[0].finish_reason == "length"
    chunks = list(
        client.completions.create(
            model="whetstone",
            prompt="The capital of France is",
            max_tokens=4,
            temperature=0,
            stream=True,
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    stored, conversation = stored_answer(served.home, done.id)
    assert stored.content == text and stored.generation["endpoint"] == "completions"
    assert conversation.messages[0].content == "The capital of France is"
    with pytest.raises(openai.BadRequestError) as echo:
        client.completions.create(model="whetstone", prompt="x", echo=True, max_tokens=1)
    assert echo.value.body["param"] == "echo"


# ------------------------------------------------------------------- harmony (GPT-OSS)


@pytest.fixture(scope="module")
def harmony(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("harmony")
    home = model_home(root / "home", tiny_gpt_oss(root / "model"), chat_format="harmony")
    proc = ServerProcess(home).wait_ready()
    yield proc
    proc.stop()


CITY = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            # An enum: a random model writes a free string until max_tokens.
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
        },
    },
}


def test_harmony_tool_calls_on_the_commentary_channel(harmony: ServerProcess) -> None:
    """A random GPT-OSS makes a valid call only because the grammar holds it to harmony's
    format; the call is parsed from the commentary channel, streamed and not."""
    client = openai.OpenAI(base_url=f"{harmony.url}/v1", api_key="unused", max_retries=0)
    body = dict(
        model="whetstone",
        messages=WEATHER,
        temperature=0,
        max_tokens=160,
        tools=[CITY],
        tool_choice="required",
        reasoning_effort="low",
    )
    answer = client.chat.completions.create(**body)
    (call,) = answer.choices[0].message.tool_calls
    assert answer.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    _, deltas, finish, _ = streamed(client.chat.completions.create(**body, stream=True))
    assert finish == "tool_calls" and deltas[0].function.arguments == call.function.arguments
    # The result turn renders in harmony (functions.get_weather to=assistant) and answers.
    follow = [
        *WEATHER,
        answer.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'},
    ]
    after = client.chat.completions.create(
        model="whetstone", messages=follow, max_tokens=8, temperature=0, tools=[CITY]
    )
    assert after.choices[0].finish_reason in ("stop", "length", "tool_calls")

    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    structured = client.chat.completions.create(
        model="whetstone",
        messages=WEATHER,
        temperature=0,
        max_tokens=160,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    )
    assert set(json.loads(structured.choices[0].message.content)) == {"n"}


def test_harmony_streams_end_with_the_answer_and_match_the_stored_and_whole_answers(
    harmony: ServerProcess,
) -> None:
    """A random GPT-OSS at temperature 1 writes stray control tokens: what follows one is
    shown (not held back as a header while the stream runs on), so the stream ends within a
    few tokens' time of its last text, and the streamed deltas are the stored answer and the
    answer asked for whole with the same seed (content, reasoning, tool calls)."""
    import time

    client = openai.OpenAI(base_url=f"{harmony.url}/v1", api_key="unused", max_retries=0)
    asks = [{"max_tokens": 256}, {"max_tokens": 160, "tools": [CITY], "tool_choice": "required"}]
    for seed, more in [(seed, asks[0]) for seed in range(12)] + [(0, asks[1])]:
        body = {
            "model": "whetstone",
            "messages": [{"role": "user", "content": "Tell me a story."}],
            "temperature": 1,
            "seed": seed,
            "extra_body": {"include_reasoning": True},
        } | more
        whole = client.chat.completions.create(**body).choices[0].message
        started = time.monotonic()
        content, reasoning, calls, last_text_at, usage, message_id = [], [], [], None, None, None
        for chunk in client.chat.completions.create(
            **body, stream=True, stream_options={"include_usage": True}
        ):
            message_id, usage = chunk.id, chunk.usage or usage
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            thought = (delta.model_extra or {}).get("reasoning_content") or ""
            content.append(delta.content or "")
            reasoning.append(thought)
            calls.extend(delta.tool_calls or [])
            if delta.content or thought or delta.tool_calls:
                last_text_at = time.monotonic()
        ended = time.monotonic()
        per_token = (ended - started) / usage.completion_tokens
        assert last_text_at is not None and ended - last_text_at <= 4 * per_token + 0.25, (
            seed,
            ended - last_text_at,
            per_token,
        )
        stored, _ = stored_answer(harmony.home, message_id)
        assert "".join(content) == stored.content == (whole.content or "")
        assert (
            "".join(reasoning)
            == (stored.reasoning or "")
            == whole.model_extra.get("reasoning_content", "")
        )
        streamed_calls = [(c.function.name, c.function.arguments) for c in calls]
        whole_calls = [(c.function.name, c.function.arguments) for c in whole.tool_calls or []]
        stored_calls = [
            (c["function"]["name"], c["function"]["arguments"]) for c in stored.tool_calls or []
        ]
        assert streamed_calls == whole_calls == stored_calls


def test_a_follow_up_turn_reads_the_conversation_so_far_from_the_kept_cache(
    client: openai.OpenAI, served: ServerProcess
) -> None:
    """What the worker kept of the last turn shows in usage (OpenAI's cached_tokens) and in
    /v1/status; the follow-up prefills only its new tokens."""
    first = [{"role": "user", "content": "What is the capital of Italy?"}]
    answer = client.chat.completions.create(
        model="whetstone", messages=first, max_tokens=12, temperature=0
    )
    before = httpx.get(f"{served.url}/v1/status").json()["prompt_cache"]
    follow_up = [
        *first,
        {"role": "assistant", "content": answer.choices[0].message.content},
        {"role": "user", "content": "And of Spain?"},
    ]
    second = client.chat.completions.create(
        model="whetstone", messages=follow_up, max_tokens=12, temperature=0
    )
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert answer.usage.prompt_tokens <= cached < second.usage.prompt_tokens
    after = httpx.get(f"{served.url}/v1/status").json()["prompt_cache"]
    assert after["enabled"] is True
    assert after["requests"] == before["requests"] + 1 and after["hits"] == before["hits"] + 1
    assert after["reused_tokens"] - before["reused_tokens"] == cached
    assert after["prefilled_tokens"] - before["prefilled_tokens"] == (
        second.usage.prompt_tokens - cached
    )
