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
