"""Following a training run from `whetstone train --wait`: its progress as one line, a live
bar (or a line per stage when the output is not a terminal) until it ends, then how it
ended and what the same process goes on with."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from common.config import Settings
from orchestrator.cli_output import console, err_console, print_path

if TYPE_CHECKING:
    from candidates import Registry
    from data.store import Store


def progress_line(run: Any) -> str:
    """The run's stage, step, losses and ETA as its progress column has them."""
    progress = run.progress or {}
    stage = progress.get("stage") or run.status
    if progress.get("max_steps"):
        line = stage
        if progress.get("stages", 1) > 1:
            line += f" (stage {progress.get('stage_number', 1)}/{progress['stages']})"
        line += f" step {progress.get('step', 0)}/{progress['max_steps']}"
        loss = progress.get("loss")
        held = progress.get("eval_loss")
        if loss is not None:
            line += f" loss {loss:.3f}"
        if held is not None:
            line += f" held-out {held:.3f}"
        eta = progress.get("eta_s")
        if eta is not None:
            line += f" eta {int(eta) // 60}m{int(eta) % 60:02d}s"
        return line
    return stage


def wait_for_run(store: Store, run_id: str, process: Any) -> int | None:
    """Show the run's progress as a live bar until it ends; return its exit code (None when
    the daemon runs it: the outcome is in the store)."""
    from rich.progress import BarColumn, Progress, TextColumn

    from data.models import RUN_FINISHED

    def running() -> bool:
        # The process may go on after the run ends: a catch-up run follows a promotion.
        if store.get_run(run_id).status in RUN_FINISHED:
            return False
        return process is None or process.poll() is None

    if not (console.is_terminal and err_console.is_terminal):
        # `whetstone train --wait | tee log`: a live bar draws nothing there (26 minutes of
        # silence); a line per stage, and every 30 s while one goes on.
        shown, shown_stage, shown_at = "", None, 0.0
        while running():
            run = store.get_run(run_id)
            line = progress_line(run)
            stage = (run.progress or {}).get("stage", run.status)
            if line != shown and (stage != shown_stage or time.monotonic() - shown_at >= 30):
                console.print(f"{run_id}: {line}", highlight=False, soft_wrap=True)
                shown, shown_stage, shown_at = line, stage, time.monotonic()
            time.sleep(0.5)
        return None if process is None else process.returncode
    with Progress(
        TextColumn("[bold]{task.fields[run]}"),
        BarColumn(),
        TextColumn("{task.description}"),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task("starting", total=None, run=run_id)
        while running():
            run = store.get_run(run_id)
            progress = run.progress or {}
            total = progress.get("max_steps") or None
            bar.update(
                task,
                total=total,
                completed=progress.get("step", 0) if total else 0,
                description=progress_line(run),
            )
            time.sleep(0.5)
    return None if process is None else process.returncode


def print_outcome(
    store: Store, registry: Registry, run_id: str, code: int | None, logfile: Path
) -> str | None:
    """Say how the run ended (exit 1 when it failed); return the run that follows it in the
    same process (a catch-up after a promotion, a retry after a refusal), if any."""
    from orchestrator import jobs

    jobs.reap_dead_runs(store)
    run = store.get_run(run_id)
    evaluation = None
    if run.candidate_id:
        found = store.list_evaluations(run.candidate_id, limit=1)
        evaluation = found[0] if found else None
    current = registry.current_id()
    if run.status == "skipped":
        console.print(f"{run_id} skipped: {run.reason}")
        return None
    if run.status != "succeeded":
        err_console.print(f"{run_id} {run.status}: {run.error or f'exit code {code}'}")
        print_path("log:", logfile, out=err_console)
        raise typer.Exit(1)
    console.print(f"{run_id} trained candidate {run.candidate_id}")
    if evaluation is not None:
        reason = (evaluation.metrics or {}).get("reason", "")
        console.print(f"gate: {evaluation.decision} ({evaluation.rule}) {reason}")
        step = (evaluation.metrics or {}).get("next_step")
        if step and current != run.candidate_id:
            console.print(f"next: {step}")
        print_path("report:", evaluation.report_path)
    if current == run.candidate_id:
        console.print(f"promoted: {run.candidate_id} now serves")
    return (run.progress or {}).get("next_run")


def following_line(settings: Settings, store: Store, run_id: str) -> str:
    """What the run the same process goes on with does (development.train.follow_up)."""
    from orchestrator.schedule import RETRY_TRIGGER

    if store.get_run(run_id).trigger == RETRY_TRIGGER:
        scale = settings.training.retry_learning_rate_scale
        return f"retry: {run_id} trains again at x{scale:g} the learning rate"
    return f"catch-up: {run_id} trains on the corrections the gate just judged"
