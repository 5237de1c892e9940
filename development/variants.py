"""Other wordings of a corrected question, so a fact taught once is learned beyond one wording.

One example per fact is rarely enough for a LoRA to answer paraphrases (Ovadia et al. 2024:
new facts need varied phrasings), and a person corrects each fact once. Each corrected
question gets up to `training.correction_variants` more training rows with the same
corrected answer:

- paraphrases written by the base model (greedy, one per instruction below), kept only when
  they are a question that still says who it is about and keeps the question's key words
  ("What is my cat's name?" may become "What do I call my cat?", never "What is a cat?");
- then templated wordings: rewrites of the common shapes of a question about the person
  ("What is my X's name?" -> "What do I call my X?"; "What is my favourite X?" -> "Which X
  do I like best?"), then lead-ins around the question, then a plain lower-case form.

Plain code (no torch): the model is asked through the `generate` function training passes in,
and what it wrote is kept in the home (one file per base model), so a question is paraphrased
once, not every night.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterable
from itertools import zip_longest
from pathlib import Path

from common.fs import atomic_write_text

log = logging.getLogger(__name__)

# Bump when the instructions or the checks change: paraphrases kept before are asked again.
VARIANTS_VERSION = 1

INSTRUCTIONS = (
    "Rewrite this question in other words. Reply with the new question only.\n\n{q}",
    "Ask the same thing in a different way, as one short question:\n{q}",
    'How else could someone ask "{q}"? Give one question.',
    "Paraphrase this question: {q}",
)

LEAD_INS = (
    "Quick question: {q}",
    "Remind me: {q}",
    "Do you remember? {q}",
    "Tell me, {lc}",
    "Can you tell me this: {lc}",
    "{q} Just the answer, please.",
    "I forgot. {q}",
    "{q} You should know this.",
)

# Words that carry no topic: a paraphrase need not keep them.
_FUNCTION_WORDS = frozenset(
    """a an the is are was were be been am do does did what which who whom whose where when
    why how of in on at to for with by from about into as and or but if it its this that these
    those there here can could would should will shall may might must please tell me remind
    know you your yours i my mine we our us name names named called call favourite favorite
    like likes best most really again just one some any kind sort s""".split()  # noqa: SIM905
)
# Who a question is about: kept, or "my cat" becomes "a cat" and teaches a general falsehood.
_PERSON_WORDS = frozenset({"i", "me", "my", "mine", "myself", "i'm", "i've"})


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower().replace("\u2019", "'"))


def key_words(question: str) -> set[str]:
    """The words that say what a question is about ("cat" of "What is my cat's name?")."""
    words = {w.removesuffix("'s") for w in _words(question)}
    return {w for w in words if w not in _FUNCTION_WORDS and len(w) > 1}


def acceptable(question: str, variant: str) -> bool:
    """A model-written paraphrase is kept when it is one question, differs from the
    original, keeps every key word, and is still about the person when the original was."""
    variant = variant.strip()
    if not variant.endswith("?") or variant.count("?") != 1 or "\n" in variant:
        return False
    if not 3 <= len(_words(variant)) <= 2 * len(_words(question)) + 4:
        return False
    if _words(variant) == _words(question):
        return False
    said = {w.removesuffix("'s") for w in _words(variant)}
    if not key_words(question) <= said:
        return False
    # No new topic word: "What do I call my sister's dog?" is another question.
    if key_words(variant) - key_words(question):
        return False
    about_person = bool(_PERSON_WORDS & set(_words(question)))
    return not about_person or bool(_PERSON_WORDS & set(_words(variant)))


def clean(text: str) -> str:
    """The first question in a model's reply, without quotes or a label before it."""
    first = text.strip().split("\n")[0].strip()
    first = re.sub(
        r"^(new question|question|paraphrase|rewritten question)\s*:\s*", "", first, flags=re.I
    )
    first = first.strip(" \"'*")
    if "?" in first:
        first = first[: first.index("?") + 1]
    return first.strip(" \"'*")


# Rewrites of the common shapes of a question about the person, by pattern (the question
# lower-cased, without its final punctuation). Each gives other questions that ask the same.
_REWRITES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        r"what(?: is|'s) my (?:favourite|favorite) (\w+)",
        (
            "Which {0} do I like best?",
            "What {0} do I love most?",
            "What is the {0} I like the most?",
            "Tell me my favourite {0}.",
        ),
    ),
    (
        r"(?:what|which) (\w+) do i (.+)",
        ("Which {0} do I {1}?", "Tell me which {0} I {1}.", "Remind me which {0} I {1}."),
    ),
    (
        r"(?:what|which) (\w+) is my (\w+)",
        ("Which {0} is my {1}?", "What is the {0} of my {1}?", "Tell me the {0} of my {1}."),
    ),
    (
        r"(where|when|who) (?:is|'s) my (\w+)",
        ("Tell me {0} my {1} is.", "Remind me {0} my {1} is.", "Do you know {0} my {1} is?"),
    ),
    (
        r"(where|when|how|what) do i (.+)",
        ("Tell me {0} I {1}.", "Remind me {0} I {1}.", "Do you know {0} I {1}?"),
    ),
    (
        r"what(?: is|'s) my (\w+)",
        ("Tell me my {0}.", "Do you know my {0}?", "What's my {0}?", "Remind me of my {0}."),
    ),
)


