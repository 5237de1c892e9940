"""The scripted person of benchmarks.week: what they teach, ask and like.

Facts are taught by correcting the model's answers, several phrasings per fact and several
wordings of the correction; recall is measured on `probes`, paraphrases never asked while
teaching. Chat prompts are everyday questions the person rates by a taste no correction ever
states (short, direct answers; no filler opening); TASTE_PROMPTS measure that taste on prompts
never rated. KNOWLEDGE are general questions with a keyword, never asked while chatting.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from tests.scripted_person import FACTS as TAUGHT_IN_ONE_CYCLE
from tests.scripted_person import GENERAL


@dataclass(frozen=True)
class WeekFact:
    keyword: str  # recall: the answer contains it (case-insensitive)
    corrections: tuple[str, ...]  # what the person types, in varying words
    questions: tuple[str, ...]  # asked while teaching (and restating)
    probes: tuple[str, ...]  # asked only to measure recall


def _from_one_cycle() -> list[WeekFact]:
    alternatives = {
        "biscuit": ("My dog is Biscuit.", "Biscuit. That is my dog's name."),
        "lisbon": ("I live in Lisbon.", "Lisbon, that is where I live."),
        "teal": ("Teal is my favourite colour.", "My favourite colour is teal."),
        "marine biologist": ("I am a marine biologist.", "Marine biologist, that is my job."),
    }
    return [
        WeekFact(
            fact.keyword,
            (fact.answer, *alternatives[fact.keyword]),
            fact.questions[:8],
            fact.probes,
        )
        for fact in TAUGHT_IN_ONE_CYCLE
    ]


FACTS: tuple[WeekFact, ...] = (
    *_from_one_cycle(),
    WeekFact(
        "marta",
        ("Your sister is called Marta.", "My sister is Marta.", "Marta is my sister's name."),
        (
            "What is my sister's name?",
            "What's my sister called?",
            "Do you know my sister's name?",
            "Tell me my sister's name.",
            "Who is my sister?",
            "What name does my sister have?",
            "Can you tell me what my sister is called?",
            "My sister's name is what?",
        ),
        ("Remind me, what is my sister called?", "How is my sister named?"),
    ),
    WeekFact(
        "ramen",
        ("Your favourite food is ramen.", "I love ramen most.", "Ramen is my favourite food."),
        (
            "What is my favourite food?",
            "Which food do I like best?",
            "Do you know my favourite dish?",
            "Tell me my favourite food.",
            "What food do I love most?",
            "What's my favorite meal?",
            "Which dish is my favourite?",
            "What do I like to eat most?",
        ),
        ("Remind me which food I like the most.", "What is the dish I love best?"),
    ),
    WeekFact(
        "october",
        ("Your birthday is in October.", "My birthday is in October.", "October is my birthday."),
        (
            "When is my birthday?",
            "In which month is my birthday?",
            "Do you know my birthday month?",
            "Tell me when my birthday is.",
            "What month was I born in?",
            "Which month is my birthday?",
            "When do I celebrate my birthday?",
            "My birthday is in which month?",
        ),
        ("Remind me of the month of my birthday.", "When is my birthday each year?"),
    ),
    WeekFact(
        "volvo",
        ("You drive a blue Volvo.", "My car is a Volvo.", "A blue Volvo, that is my car."),
        (
            "What car do I drive?",
            "Which car do I have?",
            "Do you know what car I drive?",
            "Tell me what my car is.",
            "What brand is my car?",
            "What kind of car do I own?",
            "Which make is my car?",
            "My car is what make?",
        ),
        ("Remind me which car I drive.", "What is the car I own?"),
    ),
    WeekFact(
        "cello",
        ("You play the cello.", "I play the cello.", "The cello is my instrument."),
        (
            "What instrument do I play?",
            "Which instrument do I play?",
            "Do you know my instrument?",
            "Tell me what instrument I play.",
            "What music instrument is mine?",
            "Which instrument am I learning?",
            "What do I play in the orchestra?",
            "My instrument is what?",
        ),
        ("Remind me which instrument I play.", "What instrument is it that I play?"),
    ),
    WeekFact(
        "benfica",
        ("You support Benfica.", "My team is Benfica.", "Benfica is the club I support."),
        (
            "Which football team do I support?",
            "What is my football club?",
            "Do you know my favourite team?",
            "Tell me which team I support.",
            "Who do I cheer for in football?",
            "What team am I a fan of?",
            "Which club is my team?",
            "My football team is what?",
        ),
        ("Remind me which football club I support.", "What is the team I cheer for?"),
    ),
)

# Everyday questions, a few per day, answered and rated by taste (never corrected).
CHAT_PROMPTS: tuple[str, ...] = (
    "What is a good way to start the morning?",
    "How do I boil an egg?",
    "What is the capital of Italy?",
    "Why do leaves change colour in autumn?",
    "What is a prime number?",
    "How long should I sleep each night?",
    "What is the boiling point of water?",
    "Give me a tip for learning a language.",
    "What is a healthy breakfast?",
    "How do I make a cup of tea?",
    "What is the largest planet?",
    "Why is the sky blue?",
    "What does a bee make?",
    "How many days are in a week?",
    "What is the main language of Brazil?",
    "How do I stay focused while working?",
    "What is a synonym for happy?",
    "How do rainbows form?",
    "What is the freezing point of water?",
    "Give me an idea for a weekend hobby.",
    "What is the capital of Japan?",
    "How do I water a cactus?",
    "What is an antonym of fast?",
    "Which animal is known as the king of the jungle?",
    "How many continents are there?",
    "What is a good name for a goldfish?",
    "How do I keep bread fresh?",
    "What is the chemical symbol for gold?",
    "Why do we need sleep?",
    "What is the capital of Egypt?",
    "How do I tie a simple knot?",
    "What is a haiku?",
    "Give me a quick dinner idea.",
    "What is the longest river in the world?",
    "How do I remember names better?",
    "What gas do plants take in?",
    "How many players are on a football team?",
    "What is the capital of Australia?",
    "What is a good stretch for the back?",
    "Why does ice float?",
    "What is the plural of mouse?",
    "How do I clean a wooden table?",
    "What is the fastest land animal?",
    "Give me a word that means very big.",
    "What is the capital of Norway?",
    "How do I make my plants grow better?",
    "What does a thermometer measure?",
    "How many strings does a violin have?",
    "What is the capital of Kenya?",
    "How do I fall asleep faster?",
    "What is the smallest prime number?",
    "What colour do you get mixing blue and yellow?",
    "How do I save money on groceries?",
    "What is the capital of Mexico?",
    "Why do cats purr?",
    "What is the square root of 81?",
)

# The taste measure: asked after every night, never rated, never trained on.
TASTE_PROMPTS: tuple[str, ...] = (
    "What is a volcano?",
    "How do I make pancakes?",
    "What is the capital of Sweden?",
    "Why do birds migrate?",
    "What is a good way to relax after work?",
    "What does a dentist do?",
    "How many weeks are in a year?",
    "What is a cloud made of?",
    "Give me a tip for a job interview.",
    "What is the opposite of early?",
)

# General knowledge, asked only to measure it: (question, keyword of a right answer).
KNOWLEDGE: tuple[tuple[str, str], ...] = GENERAL

# More of it, for the first hour: of the 12 above the embedded base answers 7 right, 3 of
# them by a coin flip (benchmarks.week.TIE_NATS), which left 4 questions to lose. None of
# these is a replay, chat or taste prompt (so none is trained on).
MORE_KNOWLEDGE: tuple[tuple[str, str], ...] = (
    ("What is the largest planet in our solar system?", "jupiter"),
    ("What is the opposite of hot?", "cold"),
    ("What animal says moo?", "cow"),
    ("What is the capital of England?", "london"),
    ("What is frozen water called?", "ice"),
    ("What do bees make?", "honey"),
    ("Who wrote Romeo and Juliet?", "shakespeare"),
    ("What is the opposite of big?", "small"),
    ("What is the capital of Russia?", "moscow"),
    ("What color is a banana?", "yellow"),
    ("What is the opposite of day?", "night"),
    ("What is the capital of China?", "beijing"),
    ("Which planet do we live on?", "earth"),
    ("What is the opposite of left?", "right"),
    ("Which star is at the centre of our solar system?", "sun"),
    ("What is the opposite of happy?", "sad"),
)

# How the keywords that are numbers may be written out: "A square has four sides." is right.
_SPELLED = {"2": "two", "4": "four", "24": r"twenty[- ]four"}


def knows(keyword: str, answer: str) -> bool:
    """Whether `answer` says `keyword`: a word anywhere in it (case-insensitive); a number as
    a whole number, in digits or in words ("24 hours" and "twenty-four", not "124")."""
    text = answer.lower()
    if not keyword.isdigit():
        return keyword in text
    spelled = _SPELLED.get(keyword, re.escape(keyword))
    # Not part of a longer number: "14", "4.5", "twenty-four" do not say 4.
    alone_before, alone_after = r"(?<![\w.-])", r"(?![\w-]|\.\d)"
    pattern = rf"{alone_before}(?:{re.escape(keyword)}|{spelled}){alone_after}"
    return re.search(pattern, text) is not None


# Openings the person dislikes: filler before the answer.
_FILLER = re.compile(
    r"^\W*(sure|certainly|of course|absolutely|great question|good question|"
    r"i'?d be (happy|glad)|i'?m sorry|aw|oh|well|hello|hi)\b",
    re.IGNORECASE,
)


def words(answer: str) -> int:
    return len(answer.split())


def filler_opening(answer: str) -> bool:
    return bool(_FILLER.match(answer))


def taste(answer: str, finished: bool) -> int:
    """The rating the person's taste gives an answer, without noise: short and direct is
    best; a filler opening costs a point; an answer cut at the length limit is the worst."""
    if not finished:
        return 1
    n = words(answer)
    score = 5 if n <= 20 else 4 if n <= 40 else 3 if n <= 70 else 2
    if filler_opening(answer):
        score -= 1
    return max(1, score)


def rating(answer: str, finished: bool, rng: random.Random, noise: float = 0.15) -> int:
    """taste() with a little noise: one point either way, `noise` of the time."""
    score = taste(answer, finished)
    if rng.random() < noise:
        score += rng.choice((-1, 1))
    return min(5, max(1, score))
