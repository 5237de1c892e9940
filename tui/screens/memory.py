"""F5: the memory's notes (made from the person's corrections, or by hand), newest first,
whether each is still given to the model or learned by the adapter serving now; f forgets
one (asks first: its text leaves the database for good)."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from tui.client import ApiRefused, DaemonUnreachable
from tui.screens.dialogs import ConfirmScreen
from tui.widgets.sidebar import ConnectionBar

STATUS_STYLE = {"active": "green", "learned": "dim"}


class MemoryScreen(Screen[None]):
    BINDINGS = [
        Binding("f", "forget", "Forget"),
        Binding("r", "refresh", "Refresh"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.notes: list[dict[str, Any]] = []
        self.enabled: bool | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield ConnectionBar(id="connection")
        yield Static(id="memory-info")
        yield DataTable(id="notes", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns("status", "question", "note")
        self.watch(self.app, "connection", lambda c: c.up and self.refresh_notes())

    def on_screen_resume(self) -> None:
        self.refresh_notes()

    def action_refresh(self) -> None:
        self.refresh_notes()

    @work(exclusive=True, group="notes")
    async def refresh_notes(self) -> None:
        info = self.query_one("#memory-info", Static)
        try:
            listed = await self.app.api.memory()  # type: ignore[attr-defined]
        except (DaemonUnreachable, ApiRefused) as exc:
            info.update(Text(f"cannot list the memory: {exc}", "red"))
            return
        self.notes, self.enabled = listed["data"], listed["enabled"]
        table = self.query_one(DataTable)
        keep = table.cursor_row
        table.clear()
        for note in self.notes:
            table.add_row(
                Text(note["status"], STATUS_STYLE.get(note["status"], "")),
                Text(note["question"] or "-"),
                Text(note["text"]),
                key=note["id"],
            )
        if self.notes:
            table.move_cursor(row=min(keep, len(self.notes) - 1))
        state = (
            "given to the model from the next message on"
            if self.enabled
            else "kept, not given to the model: memory.enabled is false in the config"
        )
        info.update(
            f"{len(self.notes)} note(s) from your corrections, {state}. "
            "learned: the adapter serving now answers it without the note. f forgets one."
        )

    def action_forget(self) -> None:
        table = self.query_one(DataTable)
        if not self.notes or table.cursor_row is None:
            return
        note = self.notes[table.cursor_row]

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.forget(note["id"])

        self.app.push_screen(
            ConfirmScreen(
                "Forget this note?",
                f"{note['text']}\nIts text leaves the database; the correction it came from "
                "stays feedback to train on.",
            ),
            confirmed,
        )

    @work(group="forget-note")
    async def forget(self, note_id: str) -> None:
        try:
            await self.app.api.forget_note(note_id)  # type: ignore[attr-defined]
        except (DaemonUnreachable, ApiRefused) as exc:
            self.app.notify(f"not forgotten: {exc}", severity="error", timeout=10)
            return
        self.app.notify("note forgotten")
        self.refresh_notes()