# What people tell an assistant about themselves is asked about in other words altogether:
# "Which city do I live in?" is also "Where do I live?". A LoRA taught one of these answers
# the others only when it saw them (a newcomer's fact held by "Which city do I live in?"
# was not recalled on "Where is my home?"). By pattern over the whole question, as above.
_ASKED_OTHERWISE: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        r"(?:what|which) (?:city|town|country|place) do i live in|where do i live"
        r"|where(?: is|'s) my home|where(?: is|'s) home for me",
        ("Where do I live?", "Where is my home?", "Which city do I live in?", "Where is home?"),
    ),
    (
        r"what(?: is|'s) my (?:job|profession|occupation|work)|what do i do for (?:a living|work)"
        r"|what do i work as|what (?:kind of )?work do i do|what is my line of work"
        r"|(?:what|which) (?:job|profession|occupation) do i have",
        ("What do I do for a living?", "What is my job?", "What work do I do?"),
    ),
    (
        r"what(?: is|'s) my (?:favourite|favorite) (?:food|dish|meal)"
        r"|what do i (?:like|love) to eat|what food do i like(?: best| most)?",
        ("What do I love to eat?", "What food do I like best?", "Which meal do I like most?"),
    ),
    (
        r"when(?: is|'s) my birthday|when was i born"
        r"|what(?: is|'s) my (?:date of birth|birth date)",
        ("When was I born?", "When is my birthday?", "What day is my birthday?"),
    ),
    (
        r"how old am i|what(?: is|'s) my age",
        ("How old am I?", "What is my age?", "What age am I?"),
    ),
    (
        r"where do i work|what company do i work for|which company do i work for",
        ("Where do I work?", "Which company do I work for?", "Who do I work for?"),
    ),
)

# Other words for the things a person's questions are about. A question with one is also
# asked with each other ("my bike" / "my bicycle"). Single words, so a swap keeps the
# question's grammar.
SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("city", "town"),
    ("job", "profession", "occupation"),
    ("food", "dish", "meal"),
    ("bike", "bicycle"),
    ("car", "vehicle"),
    ("film", "movie"),
    ("colour", "color"),
    ("team", "club"),
    ("house", "home", "flat", "apartment"),
    ("drink", "beverage"),
    ("song", "tune"),
    ("book", "novel"),
    ("hobby", "pastime"),
    ("partner", "spouse"),
    ("boss", "manager"),
    ("kid", "child"),
    ("sport", "game"),
    ("holiday", "vacation"),
)


# A person wraps a question in lead-ins, asks it embedded ("Do you remember what my dog is
# called?") or inverted ("My dog's name is what?"), and contracts it. The tables above know
# plain questions; `plain_question` unwraps one first, so every wording of a shape the tables
# know gets their rewrites, not lead-ins alone.
_CONTRACTIONS = ((r"\b(what|where|when|who|how)'s\b", r"\1 is"),)
_WRAPPERS = re.compile(
    r"^(?:quick question|remind me|i forgot|tell me|can you tell me|could you tell me"
    r"|do you (?:remember|know)|please|name(?= my\b))[,:.]?\s+"
)
_EMBEDDED: tuple[tuple[str, str], ...] = (
    (r"(what|which \w+|where|when|who) my ([\w']+) is(.*)", r"\1 is my \2\3"),
    (r"(what|which \w+|where|when|how) i (\w+)(.*)", r"\1 do i \2\3"),
)
_STATED: tuple[tuple[str, str], ...] = (
    (r"(my [\w' ]+?) is what", r"what is \1"),
    (r"((?:my|the) [\w' ]+)", r"what is \1"),
)

# The name of something of the person's, asked any of the ways people ask it.
_NAME_OF = re.compile(
    r"what is my (\w+)'s name|what is my (\w+) called|what is the name of my (\w+)"
    r"|what do i call my (\w+)|what name did i give my (\w+)|what did i name my (\w+)"
    r"|which name does my (\w+) have|how is my (\w+) (?:called|named)"
)
_NAME_FORMS = (
    "What is my {0}'s name?",
    "What do I call my {0}?",
    "What is the name of my {0}?",
    "What is my {0} called?",
    "What name did I give my {0}?",
)


