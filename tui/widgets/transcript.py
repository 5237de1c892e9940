"""The scrolling conversation. Focused, it selects answers: Up/Down move, 1-5 rate,
c corrects, r regenerates, Esc goes back to the message box."""

from __future__ import annotations

from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message

from tui.widgets.message import AnswerView


class Transcript(VerticalScroll, can_focus=True):
    BINDINGS = [
        Binding("up", "move(-1)", "Previous", show=False),
        Binding("down", "move(1)", "Next", show=False),
        Binding("1", "rate(1)", "Rate", key_display="1-5"),
        *(Binding(str(n), f"rate({n})", f"Rate {n}", show=False) for n in range(2, 6)),
        Binding("c", "correct", "Correct"),
        Binding("r", "regenerate", "Regenerate"),
        Binding("escape,i", "leave", "Back", key_display="esc"),
    ]

    class Rate(Message):
        def __init__(self, answer: AnswerView, rating: int) -> None:
            super().__init__()
            self.answer, self.rating = answer, rating

    class Correct(Message):
        def __init__(self, answer: AnswerView) -> None:
            super().__init__()
            self.answer = answer

    class Regenerate(Message):
        def __init__(self, answer: AnswerView) -> None:
            super().__init__()
            self.answer = answer

    class Leave(Message):
        pass

    # Whether new lines are followed: true while the view is at the bottom. Scrolling up to
    # read back (or selecting an earlier answer) lets go until the view is back at the bottom.
    # (Textual's anchor() does this too, but it also pushes a short conversation to the
    # bottom of the screen.)
    following = True

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        # Growing content moves the bottom, not scroll_y: only a scroll lands here.
        self.following = new_value >= self.max_scroll_y

    def follow(self) -> None:
        """Keep the newest lines in view as an answer grows, unless the person reads back."""
        # Checked after the refresh that places the new lines, when the bottom is known: a
        # scroll the person started meanwhile (Page Up animates) must not be cut short.
        self.call_after_refresh(self._scroll_to_end_if_following)

    def _scroll_to_end_if_following(self) -> None:
        if self.following and not self.app.animator.is_being_animated(self, "scroll_y"):
            self.scroll_end(animate=False, immediate=True)

    @property
    def answers(self) -> list[AnswerView]:
        return list(self.query(AnswerView))

    @property
    def selected(self) -> AnswerView | None:
        found = self.query(".-selected")
        return found.first(AnswerView) if found else None

    def select(self, answer: AnswerView | None) -> None:
        for view in self.query(".-selected"):
            view.remove_class("-selected")
        if answer is not None:
            answer.add_class("-selected")
            self.scroll_to_widget(answer, animate=False)

    def select_latest(self) -> AnswerView | None:
        answers = self.answers
        self.select(answers[-1] if answers else None)
        return self.selected

    def on_blur(self) -> None:
        self.select(None)

    def action_move(self, step: int) -> None:
        answers = self.answers
        if not answers:
            return
        current = self.selected
        index = answers.index(current) + step if current in answers else len(answers) - 1
        self.select(answers[max(0, min(index, len(answers) - 1))])

    def action_rate(self, rating: int) -> None:
        if self.selected is not None:
            self.post_message(self.Rate(self.selected, rating))

    def action_correct(self) -> None:
        if self.selected is not None:
            self.post_message(self.Correct(self.selected))

    def action_regenerate(self) -> None:
        if self.selected is not None:
            self.post_message(self.Regenerate(self.selected))

    def action_leave(self) -> None:
        self.post_message(self.Leave())
