"""Small modal screens: confirm, edit a correction, rename, conversation settings."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, TextArea

# "default": the model's own (the server sends none).
EFFORTS = [(name, name) for name in ("default", "low", "medium", "high")]


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str, detail: str = "") -> None:
        super().__init__()
        self.question, self.detail = question, detail

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(Text(self.question), classes="dialog-title")
            if self.detail:
                yield Label(Text(self.detail), classes="dialog-detail")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Yes (y)", id="yes", variant="primary")
                yield Button("No (n)", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class EditScreen(ModalScreen[str | None]):
    """Edit a text (the correction of an answer); Ctrl+S saves, Esc cancels, Ctrl+R clears it
    to write from scratch (TextArea's own select-all is F7, which nobody finds)."""

    BINDINGS = [
        Binding("ctrl+s", "save", "Save"),
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+r", "clear", "Clear"),
    ]

    def __init__(self, title: str, text: str) -> None:
        super().__init__()
        self.title_text, self.text = title, text

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label(Text(self.title_text), classes="dialog-title")
            yield TextArea(self.text, soft_wrap=True, id="editor")
            yield Label(
                "Ctrl+R clears it to write from scratch (Ctrl+Z brings it back) · Ctrl+S saves "
                "· Esc cancels",
                classes="dialog-detail",
            )

    def on_mount(self) -> None:
        editor = self.query_one("#editor", TextArea)
        editor.focus()
        editor.move_cursor(editor.document.end)

    def action_clear(self) -> None:
        editor = self.query_one("#editor", TextArea)
        editor.replace("", editor.document.start, editor.document.end)  # undoable, unlike load

    def action_save(self) -> None:
        text = self.query_one("#editor", TextArea).text
        if not text.strip():
            self.notify("an empty correction is not saved", severity="warning")
            return
        self.dismiss(text)

    def action_cancel(self) -> None:
        self.dismiss(None)


class RenameScreen(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str) -> None:
        super().__init__()
        self.current = title

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(
                "Rename the conversation (Enter saves, Esc cancels)", classes="dialog-title"
            )
            yield Input(self.current, id="title")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class SettingsScreen(ModalScreen[dict[str, Any] | None]):
    """The conversation's system prompt and reasoning effort."""

    BINDINGS = [
        Binding("ctrl+s", "save", "Save"),
        Binding("escape", "cancel", "Cancel"),
    ]

    def __init__(self, system_prompt: str | None, effort: str | None) -> None:
        super().__init__()
        self.system_prompt, self.effort = system_prompt, effort

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label("System prompt for this conversation", classes="dialog-title")
            yield TextArea(self.system_prompt or "", soft_wrap=True, id="system")
            yield Label("Reasoning effort (harmony models)")
            yield Select(EFFORTS, value=self.effort or "default", allow_blank=False, id="effort")
            yield Label("Ctrl+S saves · Esc cancels", classes="dialog-detail")

    def on_mount(self) -> None:
        self.query_one("#system", TextArea).focus()

    def action_save(self) -> None:
        system = self.query_one("#system", TextArea).text.strip() or None
        effort = self.query_one("#effort", Select).value
        self.dismiss(
            {"system_prompt": system, "reasoning_effort": None if effort == "default" else effort}
        )

    def action_cancel(self) -> None:
        self.dismiss(None)
