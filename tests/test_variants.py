"""Other wordings of a corrected question (development/variants.py), and the profile that
fits the device (`auto`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import load_settings
from development import variants
from tests.conftest import run_cli
from tests.tiny_models import model_home, teach, tiny_llama


@pytest.mark.parametrize(
    ("written", "kept"),
    [
        ("What do I call my cat?", True),
        ("Remind me what my cat is called?", True),
        # What the embedded model writes when asked to paraphrase: it answers instead.
        ("Your cat's name is Luna.", False),
        ("What is my cat's name?", False),  # the same question
        ("What is a cat called?", False),  # no longer about the person
        ("What is my dog's name?", False),  # the key word lost
        ("What do I call my sister's cat?", False),  # a new topic: another question
        ("What do I call my cat? And my dog?", False),
    ],
)
def test_a_paraphrase_is_kept_only_when_it_asks_the_same(written: str, kept: bool) -> None:
    assert variants.acceptable("What is my cat's name?", written) is kept


def test_clean_takes_the_first_question() -> None:
    assert variants.clean('New question: "What do I call my cat?" I hope this helps.') == (
        "What do I call my cat?"
    )


def test_variants_prefer_the_models_then_templates_never_the_question() -> None:
    question = "What is my cat's name?"
    got = variants.variants(question, ["What do I call my cat?"], 3)
    assert got == [
        "What do I call my cat?",
        "What is the name of my cat?",
        "What is my cat called?",
    ]
    many = variants.variants(question, [], 16)
    assert many[:4] == variants.rewrites(question)
    assert "Quick question: What is my cat's name?" in many
    assert question not in variants.variants(question, [question], 16)
    assert len(variants.variants(question, [], 16)) == len(variants.templated(question))


def test_paraphrases_are_asked_once_and_kept(tmp_path: Path) -> None:
    asked: list[list[str]] = []

    def generate(prompts: list[str]) -> list[str]:
        asked.append(prompts)
        return ["What do I call my cat?" if "cat" in p else "I am not sure." for p in prompts]

    path = tmp_path / "variants" / "cache.json"
    first = variants.paraphrases(["What is my cat's name?", "Where do I live?"], path, generate)
    assert first == {"What is my cat's name?": ["What do I call my cat?"], "Where do I live?": []}
    assert len(asked[0]) == 2 * len(variants.INSTRUCTIONS)
    again = variants.paraphrases(["What is my cat's name?"], path, generate)
    assert again == {"What is my cat's name?": ["What do I call my cat?"]}
    assert len(asked) == 1  # cached: not asked again
    path.write_text("{not json")
    assert variants.paraphrases(["Where do I live?"], path, None) == {"Where do I live?": []}


def test_a_model_that_cannot_write_paraphrases_is_not_asked(tmp_path: Path) -> None:
    # The embedded model wrote none worth keeping (0 of 424 in this suite): its preset turns
    # the asking off, and a run trains on the templated wordings without it. (A custom
    # model is asked: test_paraphrases_are_asked_once_and_kept has what that keeps.)
    assert load_settings(tmp_path / "embedded").model.writes_paraphrases is False
    home = model_home(
        tmp_path / "home",
        tiny_llama(tmp_path / "tiny"),
        more="[training.profiles.quick_test]\nmax_steps = 2\neval_every = 2\n"
        "[training]\nwrite_worse_candidates = true\n",
    )
    assert load_settings(home).model.writes_paraphrases is True
    teach(home, repeats=1)
    done = run_cli(
        "train", "--home", str(home), "--wait", "--force", "--no-promote",
        "--profile", "quick_test", "--set", "model.writes_paraphrases=false",
    )  # fmt: skip
    assert "trained candidate" in done.stdout, done.stdout + done.stderr
    assert "paraphrasing" not in done.stdout  # the stage a run that asks shows
    assert not (home / "models" / "variants").exists()


def test_the_auto_profile_is_quick_test_on_the_cpu_and_standard_on_a_gpu(home: Path) -> None:
    settings = load_settings(home, gpu_count=0)
    assert settings.training.default_profile == "auto" == settings.schedule.nightly_profile
    cpu = load_settings(home, {"devices": {"development": "cpu"}}, gpu_count=0)
    assert cpu.resolve_profile() == "quick_test"
    assert cpu.profile("auto") == cpu.training.profiles["quick_test"]
    gpu = load_settings(home, {"devices": {"development": "cuda:0"}}, gpu_count=1)
    assert gpu.resolve_profile("auto") == "standard"
    assert gpu.resolve_profile("full") == "full"


@pytest.mark.parametrize(
    ("question", "first"),
    [
        ("What is my cat's name?", "What do I call my cat?"),
        ("What is my favourite colour?", "Which colour do I like best?"),
        ("What colour is my bike?", "Which colour is my bike?"),
        ("What fruit do I eat every morning?", "Which fruit do I eat every morning?"),
        ("Where is my office?", "Tell me where my office is."),
    ],
)
def test_rewrites_by_the_questions_shape(question: str, first: str) -> None:
    got = variants.rewrites(question)
    assert got[0] == first
    assert all(variants.key_words(question) <= variants.key_words(w) | {"favourite"} for w in got)


@pytest.mark.parametrize(
    ("question", "asked_otherwise"),
    [
        ("Which city do I live in?", ["Where do I live?", "Where is my home?"]),
        ("Where do I live?", ["Where is my home?", "Which city do I live in?"]),
        ("What is my job?", ["What do I do for a living?", "What work do I do?"]),
        ("What do I do for a living?", ["What is my job?"]),
        ("What is my favourite food?", ["What do I love to eat?"]),
        ("When is my birthday?", ["When was I born?"]),
    ],
)
def test_questions_asked_in_other_words_altogether_come_first(
    question: str, asked_otherwise: list[str]
) -> None:
    got = variants.rewrites(question)
    assert got[: len(asked_otherwise)] == asked_otherwise
    assert question not in got


def test_a_topic_word_is_swapped_for_its_synonyms_and_both_kinds_come_early() -> None:
    assert variants.swapped("What colour is my bike?") == [
        "What colour is my bicycle?",
        "What color is my bike?",
    ]
    # Whole words only: "bikers" is not a bike.
    assert variants.swapped("Which bikers do I know?") == []
    first = variants.variants("Which city do I live in?", [], 4)
    assert first == [
        "Where do I live?",
        "Which town do I live in?",
        "Where is my home?",
        "Where is home?",
    ]


def test_a_question_of_no_known_shape_gets_lead_ins_only() -> None:
    assert variants.rewrites("Is it raining?") == []
    assert variants.templated("Is it raining?")[0] == "Quick question: Is it raining?"


@pytest.mark.parametrize(
    ("question", "plain"),
    [
        ("Do you remember what my parrot is called?", "what is my parrot called"),
        ("Can you tell me the name of my horse?", "what is the name of my horse"),
        ("Tell me my boat's name.", "what is my boat's name"),
        ("My rabbit's name is what?", "what is my rabbit's name"),
        ("Quick question: where's my office?", "where is my office"),
        ("Do you know where I work?", "where do i work"),
        ("Name my profession.", "what is my profession"),
        ("Is it raining?", "is it raining"),
    ],
)
def test_a_wrapped_or_embedded_question_is_unwrapped_to_the_plain_one(
    question: str, plain: str
) -> None:
    assert variants.plain_question(question) == plain


def test_every_way_of_asking_a_name_gets_the_other_ways_not_lead_ins() -> None:
    asked = (
        "What's my parrot called?",
        "Do you remember what my parrot is called?",
        "What name did I give my parrot?",
        "Which name does my parrot have?",
    )
    for question in asked:
        got = variants.variants(question, [], 4)
        assert all("parrot" in wording for wording in got), got
        assert not any(wording.startswith(("Quick question", "Remind me")) for wording in got)
        assert "What do I call my parrot?" in got
