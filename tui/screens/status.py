"""What the daemon is doing: run state, devices, the adapter serving, the training recipe
(adopted by the recipe search or the config's), the training job with
a live progress bar, the schedule, recent errors, the last weeks day by day (`whetstone
trend`); `t` asks for a training run now."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Label, ProgressBar, Static

from tui.client import ApiRefused, DaemonUnreachable
from tui.screens.dialogs import ConfirmScreen
from tui.widgets.sidebar import ConnectionBar

POLL_S = 1.0
TREND_POLL_S = 60.0  # the trend reads weeks of answers: not every second
TREND_WEEKS = 4


class StatusScreen(Screen[None]):
    BINDINGS = [
        Binding("t", "train", "Train now"),
        Binding("r", "refresh", "Refresh"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        yield ConnectionBar(id="connection")
        with VerticalScroll(id="status"):
            yield Static(id="overview", classes="panel")
            with Vertical(id="training", classes="panel"):
                yield Label("training", classes="panel-title")
                yield Static(id="run-line")
                yield ProgressBar(id="run-progress", show_eta=False)
            yield Static(id="schedule", classes="panel")
            yield Static(id="errors", classes="panel")
            yield Static(id="trend", classes="panel")
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(POLL_S, self.action_refresh)
        self.set_interval(TREND_POLL_S, self.load_trend)
        self.action_refresh()
        self.load_trend()

    def action_refresh(self) -> None:
        if self.is_current:
            self.poll()

    def on_screen_resume(self) -> None:
        self.action_refresh()
        self.load_trend()

    @work(exclusive=True, group="trend")
    async def load_trend(self) -> None:
        try:
            data = await self.app.api.trend(TREND_WEEKS)  # type: ignore[attr-defined]
        except (DaemonUnreachable, ApiRefused) as exc:
            self.query_one("#trend", Static).update(Text(f"no trend: {exc}", "red"))
            return
        title = Text(f"the last {TREND_WEEKS} weeks\n", "bold")
        self.query_one("#trend", Static).update(title + Text(data["text"]))

    @work(exclusive=True, group="status")
    async def poll(self) -> None:
        try:
            data = await self.app.api.status()  # type: ignore[attr-defined]
        except (DaemonUnreachable, ApiRefused) as exc:
            self.query_one("#overview", Static).update(Text(f"no status: {exc}", "bold red"))
            return
        self.show(data)

    def show(self, data: dict[str, Any]) -> None:
        daemon = data.get("daemon") or {}
        overview = Table.grid(padding=(0, 2))
        overview.add_column(style="bold", no_wrap=True)
        overview.add_column(overflow="fold")
        if daemon:
            overview.add_row("daemon", f"{daemon.get('state')} (pid {daemon.get('pid')})")
            plan = daemon.get("devices") or {}
            overview.add_row(
                "devices",
                f"serving on {plan.get('production')}, training on {plan.get('development')}",
            )
            worker = daemon.get("worker") or {}
            line = f"{worker.get('state')} at {worker.get('url')}"
            if worker.get("restarts"):
                line += f", {worker['restarts']} restart(s)"
            overview.add_row("API worker", line)
        else:
            overview.add_row("daemon", "none: this worker runs alone (`whetstone serve`)")
            overview.add_row("device", str(data.get("device")))
        overview.add_row("base model", str(data.get("base_model")))
        overview.add_row("serving", data.get("adapter_id") or "the base model (no adapter)")
        if data.get("last_swap_error"):
            overview.add_row("refused", Text(data["last_swap_error"], "red"))
        promo = data.get("last_promotion")
        if promo:
            overview.add_row(
                "last promotion",
                f"{promo['action']} {promo.get('candidate_id') or 'base'} "
                f"at {promo['created_at'][:19]}",
            )
        recipe = data.get("recipe") or {}
        if recipe.get("line"):
            overview.add_row("recipe", recipe["line"])
        waiting = (daemon.get("experiments") or {}).get("waiting_because")
        if waiting:
            overview.add_row("search waits", waiting)
        until = data.get("feedback_until_run")
        if until is not None:
            overview.add_row(
                "next run", f"after {until} more rating(s) or correction(s), or nightly"
            )
        if daemon.get("preparing") == "base answers":
            overview.add_row("preparing", "the base model's answers (training waits for them)")
        overview.add_row("requests", f"{data.get('requests_served')} served since start")
        self.query_one("#overview", Static).update(overview)
        self._show_run(data.get("running_run"), daemon.get("training"), data.get("last_run"))
        self._show_schedule(daemon.get("schedule") or [])
        self._show_errors(daemon)

    def _show_run(
        self,
        run: dict[str, Any] | None,
        training: dict[str, Any] | None,
        last: dict[str, Any] | None = None,
    ) -> None:
        line = self.query_one("#run-line", Static)
        bar = self.query_one("#run-progress", ProgressBar)
        if run is None:
            text = Text("no training job is running (t starts one)")
            if last:
                text.append(f"\nlast run {last['id']}: {last['status']}")
                if last.get("decision"):
                    text.append(f", {last['decision']} ({last.get('rule')})")
                why = last.get("reason") or last.get("error") or last.get("gate_reason")
                if why:
                    text.append(f": {why}")
                if last.get("next_step") and last.get("decision") != "promote":
                    text.append(f"\nnext: {last['next_step']}", "bold")
            line.update(text)
            bar.display = False
            return
        progress = run.get("progress") or {}
        stage = progress.get("stage") or "starting"
        text = Text.assemble((run["id"], "bold"), f" {run.get('profile')} · {stage}")
        total = progress.get("max_steps") or 0
        bar.display = True
        if total:
            step = progress.get("step") or 0
            if progress.get("stages", 1) > 1:
                text.append(f" (stage {progress.get('stage_number', 1)}/{progress['stages']})")
            text.append(f" · step {step}/{total}")
            if progress.get("loss") is not None:
                text.append(f" · loss {progress['loss']:.3f}")
            if progress.get("eval_loss") is not None:
                text.append(f" · held-out {progress['eval_loss']:.3f}")
            if progress.get("eta_s") is not None:
                eta = int(progress["eta_s"])
                text.append(f" · ETA {eta // 60}m{eta % 60:02d}s")
            bar.update(total=total, progress=step)
        else:
            bar.update(total=None)
        line.update(text)

    def _show_schedule(self, jobs: list[dict[str, Any]]) -> None:
        text = Text("next runs\n", "bold")
        if not jobs:
            text.append("none scheduled (no daemon, or schedule off)", "italic")
        for job in jobs:
            text.append(f"{job['id']}: {str(job.get('next_run_at'))[:19]}\n", "")
        self.query_one("#schedule", Static).update(text)

    def _show_errors(self, daemon: dict[str, Any]) -> None:
        text = Text("recent errors\n", "bold")
        errors = list(daemon.get("errors") or [])[-5:]
        worker = daemon.get("worker") or {}
        if worker.get("last_error"):
            errors.append({"at": "worker", "error": worker["last_error"]})
        if not errors:
            text.append("none", "italic")
        for err in errors:
            text.append(f"{str(err.get('at'))[:19]} ", "dim")
            text.append(f"{err.get('error')}\n", "red")
        self.query_one("#errors", Static).update(text)

    def action_train(self) -> None:
        def confirmed(yes: bool | None) -> None:
            if yes:
                self.train()

        self.app.push_screen(
            ConfirmScreen(
                "Train a new candidate now?",
                "It learns from the feedback so far, is evaluated against the current "
                "adapter, and is promoted only if it wins.",
            ),
            confirmed,
        )

    @work(group="train")
    async def train(self) -> None:
        try:
            run = await self.app.api.train()  # type: ignore[attr-defined]
        except (DaemonUnreachable, ApiRefused) as exc:
            self.notify(f"not started: {exc}", severity="error", timeout=8)
            return
        how = "queued with the daemon" if run.get("queued_with_daemon") else "started"
        self.notify(f"{how}: {run['run_id']} ({run['profile']})")
        self.action_refresh()