def plain_question(question: str) -> str:
    """The question inside a person's wording, lower-cased, without its final punctuation:
    "Do you remember what my dog is called?" -> "what is my dog called"."""
    plain = question.strip().rstrip("?.! ").lower().replace("\u2019", "'")
    for pattern, replacement in _CONTRACTIONS:
        plain = re.sub(pattern, replacement, plain)
    while (unwrapped := _WRAPPERS.sub("", plain)) != plain:
        plain = unwrapped
    asks = re.match(r"(what|which|where|when|who|how|do|does|did|is|are|can)\b", plain)
    for pattern, replacement in _EMBEDDED if asks else (*_EMBEDDED, *_STATED):
        if re.fullmatch(pattern, plain):
            return re.sub(pattern, replacement, plain)
    return plain


def _name_forms(plain: str) -> list[str]:
    found = _NAME_OF.fullmatch(plain)
    if not found:
        return []
    thing = next(group for group in found.groups() if group)
    return [form.format(thing) for form in _NAME_FORMS]


def _matching(plain: str, table: tuple[tuple[str, tuple[str, ...]], ...]) -> list[str]:
    for pattern, forms in table:
        found = re.fullmatch(pattern, plain)
        if found:
            return [form.format(*found.groups()) for form in forms]
    return []


def rewrites(question: str) -> list[str]:
    """Other questions for the same thing: those that ask it in other words altogether,
    then those from the question's shape (none when neither knows it)."""
    said = question.strip().rstrip("?.! ").lower()
    plain = plain_question(question)
    out: list[str] = []
    found = [*_matching(plain, _ASKED_OTHERWISE), *_name_forms(plain), *_matching(plain, _REWRITES)]
    for form in found:
        if form.rstrip("?.").lower() != said and form not in out:
            out.append(form)
    return out


def swapped(question: str) -> list[str]:
    """The question with a word of SYNONYMS swapped for each other word for the same thing."""
    out: list[str] = []
    for group in SYNONYMS:
        for word in group:
            pattern = re.compile(rf"\b{word}\b", re.I)
            if not pattern.search(question):
                continue
            for other in group:
                if other != word:
                    out.append(pattern.sub(other, question, count=1))
    return out


def templated(question: str) -> list[str]:
    """Wordings made from the question itself, in a fixed order: its rewrites and its
    synonym swaps taken in turn (both kinds in the first few), then lead-ins around it,
    then a plain lower-case form."""
    question = question.strip()
    lower = question[:1].lower() + question[1:]
    plain = question.rstrip("?.! ").lower()
    leads = [template.format(q=question, lc=lower) for template in LEAD_INS]
    other, swaps = rewrites(question), swapped(question)
    mixed = [w for pair in zip_longest(other, swaps) for w in pair if w is not None]
    return [*mixed, *leads, plain]


def cache_file(models_dir: Path, base_model: str) -> Path:
    digest = hashlib.sha256(f"{base_model}:{VARIANTS_VERSION}".encode()).hexdigest()[:16]
    return models_dir / "variants" / f"{digest}.json"


def paraphrases(
    questions: Iterable[str],
    path: Path,
    generate: Callable[[list[str]], list[str]] | None,
) -> dict[str, list[str]]:
    """{question: the model's acceptable paraphrases} for `questions`, from the cache at
    `path`, asking `generate(prompts) -> replies` (greedy) for the questions not in it."""
    cached: dict[str, list[str]] = {}
    if path.is_file():
        try:
            cached = json.loads(path.read_text())["questions"]
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("paraphrase cache %s is unreadable (%s); asking again", path, exc)
            cached = {}
    wanted = sorted({q for q in questions if q.strip()})
    missing = [q for q in wanted if q not in cached]
    if missing and generate is not None:
        prompts = [instruction.format(q=q) for q in missing for instruction in INSTRUCTIONS]
        replies = generate(prompts)
        for index, question in enumerate(missing):
            own = replies[index * len(INSTRUCTIONS) : (index + 1) * len(INSTRUCTIONS)]
            kept: list[str] = []
            for reply in own:
                variant = clean(reply)
                if acceptable(question, variant) and variant.lower() not in map(str.lower, kept):
                    kept.append(variant)
            cached[question] = kept
        log.info(
            "paraphrased %d corrected question(s): %d kept of %d written",
            len(missing),
            sum(len(cached[q]) for q in missing),
            len(prompts),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"version": VARIANTS_VERSION, "questions": cached}
        atomic_write_text(path, json.dumps(body, indent=1, ensure_ascii=False) + "\n")
    return {q: cached.get(q, []) for q in wanted}


def variants(question: str, written: list[str], count: int) -> list[str]:
    """Up to `count` other wordings of `question`: the model's paraphrases first, then the
    templated ones; never the question itself, never twice."""
    out: list[str] = []
    seen = {question.strip().lower()}
    for variant in [*written, *templated(question)]:
        if len(out) >= count:
            break
        if variant.strip().lower() not in seen:
            seen.add(variant.strip().lower())
            out.append(variant)
    return out
