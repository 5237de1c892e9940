"""The week's scripted person: how a general question's answer is judged right."""

from __future__ import annotations

import pytest

from benchmarks.week_person import knows


@pytest.mark.parametrize(
    ("keyword", "answer", "right"),
    [
        ("4", "A square has four sides.", True),  # counted wrong before: the base lost a point
        ("4", "A cat has 4 legs.", True),
        ("4", "A cat has 14 legs.", False),
        ("24", "A day has twenty-four hours.", True),
        ("24", "A day is 124 hours.", False),
        ("24", "There are 24.", True),
        ("4", "A day has twenty-four hours.", False),
        ("4", "It is 4.5 metres long.", False),
        ("2", "A week has twenty-two days.", False),
        ("2", "A bird has 100 legs.", False),
        ("2", "A bird has two legs.", True),
        ("green", "Grass is Green.", True),
        ("water", "Fish live in freshwater.", True),
        ("hot", "The opposite of cold is heat.", False),
    ],
)
def test_a_number_is_right_in_digits_or_in_words_and_only_as_a_whole(
    keyword: str, answer: str, right: bool
) -> None:
    assert knows(keyword, answer) is right


def test_a_right_answer_on_tied_logits_is_a_coin_flip_not_knowledge(home_with_model) -> None:
    # The embedded base (bf16 on the CPU) answers both right, but the square's answer begins
    # on two tokens of equal logit: an adapter that turns it has lost no knowledge, and the
    # first hour's goal does not count it (benchmarks.week.TIE_NATS).
    from benchmarks.week import base_margins, lost_with_margin
    from common.config import load_settings

    questions = (
        ("How many sides does a square have?", "4"),
        ("What is the capital of Greece?", "athens"),
    )
    margins = base_margins(load_settings(home_with_model), questions)
    square, greece = (margins[q] for q, _ in questions)
    assert square["right"] and not square["knows"], square
    assert greece["right"] and greece["knows"], greece
    after = {"How many sides does a square have?": "A square has eight sides."}
    assert lost_with_margin(margins, after) == []
    after["What is the capital of Greece?"] = "The capital of Greece is Sparta."
    assert lost_with_margin(margins, after) == ["What is the capital of Greece?"]
