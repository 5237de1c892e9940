"""One turn of the transcript: the person's message, or an answer with what is known of it
(adapter, speed, rating, correction, and whether that feedback is stored)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Markdown, Static

STARS = "★★★★★"
# Why an answer ended short, as the person should read it.
ENDINGS = {
    "stopped": "stopped",
    "cut_off": "cut off",
    "error": "failed",
    "length": "hit max tokens",
}


@dataclass
class FeedbackState:
    """A rating or correction as the person gave it, and whether the store has it."""

    value: Any
    state: str = "saving"  # saving | saved | failed
    error: str | None = None


@dataclass
class Answer:
    """What an answer view shows beyond its text."""

    message_id: str | None = None
    adapter_id: str | None = None
    completion_tokens: int | None = None
    seconds: float | None = None
    finish_reason: str | None = None  # None while streaming
    problem: str | None = None  # why it ended short, in words
    superseded: bool = False  # a regenerated answer replaced it
    rating: FeedbackState | None = None
    correction: FeedbackState | None = None


class UserMessage(Static):
    """The person's turn, shown as typed (never parsed as markup)."""

    def __init__(self, text: str) -> None:
        super().__init__(Text(text), classes="user-message")
        self.text = text


class AnswerView(Vertical):
    """An answer: the analysis channel (hidden unless asked for), the Markdown body that
    grows while it streams, and a line of facts under it."""

    def __init__(self, text: str = "", reasoning: str = "", answer: Answer | None = None) -> None:
        super().__init__(classes="answer")
        self.text = text
        self.reasoning = reasoning
        self.answer = answer or Answer()
        self.deltas = 0  # stream chunks received: what a test sees streaming by

    def compose(self) -> ComposeResult:
        yield Static(Text(self.reasoning), classes="reasoning")
        yield Markdown(self.text, classes="body")
        yield Static(classes="correction")  # the person's correction, once given
        yield Static(classes="meta")

    def on_mount(self) -> None:
        self.set_reasoning(self.reasoning)
        self.refresh_meta()

    @property
    def body(self) -> Markdown:
        return self.query_one(".body", Markdown)

    @property
    def done(self) -> bool:
        return self.answer.finish_reason is not None

    def set_reasoning(self, reasoning: str) -> None:
        self.reasoning = reasoning
        self.query_one(".reasoning", Static).update(Text(reasoning))
        self.set_class(bool(reasoning), "-has-reasoning")

    def refresh_meta(self) -> None:
        self.query_one(".meta", Static).update(self.meta_line())
        self.set_class(self.answer.superseded, "-superseded")
        correction = self.answer.correction
        if correction is not None:
            shown = Text("your correction: ", "bold")
            shown.append(str(correction.value))
            self.query_one(".correction", Static).update(shown)
        self.set_class(correction is not None, "-corrected")

    def meta_line(self) -> Text:
        a = self.answer
        line = Text()
        if a.superseded:
            line.append("earlier answer · ", "italic")
        if a.finish_reason is None:
            line.append("generating…  (Esc stops)", "italic")
            return line
        line.append(a.adapter_id or "base model")
        if a.completion_tokens:
            line.append(f" · {a.completion_tokens} tok")
            if a.seconds:
                line.append(f" · {a.completion_tokens / a.seconds:.1f} tok/s")
        ending = ENDINGS.get(a.finish_reason)
        if ending or a.problem:
            line.append(" · ")
            line.append(a.problem or ending or "", "bold yellow")
        if a.rating is not None:
            line.append(" · ")
            stars = STARS[: a.rating.value] + "☆" * (5 - a.rating.value)
            line.append(f"{stars} {a.rating.value}", "bold")
            line.append_text(_state(a.rating))
        if a.correction is not None:
            line.append(" · corrected")
            line.append_text(_state(a.correction))
        return line


def _state(feedback: FeedbackState) -> Text:
    if feedback.state == "saved":
        return Text(" ✓", "green")
    if feedback.state == "saving":
        return Text(" saving…", "italic")
    return Text(f" NOT SAVED ({feedback.error}); press again to retry", "bold red")
