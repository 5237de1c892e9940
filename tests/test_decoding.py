"""What the user sees of generated tokens: plain chat models and harmony (GPT-OSS)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from production.decoding import make_decoder, stop_token_ids
from production.harmony import HARMONY_CHAT_TEMPLATE, HARMONY_SPECIAL_TOKENS

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
    assert end in stop_token_ids(tokenizer, "plain")
    decoder = make_decoder(tokenizer, "plain", [])
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
    decoder = make_decoder(tok, "harmony", list(prompt))
    text, reasoning = feed(decoder, generated)
    assert text == "2+2 = 4 🐉"
    assert "Simple sum." in reasoning and "<|" not in reasoning + text
    assert decoder.done
    assert tok.convert_tokens_to_ids("<|end|>") not in stop_token_ids(tok, "harmony")
