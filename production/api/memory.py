"""The memory in a chat prompt (issue 37): the notes relevant to the conversation's last user
message, chosen within memory.max_notes and memory.max_tokens, and how the model is given
them. Only the prompt holds them: the stored turns (and so every training row) never do.

How, measured on SmolLM2-135M (benchmarks/memory_notes.py; issue 37's hand measurement
before it): a note as an earlier question-and-answer pair placed before the conversation is
used far more often than notes listed in a system turn, which the small model ignores and
which cost it general answers. A note without a question is a "Remember: ..." line before
the message. Harmony (GPT-OSS) has a developer message for what the model is told: the note
goes there.
"""

from __future__ import annotations

from typing import Any

from common.config import MemorySection
from data.memory import NoteHit
from data.store import Store

Turn = dict[str, Any]


def last_user_text(turns: list[Turn]) -> str | None:
    """The text of the conversation's last user turn (what the notes are found by)."""
    return next((t["content"] for t in reversed(turns) if t["role"] == "user"), None)


def choose(
    store: Store,
    settings: MemorySection,
    turns: list[Turn],
    count_tokens: Any,
    adapter_id: str | None = None,
) -> list[NoteHit]:
    """The notes to give the model with `turns` (the caller asks only while memory.enabled
    is on): the best ones by relevance, at most max_notes, their tokens within max_tokens (a
    note past the budget is left out whole: half a fact misleads). Notes the serving adapter
    `adapter_id` has learned (its evaluation answered them right without) are left out."""
    asked = last_user_text(turns)
    if not asked:
        return []
    hits = store.relevant_notes(
        asked, min_score=settings.min_score, limit=settings.max_notes, serving_adapter=adapter_id
    )
    chosen, spent = [], 0
    for hit in hits:
        cost = count_tokens(f"{hit.note.question or ''}\n{hit.note.text}")
        if spent + cost > settings.max_tokens:
            continue
        chosen.append(hit)
        spent += cost
    return chosen


def remember_line(hit: NoteHit) -> str:
    note = hit.note
    if note.question:
        return f"Remember: asked {note.question!r}, the right answer is: {note.text}"
    return f"Remember: {note.text}"


def with_notes(
    format_name: str, system: str | None, turns: list[Turn], hits: list[NoteHit]
) -> tuple[str | None, list[Turn]]:
    """The system prompt and turns the template renders, the notes given in the way the
    chat format's models use them (the module's docstring)."""
    if not hits:
        return system, turns
    if format_name == "harmony":
        lines = "\n".join(remember_line(hit) for hit in hits)
        return (f"{system}\n\n{lines}" if system else lines), turns
    earlier: list[Turn] = []
    lines = []
    for hit in hits:
        if hit.note.question:
            earlier += [
                {"role": "user", "content": hit.note.question},
                {"role": "assistant", "content": hit.note.text},
            ]
        else:
            lines.append(remember_line(hit))
    if lines:
        last = max(i for i, t in enumerate(turns) if t["role"] == "user")
        asked = turns[last]
        turns = [
            *turns[:last],
            asked | {"content": "\n".join(lines) + "\n\n" + asked["content"]},
            *turns[last + 1 :],
        ]
    return system, earlier + turns
