"""The tables and summary lines the CLI prints: `whetstone status`, the candidates, the
recipe search's trials, and the sizes and adapters of a backup."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

from common.config import Settings
from orchestrator.cli_training import progress_line

if TYPE_CHECKING:
    from orchestrator.status import HomeStatus


def status_table(found: HomeStatus, settings: Settings) -> Table:
    """`whetstone status` as a two-column table, most of it from the daemon's state."""
    from orchestrator import experiments

    data, training = found.as_dict(), found.training
    daemon, server = training.daemon, found.server
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # errors and paths in full, wrapped
    table.add_row("home", data["home"])
    table.add_row("daemon", data["run_state"] + (f" (pid {daemon['pid']})" if daemon else ""))
    if daemon:
        plan = daemon.get("devices") or {}
        table.add_row(
            "devices", f"production {plan.get('production')}, development {plan.get('development')}"
        )
        worker = daemon.get("worker") or {}
        line = f"{worker.get('state')} at {worker.get('url')}"
        if worker.get("uptime_s") is not None:
            line += f", up {int(worker['uptime_s'])} s"
        if worker.get("restarts"):
            line += f", {worker['restarts']} restart(s)"
        table.add_row("API worker", line)
        if worker.get("state") in ("failed", "restarting") and worker.get("last_error"):
            table.add_row("worker error", escape(worker["last_error"]))
        if daemon.get("preparing") == "base answers":
            table.add_row(
                "preparing", "the base model's answers to the replay prompts (runs wait for them)"
            )
        for job in daemon.get("schedule") or []:
            table.add_row(f"next {job['id']}", str(job.get("next_run_at")))
        for err in (daemon.get("errors") or [])[-3:]:
            table.add_row("recent error", escape(f"{err['at']} {err['error']}"))
    elif server:
        table.add_row("API worker", f"at {server['url']} (no daemon: started by `whetstone serve`)")
    table.add_row("base model", data["base_model"])
    table.add_row("current adapter", data["current_adapter"] or "none (the base model serves)")
    table.add_row("previous", data["previous_adapter"] or "none")
    table.add_row("data", counts_line(data["counts"]))
    run = data["last_run"]
    if run is None:
        table.add_row("last run", "none")
    else:
        trial = ", recipe trial" if run["trigger"] == experiments.EXPERIMENT_TRIGGER else ""
        line = f"{run['id']} {run['status']} ({run['profile']}{trial})"
        if run["status"] == "running":
            line += f": {progress_line(training.latest_run)}"
        elif run["status"] in ("failed", "skipped"):
            line += f": {run['error'] or run['reason']}"
        elif run["candidate_id"]:
            line += f" -> {run['candidate_id']}"
        table.add_row("last run", line)
    promo = data["last_promotion"]
    table.add_row(
        "last promotion",
        f"{promo['action']} {promo['candidate_id'] or 'base'} at {promo['created_at']}"
        if promo
        else "none",
    )
    until = data["feedback_until_run"]
    if until is not None:
        table.add_row(
            "next run",
            f"after {until} more rating(s) or correction(s) "
            f"(schedule.every_n_feedback = {settings.schedule.every_n_feedback}), or nightly",
        )
    table.add_row("recipe", escape(experiments.describe(data["recipe"])))
    waiting = ((daemon or {}).get("experiments") or {}).get("waiting_because")
    if waiting:
        table.add_row("search waits", escape(waiting))
    return table


def counts_line(counts: dict[str, Any]) -> str:
    """ "conversations: 3, ..., runs: 2 succeeded, 1 failed" (runs by status, zeros left out)."""
    parts = []
    for key, value in counts.items():
        if isinstance(value, dict):
            value = ", ".join(f"{n} {status}" for status, n in value.items() if n) or "none"
        parts.append(f"{key.replace('_', ' ')}: {value}")
    return ", ".join(parts)


def candidates_table(rows: list[dict[str, Any]]) -> Table:
    """One row per candidate (orchestrator.promotion.candidate_rows), marked current (*) or
    previous (p)."""
    # Ids whole, never cut at 80 columns: they are what `promote` and `report` take.
    table = Table("")
    table.add_column("id", no_wrap=True, min_width=max(len(row["id"]) for row in rows))
    for header in ("created", "status", "decision"):
        table.add_column(header)
    table.add_column("note", overflow="fold")
    for row in rows:
        mark = "*" if row["current"] else ("p" if row["previous"] else "")
        note = row["error"] or (row["rule"] or "")
        table.add_row(
            mark,
            row["id"],
            (row["created_at"] or "")[:19],
            row["status"] or "invalid",
            row["decision"] or "-",
            note,
        )
    return table


def trials_table(found: dict[str, Any]) -> Table:
    """The recipe search's trials (experiments.summary's study), one row each."""
    from orchestrator import experiments

    table = Table(
        "trial", "state", "validation NLL", "learning_rate", "max_steps", "lora_r", "replay"
    )
    for trial in (found.get("study") or {}).get("trials", []):
        params = trial["params"]
        value = trial["validation_nll"]
        table.add_row(
            f"#{trial['number']}" + (" (baseline)" if trial["baseline"] else ""),
            trial["state"] + ("" if trial["fits_gate"] else ", loses general knowledge"),
            "-" if value is None else f"{value:.4f}",
            *(experiments.knob_text(params.get(k, "-")) for k in experiments.KNOBS),
        )
    return table


def size_text(size: int) -> str:
    """A byte count as people read it: 512 bytes, 3.4 MB."""
    value = float(size)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{int(value)} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def adapters_text(manifest: dict[str, Any]) -> str:
    """The champions a backup holds: current and previous, or none."""
    if manifest.get("current") is None and manifest.get("previous") is None:
        return "none (the base model serves)"
    current = manifest.get("current") or "none (the base model serves)"
    return f"current {current}, previous {manifest.get('previous') or 'none'}"
