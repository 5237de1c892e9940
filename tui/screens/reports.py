"""Candidates and their promotion reports: the list with decisions and key metrics; Enter
opens a report; promote (confirmed), rollback (confirmed), open the HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Markdown, Static

from tui.client import ApiRefused, DaemonUnreachable
from tui.screens.dialogs import ConfirmScreen
from tui.widgets.sidebar import ConnectionBar

# The metrics worth a column, in order, with how to show them.
KEY_METRICS = [
    ("correction_accuracy", "corrections", lambda v: f"{v:.0%}"),
    ("general_facts", "facts", lambda v: f"{v:g}"),
    ("holdout_nll", "held-out NLL", lambda v: f"{v:.3f}"),
]


class Actions:
    """Promote / rollback / open HTML, shared by the list and the report view; each screen
    says in `changed()` what to reload after a swap."""

    app: Any

    def changed(self) -> None:
        raise NotImplementedError

    @work(group="promotion")
    async def promote(self, candidate_id: str, *, force: bool) -> None:
        try:
            result = await self.app.api.promote(candidate_id, force=force)
        except (DaemonUnreachable, ApiRefused) as exc:
            self.app.notify(f"not promoted: {exc}", severity="error", timeout=10)
            return
        self.app.notify(
            f"{result['current']} now serves (previous: {result['previous'] or 'base'})"
        )
        self.app.check_connection()
        self.changed()

    @work(group="promotion")
    async def rollback(self) -> None:
        try:
            result = await self.app.api.rollback()
        except (DaemonUnreachable, ApiRefused) as exc:
            self.app.notify(f"not rolled back: {exc}", severity="error", timeout=10)
            return
        self.app.notify(f"rolled back: {result['current'] or 'the base model'} now serves")
        self.app.check_connection()
        self.changed()

    def ask_promote(self, candidate: dict[str, Any]) -> None:
        passed = candidate.get("decision") == "promote"
        detail = (
            "It passed the gate; the current adapter becomes `previous` (rollback returns to it)."
            if passed
            else f"It did NOT pass the gate (decision: {candidate.get('decision') or 'none'}"
            f"{', ' + candidate['rule'] if candidate.get('rule') else ''}). Promote anyway?"
        )

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.promote(candidate["id"], force=not passed)

        self.app.push_screen(ConfirmScreen(f"Promote {candidate['id']}?", detail), confirmed)

    def ask_rollback(self) -> None:
        def confirmed(yes: bool | None) -> None:
            if yes:
                self.rollback()

        self.app.push_screen(
            ConfirmScreen(
                "Roll back to the previous adapter?",
                "The one serving now stays on disk; you can promote it again.",
            ),
            confirmed,
        )

    def open_html(self, candidate: dict[str, Any]) -> None:
        """Open the page in a browser where this terminal can, and say where it is (over SSH
        or tmux nothing opens, and `o` seemed to do nothing)."""
        path = candidate.get("report_html_path")
        if path and Path(path).is_file():
            where = Path(path).as_uri()
        elif candidate.get("report_html_url"):
            where = self.app.api.url + candidate["report_html_url"]
        else:
            self.app.notify("this candidate has no HTML report yet", severity="warning")
            return
        self.app.open_url(where)
        self.app.notify(f"HTML report: {where}", timeout=20)


class ReportsScreen(Actions, Screen[None]):
    BINDINGS = [
        Binding("p", "promote", "Promote"),
        Binding("b", "rollback", "Rollback"),
        Binding("o", "html", "HTML report"),
        Binding("r", "refresh", "Refresh"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield ConnectionBar(id="connection")
        yield Static(id="reports-info")
        yield DataTable(id="candidates", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("", "candidate", "created", "decision", "rule")
        table.add_columns(*(label for _, label, _ in KEY_METRICS))
        self.watch(self.app, "connection", lambda c: c.up and self.refresh_candidates())

    def on_screen_resume(self) -> None:
        self.refresh_candidates()

    def action_refresh(self) -> None:
        self.refresh_candidates()

    @work(exclusive=True, group="candidates")
    async def refresh_candidates(self) -> None:
        info = self.query_one("#reports-info", Static)
        try:
            self.rows = await self.app.api.candidates()  # type: ignore[attr-defined]
        except (DaemonUnreachable, ApiRefused) as exc:
            info.update(Text(f"cannot list candidates: {exc}", "red"))
            return
        table = self.query_one(DataTable)
        keep = table.cursor_row
        table.clear()
        for row in self.rows:
            mark = "●" if row.get("current") else ("p" if row.get("previous") else "")
            scores = row.get("scores") or {}
            cells = [
                fmt(scores[key]) if isinstance(scores.get(key), int | float) else "-"
                for key, _, fmt in KEY_METRICS
            ]
            decision = row.get("decision") or ("invalid" if not row.get("valid") else "-")
            style = {"promote": "green", "reject": "red", "invalid": "red"}.get(decision, "")
            table.add_row(
                mark,
                row["id"],
                (row.get("created_at") or "")[:16].replace("T", " "),
                Text(decision, style),
                Text(row.get("error") or row.get("rule") or ""),
                *cells,
                key=row["id"],
            )
        if self.rows:
            table.move_cursor(row=min(keep, len(self.rows) - 1))
            info.update("● serving   p previous   Enter opens a report")
        else:
            info.update("no candidates yet: train one from the status screen (F3, then t)")

    def _selected(self) -> dict[str, Any] | None:
        table = self.query_one(DataTable)
        if not self.rows or table.cursor_row is None:
            return None
        return self.rows[table.cursor_row]

    @on(DataTable.RowSelected)
    def _row_selected(self) -> None:
        self.action_open()

    def action_open(self) -> None:
        if (row := self._selected()) is not None:
            self.app.push_screen(ReportScreen(row["id"]))

    def action_promote(self) -> None:
        if (row := self._selected()) is not None:
            self.ask_promote(row)

    def action_rollback(self) -> None:
        self.ask_rollback()

    @work(group="open-html")
    async def action_html(self) -> None:
        if (row := self._selected()) is None:
            return
        try:
            detail = await self.app.api.candidate(row["id"])  # type: ignore[attr-defined]
        except (DaemonUnreachable, ApiRefused) as exc:
            self.notify(str(exc), severity="error")
            return
        self.open_html(detail)

    def changed(self) -> None:
        self.refresh_candidates()


class ReportScreen(Actions, Screen[None]):
    """One candidate's Markdown report."""

    BINDINGS = [
        Binding("escape,q", "app.pop_screen", "Back", key_display="esc"),
        Binding("p", "promote", "Promote"),
        Binding("o", "html", "HTML report"),
    ]

    def __init__(self, candidate_id: str) -> None:
        super().__init__()
        self.candidate_id = candidate_id
        self.detail: dict[str, Any] | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield ConnectionBar(id="connection")
        with VerticalScroll(id="report"):
            yield Markdown(f"loading the report of {self.candidate_id}…", id="report-body")
        yield Footer()

    def on_mount(self) -> None:
        self.load()

    @work(exclusive=True, group="report")
    async def load(self) -> None:
        body = self.query_one("#report-body", Markdown)
        try:
            self.detail = await self.app.api.candidate(self.candidate_id)  # type: ignore[attr-defined]
        except (DaemonUnreachable, ApiRefused) as exc:
            await body.update(f"**Cannot load {self.candidate_id}:** {exc}")
            return
        markdown = self.detail.get("report_markdown")
        if markdown is None:
            markdown = (
                f"# {self.candidate_id}\n\nNo report yet: it has not been evaluated "
                f"(`whetstone eval {self.candidate_id}`)."
            )
        await body.update(markdown)
        self.query_one(VerticalScroll).focus()

    def action_promote(self) -> None:
        if self.detail is not None:
            self.ask_promote(self.detail)

    def action_html(self) -> None:
        if self.detail is not None:
            self.open_html(self.detail)

    def changed(self) -> None:
        self.load()
