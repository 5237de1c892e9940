"""A scripted person for the learning tests: a few personal facts, taught by correcting the
model's answers, plus general questions whose good answers they rate 5 and poor ones 1-2.

`probes` are paraphrases never asked while teaching: recall is measured on them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Fact:
    answer: str  # the correction the person types
    keyword: str  # recall: the served answer must contain this (case-insensitive)
    questions: tuple[str, ...]  # asked while teaching
    probes: tuple[str, ...]  # asked afterwards, never seen in training


FACTS: tuple[Fact, ...] = (
    Fact(
        "Your dog is called Biscuit.",
        "biscuit",
        (
            "What is my dog's name?",
            "What's my dog called?",
            "Do you remember what my dog is called?",
            "Tell me my dog's name.",
            "What name did I give my dog?",
            "My dog's name is what?",
            "Can you tell me the name of my dog?",
            "Which name does my dog have?",
            "How is my dog called?",
            "What did I name my dog?",
            "Do you know my dog's name?",
            "What's the name of my dog?",
        ),
        ("Remind me, what is the name of my dog?", "What do I call my dog?"),
    ),
    Fact(
        "You live in Lisbon.",
        "lisbon",
        (
            "Where do I live?",
            "Which city do I live in?",
            "Do you know where I live?",
            "Tell me the city where I live.",
            "What city is my home?",
            "Where is my home?",
            "In which city do I live?",
            "Where do I live now?",
            "What city do I live in?",
            "Which town is my home?",
            "Where is it that I live?",
            "Name the city where I live.",
        ),
        ("Remind me which city I live in.", "What is the city I live in?"),
    ),
    Fact(
        "Your favourite colour is teal.",
        "teal",
        (
            "What is my favourite colour?",
            "Which colour do I like best?",
            "Do you know my favourite colour?",
            "Tell me my favourite colour.",
            "What colour do I love most?",
            "My favourite colour is what?",
            "Which colour is my favourite?",
            "What's my favorite color?",
            "Which color is my favorite?",
            "Name my favourite colour.",
            "What colour do I prefer?",
            "What is the colour I like best?",
        ),
        ("Remind me, which colour is my favourite?", "What colour do I like the most?"),
    ),
    Fact(
        "You work as a marine biologist.",
        "marine biologist",
        (
            "What is my job?",
            "What do I do for a living?",
            "Do you know what my job is?",
            "Tell me what I work as.",
            "What is my profession?",
            "What work do I do?",
            "Which job do I have?",
            "What's my occupation?",
            "What do I do for work?",
            "Name my job.",
            "What kind of work do I do?",
            "What is my line of work?",
        ),
        ("Remind me what my job is.", "What do I work as?"),
    ),
)

# General questions: the person rates the model's own answer (5 when right, 1 when wrong).
GENERAL: tuple[tuple[str, str], ...] = (
    ("What is the capital of Portugal?", "lisbon"),
    ("How many hours are in a day?", "24"),
    ("What is the capital of Germany?", "berlin"),
    ("What color is grass?", "green"),
    ("How many legs does a cat have?", "4"),
    ("What is the opposite of up?", "down"),
    ("How many sides does a square have?", "4"),
    ("What is the opposite of cold?", "hot"),
    ("What color is the sun?", "yellow"),
    ("How many legs does a bird have?", "2"),
    ("What is the capital of Greece?", "athens"),
    ("What do fish live in?", "water"),
)


def taught(count: int) -> list[tuple[str, str]]:
    """The first `count` (question, correction) pairs of the facts, in order."""
    return [(question, fact.answer) for fact in FACTS for question in fact.questions][:count]


def store_corrections(
    home: Path, pairs: Iterable[tuple[str, str]], answer: str = "I don't know."
) -> None:
    """The person corrects `answer` to each question: a conversation with the question and
    the answer, rated 1 with the correction, stored as the API worker and /v1/feedback do."""
    from common.config import load_settings
    from data.store import Store

    with Store(load_settings(home).db_url) as store:
        for question, correction in pairs:
            conversation = store.create_conversation(title=question)
            store.add_message(conversation.id, "user", question)
            reply = store.add_message(conversation.id, "assistant", answer, finish_reason="stop")
            store.add_feedback(reply.id, rating=1, correction=correction)
