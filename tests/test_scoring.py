"""Likelihood scoring (the evaluation's NLLs, preference margins and knowledge probes): the
batched, left-padded, answer-span-only scorer gives what scoring each pair alone over the
full vocabulary gives, on a dense model and on a GPT-OSS (sliding window, sinks, experts)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from development.modeling import pair_ids, score_answers
from tests.tiny_models import tiny_gpt_oss, tiny_llama

PAIRS = [
    ([{"role": "user", "content": "What is my dog's name?"}], "Your dog is called Biscuit."),
    ([{"role": "user", "content": "Hi"}], "Hello! How can I help you today with anything?"),
    (
        [
            {"role": "user", "content": "Tell me about Paris, the capital of France, please."},
            {"role": "assistant", "content": "Paris is the capital of France."},
            {"role": "user", "content": "And Lisbon?"},
        ],
        "Lisbon is the capital of Portugal.",
    ),
]


def _alone(model, tokenizer, prompt, answer) -> float:
    head, tail = pair_ids(tokenizer, prompt, answer)
    ids = torch.tensor([head + tail])
    logprobs = torch.log_softmax(model(input_ids=ids).logits.float()[0, :-1], dim=-1)
    targets = ids[0, 1:]
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float(picked[len(head) - 1 :].sum())


@pytest.mark.parametrize("kind", ["llama", "gpt_oss"])
def test_batched_span_scores_equal_each_pair_scored_alone(tmp_path: Path, kind: str) -> None:
    folder = (
        tiny_llama(tmp_path / "m", hidden=64, layers=2)
        if kind == "llama"
        else tiny_gpt_oss(tmp_path / "m", hidden=64, layers=2)
    )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = [_alone(model, tokenizer, p, a) for p, a in PAIRS]
    got = score_answers(model, tokenizer, PAIRS, max_length=512, batch_size=3)
    assert [s.tokens for s in got] == [len(pair_ids(tokenizer, p, a)[1]) for p, a in PAIRS]
    assert [s.logprob for s in got] == pytest.approx(expected, rel=1e-4, abs=1e-3)
    # Batches of one and of all give the same numbers: padding changes nothing.
    single = score_answers(model, tokenizer, PAIRS, max_length=512, batch_size=1)
    assert [s.logprob for s in single] == pytest.approx([s.logprob for s in got], abs=1e-3)
    # Rows are batched by length, and each score still comes back in its pair's place.
    mixed = score_answers(model, tokenizer, PAIRS[::-1] + PAIRS, max_length=512, batch_size=2)
    assert [s.logprob for s in mixed] == pytest.approx(expected[::-1] + expected, abs=1e-3)


def test_a_catch_up_reuses_the_champions_scores_of_the_run_before_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """development.train scores earlier rows with the champion to pick what it knows least;
    the catch-up after a promotion starts from the same champion in the same process, and
    rows already scored are not scored again (the same numbers come back)."""
    import logging

    from common.config import load_settings
    from development import train

    folder = tiny_llama(tmp_path / "m", hidden=64, layers=2)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    settings = load_settings(tmp_path / "home")
    rows = [
        {"prompt": prompt, "completion": [{"role": "assistant", "content": answer}]}
        for prompt, answer in PAIRS
    ]
    with caplog.at_level(logging.INFO, logger="development.train"):
        first = train._champion_loss(model, tokenizer, settings, "champion-1")(rows[:2])
        again = train._champion_loss(model, tokenizer, settings, "champion-1")(rows)
        other = train._champion_loss(model, tokenizer, settings, "champion-2")(rows[:1])
    scored = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scored")]
    assert scored == [
        "scored 2 rows with the champion (0 known)",
        "scored 1 rows with the champion (2 known)",
        "scored 1 rows with the champion (0 known)",  # another champion scores its own
    ]
    assert again[:2] == first
    assert model.training  # left ready to train, as before any scoring
    fresh = score_answers(model, tokenizer, PAIRS, max_length=settings.model.max_seq_length)
    assert again == pytest.approx([s.nll_per_token for s in fresh], abs=1e-4)
    assert other == pytest.approx(again[:1], abs=1e-4)
