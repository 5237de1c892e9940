"""What the user sees of generated tokens: plain chat models and harmony (GPT-OSS)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from production.chat.formats import chat_format
from production.chat.harmony import HARMONY_SPECIAL_TOKENS
from tests.tiny_models import HARMONY_CHAT_TEMPLATE

TEXT = "Café naïve 🐉 — 東京 is far; ok."


@pytest.fixture(scope="module")
def tokenizer(prepared_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(prepared_model_dir)


def feed(decoder, ids: list[int]) -> tuple[str, str]:
    text, reasoning = [], []
    for token in ids:
        delta = decoder.feed(token)
        text.append(delta.text)
        reasoning.append(delta.reasoning)
    tail = decoder.flush()
    return "".join(text) + tail.text, "".join(reasoning) + tail.reasoning


def test_plain_decoder_streams_whole_characters_and_stops_at_end_of_turn(tokenizer) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    plain = chat_format("plain", tokenizer)
    assert end in plain.stop_ids
    decoder = plain.decoder([])
    pieces = [decoder.feed(t).text for t in ids]
    assert "".join(pieces) == TEXT
    assert all("\ufffd" not in p for p in pieces)
    decoder.feed(end)
    assert decoder.done and decoder.stopped_on_eos
    assert decoder.feed(ids[0]).text == ""  # nothing after the end of the turn


def test_harmony_decoder_shows_the_final_channel_and_keeps_the_analysis(tokenizer) -> None:
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": HARMONY_SPECIAL_TOKENS})
    tok.chat_template = HARMONY_CHAT_TEMPLATE
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "2+2?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
        reasoning_effort="low",
    )
    generated = tok.encode(
        "<|channel|>analysis<|message|>Simple sum.<|end|>"
        "<|start|>assistant<|channel|>commentary<|message|>Let me add.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>2+2 = 4 🐉<|return|>",
        add_special_tokens=False,
    )
    harmony = chat_format("harmony", tok)
    decoder = harmony.decoder(list(prompt))
    text, reasoning = feed(decoder, generated)
    assert text == "2+2 = 4 🐉"
    assert "Simple sum." in reasoning and "<|" not in reasoning + text
    assert decoder.done
    assert tok.convert_tokens_to_ids("<|end|>") not in harmony.stop_ids


def test_stop_strings_never_show_a_stop_or_a_piece_of_one() -> None:
    from production.chat.stop_strings import StopStrings

    stops = StopStrings(("END", "\n\n"))
    shown = [stops.feed(piece) for piece in ["Hello E", "N", "ough. ", "Then\n", "\nmore"]]
    # "E" is held back until "N" then "o" show it is not "END"; "\n" until "\n" stops it.
    assert shown == ["Hello ", "", "ENough. ", "Then", ""]
    assert stops.hit and stops.feed("after") == "" and stops.flush() == ""
    tail = StopStrings(("END",))
    assert tail.feed("the E") == "the " and tail.flush() == "E"  # the answer ended: show it


def test_hermes_tool_calls_are_taken_out_of_the_text() -> None:
    from production.chat.tool_calls import HermesCalls

    calls = HermesCalls()
    out = [
        calls.feed(piece)
        for piece in [
            "Let me check. <tool",
            '_call>\n{"name": "get_weather", "arguments": {"city": ',
            '"Paris"}}\n</tool_call>',
            "<tool_call>not json</tool_call> done",
        ]
    ]
    assert [text for text, _ in out] == [
        "Let me check. ",
        "",
        "",
        "<tool_call>not json</tool_call> done",  # what does not parse stays text
    ]
    (call,) = out[2][1]
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Paris"}')
    assert call.id.startswith("call_") and calls.calls == [call]
    assert HermesCalls().feed("<tool_call>{") == ("", []) and calls.flush() == ""


def test_steering_applies_bias_and_openai_penalties_and_keeps_raw_logprobs() -> None:
    import math

    import torch

    from production.decode.steering import Steering, SteeringSpec

    spec = SteeringSpec(
        logit_bias=((0, 5.0),), presence_penalty=1.0, frequency_penalty=0.5, logprobs=2
    )
    steering = Steering(spec, None, vocab_size=4, device="cpu")
    raw = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    first = steering.process(raw)
    assert first.tolist() == [[5.0, 1.0, 2.0, 3.0]] and raw.tolist() == [[0, 1, 2, 3]]
    token = first.argmax(-1)
    steering.sampled(token)
    steering.accept(int(token))
    (entry,) = steering.logprobs
    expected = torch.log_softmax(raw[0], -1)  # the model's own, before the bias
    assert entry.token == 0 and math.isclose(entry.logprob, float(expected[0]), rel_tol=1e-6)
    assert [i for i, _ in entry.top] == [3, 2]
    steering.sampled(torch.tensor([0]))  # token 0 twice: 5 - 1.0 - 0.5 * 2
    assert steering.process(raw).tolist() == [[3.0, 1.0, 2.0, 3.0]]


def test_output_processor_takes_calls_out_cuts_stop_strings_and_says_why_it_ended(
    tokenizer,
) -> None:
    from production.chat.output import OutputProcessor

    plain = chat_format("plain", tokenizer)
    ids = tokenizer.encode(
        'Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call> Done. STOP and more",
        add_special_tokens=False,
    )
    output = OutputProcessor(plain, [], max_tokens=len(ids), tools=True, stop=("STOP",))
    deltas = []
    for token in ids:
        if output.done:  # the stop string ended the answer: the engine stops sampling
            break
        deltas.append(output.feed(token))
    deltas += output.flush()
    assert output.text == "".join(d.text for d in deltas) == "Sure.  Done. "
    (call,) = output.tool_calls
    assert (call.name, call.arguments) == ("get_weather", '{"city": "Paris"}')
    assert output.finish_reason(cancelled=False) == "tool_calls"
    assert output.finish_reason(cancelled=True) == "cancelled"
    assert output.produced < len(ids)

    # At max_tokens, text held back as a possible tag is content after all.
    ids = tokenizer.encode("Hello <tool", add_special_tokens=False)
    output = OutputProcessor(plain, [], max_tokens=len(ids), tools=True)
    shown = "".join(output.feed(token).text for token in ids)
    assert shown == "Hello " and [d.text for d in output.flush()] == ["<tool"]
    assert output.text == "Hello <tool" and output.finish_reason(cancelled=False) == "length"


def test_an_answer_cut_mid_character_shows_what_came_of_it(tokenizer) -> None:
    """max_tokens can end an answer between a character's bytes: the text so far comes out
    whole and the unfinished character as U+FFFD, not silently dropped."""
    ids = tokenizer.encode("ok 🐉", add_special_tokens=False)
    dragon = tokenizer.encode("🐉", add_special_tokens=False)
    assert len(dragon) > 1, "the emoji is one token: nothing is cut"
    decoder = chat_format("plain", tokenizer).decoder([])
    shown = "".join(decoder.feed(t).text for t in ids[:-1])
    assert shown == "ok"  # the space is in the emoji's first byte token
    assert decoder.flush().text == " \ufffd"
    assert decoder.flush().text == ""
