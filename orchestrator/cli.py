"""`whetstone`: the command line. Every command takes --home (default $WHETSTONE_HOME or
~/.local/share/whetstone) and --set KEY=VALUE to override one config key for this run.

This module never imports torch: the torch-side checks run as subprocesses
(`python -m production.model.doctor`, `python -m production.model.base_model`).

One module on purpose: every `whetstone` command, each a short typer function over the rooms
below it, so `whetstone --help` and this file list the same things.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from common.config import (
    EMBEDDED_MODEL,
    ConfigError,
    ConsoleFilter,
    Settings,
    load_settings,
    log_resolved,
    parse_sets,
)
from common.entrypoint import whetstone_command

if TYPE_CHECKING:  # imported lazily at run time: `whetstone --help` stays fast
    from candidates import Registry
    from data.store import Store
    from orchestrator.status import HomeStatus


class _HelpFlag:
    """--help is a flag: typer 0.29 shows its type as `<bool>` beside it, read as a value."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class _Group(_HelpFlag, TyperGroup):
    pass


class _Command(_HelpFlag, TyperCommand):
    pass


app = typer.Typer(
    help="whetstone: a personal LLM that learns from the one person who uses it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Group,
)
console = Console()
err_console = Console(stderr=True)
log = logging.getLogger("whetstone")

HomeOpt = Annotated[
    Path | None,
    typer.Option(
        "--home", help="State folder (default: $WHETSTONE_HOME or ~/.local/share/whetstone)."
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key for this run, e.g. --set server.port=9000."),
]
# metavar "": a flag takes no value (typer would show `<bool>` in --help).
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.", metavar="")]


def _fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def settings_for(home: Path | None, sets: list[str] | None, **flags: Any) -> Settings:
    try:
        overrides = parse_sets(sets)
        for dotted, value in flags.items():
            if value is not None:
                section, _, key = dotted.partition("__")
                overrides.setdefault(section, {})[key] = value
        settings = load_settings(home, overrides)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    # One-shot commands stay quiet: warnings and errors only, unless log_level is DEBUG
    # (the long-running `serve` and `up` log the resolved config at INFO).
    quiet = settings.log_level if settings.log_level == "DEBUG" else "WARNING"
    logging.basicConfig(
        level=quiet, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    log_resolved(settings)
    return settings


def open_store(settings: Settings, *, existing_home: bool = False) -> Store:
    """The home's store. `existing_home`: a command that only reads (status, candidates)
    refuses a home that does not exist instead of creating one at a mistyped path."""
    from sqlalchemy.exc import OperationalError

    from data.errors import StoreError
    from data.store import Store

    root = settings.paths.root
    if existing_home and not root.is_dir():
        raise _fail(
            f"no whetstone home at {root}: check --home / WHETSTONE_HOME "
            f"(`whetstone doctor --home {root}` creates one)"
        )
    try:
        settings.paths.create()
    except OSError as exc:
        raise _fail(f"cannot write the home {root}: {exc.strerror} ({exc.filename})") from None
    try:
        return Store(settings.db_url)
    except StoreError as exc:
        raise _fail(str(exc)) from None
    except OperationalError as exc:  # e.g. a read-only home, or a locked database
        raise _fail(f"cannot open the database {settings.db_url}: {exc.orig}") from None


def open_registry(settings: Settings) -> Registry:
    from candidates.registry import Registry

    return Registry(settings.paths.candidates_dir)


def _python() -> str:
    return sys.executable


# --------------------------------------------------------------------------------- doctor


@app.command(cls=_Command)
def doctor(
    home: HomeOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    prepare: Annotated[
        bool, typer.Option(help="Prepare the embedded default model if it is not yet.", metavar="")
    ] = True,
) -> None:
    """Check this machine and the home; prepare the embedded default model once."""
    settings = settings_for(home, set_)
    paths = settings.paths.create()
    if prepare and settings.model.base_model == EMBEDDED_MODEL:
        # Runs in its own process: the conversion imports torch, the orchestrator never does.
        code = subprocess.call(
            [_python(), "-m", "production.model.base_model", "--home", str(paths.root)],
            stdout=subprocess.DEVNULL,
        )
        if code != 0:
            raise _fail("preparing the embedded default model failed (see above)")
        # Its answers to the replay prompts are made by the daemon once its API is up (the
        # person chats meanwhile), or by the first training run: not here, where they held
        # `make run`'s first chat back 155 s.
    probe = subprocess.run(
        [_python(), "-m", "production.model.doctor", "--home", str(paths.root)],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        raise _fail(f"the torch probe failed:\n{probe.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(probe.stdout.strip().splitlines()[-1])
    report["home"] = str(paths.root)
    report["config_file"] = str(paths.config_file) if paths.config_file.exists() else None
    report["model_profile"] = settings.model.model_dump()
    report["devices"] = settings.devices.model_dump()
    store = open_store(settings)
    from data.db import schema_version

    report["database"] = {"url": settings.db_url, "schema_version": schema_version(store.engine)}
    store.close()
    if as_json:
        console.print_json(json.dumps(report))
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("home", report["home"])
    table.add_row("python", report["python"])
    table.add_row("torch", f"{report['torch']} (CUDA {report['cuda_version'] or 'none'})")
    if report["cuda_devices"]:
        for dev in report["cuda_devices"]:
            table.add_row(
                f"cuda:{dev['index']}",
                f"{dev['name']}: {dev['free_gib']} GiB free of {dev['total_gib']} GiB",
            )
    else:
        table.add_row("GPUs", "none: serving and training run on the CPU")
    for name, version in report["versions"].items():
        table.add_row(name, version or "not installed")
    model = report["model"]
    table.add_row("model profile", f"{settings.model.preset}: {settings.model.base_model}")
    if model["loadable"]:
        took = f" (loads in {model['load_seconds']} s)" if "load_seconds" in model else ""
        table.add_row("model", f"[green]loadable here[/]{took}: {model.get('path')}")
    else:
        table.add_row("model", "[red]cannot load here[/]: " + "; ".join(model["problems"]))
    fit = report.get("memory_fit")
    if fit and fit.get("kv_cache_gib") is not None:
        table.add_row(
            "serving window",
            f"{fit['serving_window']:,} tokens (model.context_window): "
            f"{fit['kv_cache_gib']} GiB of KV cache reserved at start-up",
        )
    for gpu in (fit or {}).get("gpus", []):
        roles = " + ".join(gpu["roles"]) or "nothing planned"
        verdict = "[green]fits[/]" if gpu["fits"] else "[red]does not fit[/]: "
        table.add_row(
            f"cuda:{gpu['index']} memory",
            f"{roles}: needs ~{gpu['need_gib']} of {gpu['total_gib']} GiB (measured), "
            + verdict
            + "; ".join(gpu["problems"]),
        )
    table.add_row("database", f"{settings.db_url} (schema {report['database']['schema_version']})")
    console.print(table)
    if not model["loadable"]:
        raise typer.Exit(1)
    command, home_arg = whetstone_command(), f"--home {settings.paths.root}"
    console.print(
        f"next: `{command} up {home_arg}` starts the daemon (`make run` starts it right after "
        f"this); then, in a second terminal, `{command} chat {home_arg}`: ask, rate 1-5, "
        "correct with c; it trains by itself",
        highlight=False,
        soft_wrap=True,
    )


# --------------------------------------------------------------------------------- status


@app.command(cls=_Command)
def status(home: HomeOpt = None, set_: SetOpt = None, as_json: JsonOpt = False) -> None:
    """What the home holds now: champion, data counts, last runs, the API worker."""
    from orchestrator.status import read_home_status

    settings = settings_for(home, set_)
    store = open_store(settings, existing_home=True)
    registry = open_registry(settings)
    try:
        found = read_home_status(settings, store, registry)
    finally:
        store.close()
    if as_json:
        console.print_json(json.dumps(found.as_dict(), default=str))
        return
    console.print(_status_table(found, settings))


def _status_table(found: HomeStatus, settings: Settings) -> Table:
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
    table.add_row("data", _counts_line(data["counts"]))
    run = data["last_run"]
    if run is None:
        table.add_row("last run", "none")
    else:
        trial = ", recipe trial" if run["trigger"] == experiments.EXPERIMENT_TRIGGER else ""
        line = f"{run['id']} {run['status']} ({run['profile']}{trial})"
        if run["status"] == "running":
            line += f": {_progress_line(training.latest_run)}"
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


def _counts_line(counts: dict[str, Any]) -> str:
    """ "conversations: 3, ..., runs: 2 succeeded, 1 failed" (runs by status, zeros left out)."""
    parts = []
    for key, value in counts.items():
        if isinstance(value, dict):
            value = ", ".join(f"{n} {status}" for status, n in value.items() if n) or "none"
        parts.append(f"{key.replace('_', ' ')}: {value}")
    return ", ".join(parts)


@app.command("candidates", cls=_Command)
def candidates_cmd(home: HomeOpt = None, set_: SetOpt = None, as_json: JsonOpt = False) -> None:
    """List the trained adapters, which one serves, and how each was judged."""
    from orchestrator.promotion import candidate_rows

    settings = settings_for(home, set_)
    store = open_store(settings, existing_home=True)
    registry = open_registry(settings)
    try:
        rows = candidate_rows(store, registry)
    finally:
        store.close()
    if as_json:
        console.print_json(json.dumps(rows, default=str))
        return
    if not rows:
        console.print("no candidates yet: `whetstone train` makes one")
        return
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
    console.print(table)
    console.print("* current   p previous")


# ------------------------------------------------------------------------- promote/rollback


@app.command(cls=_Command)
def promote(
    candidate_id: Annotated[str, typer.Argument(metavar="ID", help="Candidate to make current.")],
    home: HomeOpt = None,
    set_: SetOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Promote without a passing evaluation.", metavar="")
    ] = False,
) -> None:
    """Make a candidate the champion (the old one becomes `previous`)."""
    from candidates import RegistryError
    from orchestrator import promotion

    settings = settings_for(home, set_)
    registry = open_registry(settings)
    store = open_store(settings)
    try:
        result = promotion.promote(settings, store, registry, candidate_id, force=force)
    except (RegistryError, ValueError, promotion.PromotionRefused) as exc:
        raise _fail(str(exc)) from None
    finally:
        store.close()
    console.print(f"current -> {result.new_current} (previous: {result.previous or 'base model'})")
    console.print(promotion.notify_worker(settings))


@app.command(cls=_Command)
def rollback(home: HomeOpt = None, set_: SetOpt = None) -> None:
    """Swap back to the previous champion."""
    from candidates import RegistryError
    from orchestrator import promotion

    settings = settings_for(home, set_)
    registry = open_registry(settings)
    store = open_store(settings)
    try:
        result = promotion.rollback(settings, store, registry)
    except RegistryError as exc:
        raise _fail(str(exc)) from None
    finally:
        store.close()
    now = result.new_current or "the base model (no adapter)"
    console.print(f"current -> {now} (previous: {result.previous})")
    console.print(promotion.notify_worker(settings))


# ---------------------------------------------------------------------------------- export


@app.command(cls=_Command)
def export(
    home: HomeOpt = None,
    set_: SetOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for sft/dpo/kto .jsonl (default <home>/exports/<time>)."),
    ] = None,
) -> None:
    """Write the feedback as TRL-ready JSONL: SFT (messages), DPO (prompt/chosen/rejected), KTO."""
    from data.exports import export_all

    settings = settings_for(home, set_)
    target = out or settings.paths.root / "exports" / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    if target.exists() and not target.is_dir():
        raise _fail(f"--out {target} exists and is not a folder")
    store = open_store(settings)
    try:
        counts = export_all(store, target)
    except OSError as exc:
        raise _fail(f"cannot write the export to {target}: {exc.strerror or exc}") from None
    finally:
        store.close()
    for kind, n in counts.items():
        console.print(f"{kind}: {n} rows -> {target / f'{kind}.jsonl'}")


# -------------------------------------------------------------------------- backup/restore


def _size_text(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{int(value)} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _adapters_text(manifest: dict[str, Any]) -> str:
    if manifest.get("current") is None and manifest.get("previous") is None:
        return "none (the base model serves)"
    current = manifest.get("current") or "none (the base model serves)"
    return f"current {current}, previous {manifest.get('previous') or 'none'}"


@app.command(cls=_Command)
def backup(
    dest: Annotated[
        Path | None,
        typer.Argument(
            metavar="DIR",
            help="Folder to write (default <home>/backups/<time>); an earlier backup there is "
            "replaced once the new one is complete.",
        ),
    ] = None,
    home: HomeOpt = None,
    set_: SetOpt = None,
) -> None:
    """Copy the home while it runs: the database, the current and previous adapters, the
    config, with a manifest of checksums. `whetstone restore DIR` puts it back."""
    from orchestrator.backup import BackupError, create_backup

    settings = settings_for(home, set_)
    try:
        result = create_backup(settings, dest)
    except BackupError as exc:
        raise _fail(str(exc)) from None
    manifest = result.manifest
    listed = {entry["path"] for entry in manifest["files"]}
    also = [name for name in ("config.toml", "recipe.json", "experiments.db") if name in listed]
    console.print(f"backup written to {result.path}", highlight=False, soft_wrap=True)
    console.print(
        f"  database: {manifest['conversations']} conversation(s), schema "
        f"{manifest['schema_revision']}, integrity ok\n"
        f"  adapters: {_adapters_text(manifest)}\n"
        f"  also: {', '.join(also) or 'nothing else'}\n"
        f"  size: {_size_text(result.size)} in {len(manifest['files'])} file(s)",
        highlight=False,
        soft_wrap=True,
    )


@app.command(cls=_Command)
def restore(
    source: Annotated[
        Path, typer.Argument(metavar="DIR", help="A folder `whetstone backup` wrote.")
    ],
    home: HomeOpt = None,
    set_: SetOpt = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Restore over a home that holds data; its files are moved aside, not deleted. "
            "A damaged backup is refused all the same.",
            metavar="",
        ),
    ] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check", help="Only verify the backup (checksums, schema, integrity).", metavar=""
        ),
    ] = False,
) -> None:
    """Put a backup back into the home, all or nothing, after checking every file."""
    from orchestrator.backup import RestoreRefused, restore_backup, verify_backup

    settings = settings_for(home, set_)
    try:
        if check:
            manifest = verify_backup(source)
        else:
            result = restore_backup(settings, source, force=force)
            manifest = result.manifest
    except RestoreRefused as exc:
        raise _fail(f"not restored: {exc}" if not check else str(exc)) from None
    written = (
        f"written {manifest.get('created_at', '?')} "
        f"by whetstone {manifest.get('whetstone_version', '?')}"
    )
    if check:
        console.print(
            f"{source}: a whole backup ({written}): {len(manifest['files'])} file(s) match their "
            f"checksums, schema {manifest['schema_revision']}, integrity ok\n"
            f"  {manifest['conversations']} conversation(s); adapters: {_adapters_text(manifest)}",
            highlight=False,
            soft_wrap=True,
        )
        return
    migrated = manifest["schema_revision"] != result.schema_revision
    schema = (
        f"schema {manifest['schema_revision']} -> {result.schema_revision} (migrated)"
        if migrated
        else f"schema {result.schema_revision}"
    )
    console.print(
        f"restored {source} into {result.home} ({written})", highlight=False, soft_wrap=True
    )
    console.print(
        f"  database: {manifest['conversations']} conversation(s), {schema}\n"
        f"  adapters: {_adapters_text(manifest)}",
        highlight=False,
        soft_wrap=True,
    )
    if result.moved_aside is not None:
        console.print(
            f"  the home's earlier files were moved to {result.moved_aside}",
            highlight=False,
            soft_wrap=True,
        )
    if result.carried:
        console.print(f"  kept from this machine: {', '.join(result.carried)}", highlight=False)


# ------------------------------------------------------------------------------ the daemon


class _JournalFormatter(logging.Formatter):
    """Under systemd (JOURNAL_STREAM set) each line starts with its syslog priority, so
    `journalctl -p err` works; journald adds the time itself."""

    def format(self, record: logging.LogRecord) -> str:
        priority = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}
        return f"<{priority.get(record.levelname, 6)}>{super().format(record)}"


def _daemon_logging(settings: Settings) -> None:
    from logging.handlers import RotatingFileHandler

    root = logging.getLogger()
    for handler in list(root.handlers):  # settings_for's quiet one-shot handler
        root.removeHandler(handler)
    root.setLevel(settings.log_level)
    stderr = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        stderr.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        stderr.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    settings.paths.logs_dir.mkdir(parents=True, exist_ok=True)
    logfile = RotatingFileHandler(
        settings.paths.logs_dir / "daemon.log", maxBytes=10_000_000, backupCount=3
    )
    logfile.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    stderr.addFilter(ConsoleFilter())  # the resolved config goes to daemon.log only
    root.addHandler(stderr)
    root.addHandler(logfile)
    # apscheduler.scheduler repeats each "schedule: ..." line the daemon logs itself.
    for noisy in ("apscheduler.executors", "apscheduler.scheduler", "httpx", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command(cls=_Command)
def up(
    home: HomeOpt = None,
    set_: SetOpt = None,
    host: Annotated[str | None, typer.Option(help="API bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="API TCP port (default 8321).")] = None,
) -> None:
    """Run the daemon in the foreground: the API worker, the schedule, training, promotions.

    systemd runs it (see `whetstone install-service`); SIGTERM or Ctrl-C stops it cleanly."""
    import asyncio

    from common.config import check_bind
    from common.run_state import HomeBusy, daemon_pid
    from orchestrator.daemon import run_daemon

    settings = settings_for(home, set_, server__host=host, server__port=port)
    _check_token(settings)
    try:
        check_bind(settings)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    owner = daemon_pid(settings.paths.root)
    if owner is not None:  # before any logging or banner: nothing of ours was started
        raise _fail(str(HomeBusy(settings.paths.root, owner)))
    _daemon_logging(settings)
    log_resolved(settings)
    log.info("resolved config: in %s", settings.paths.logs_dir / "daemon.log")
    host_shown = settings.server.host
    command = whetstone_command()
    console.print(
        f"whetstone up: home {settings.paths.root}\n"
        f"  API: http://{host_shown}:{settings.server.port}/v1 (OpenAI-compatible; ready once the "
        "model has loaded)\n"
        f"  chat: {command} chat --home {settings.paths.root}\n"
        f"  status: {command} status --home {settings.paths.root}\n"
        "  stop: Ctrl-C (or SIGTERM)",
        highlight=False,
    )
    try:
        code = asyncio.run(run_daemon(settings))
    except HomeBusy as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(code)


UNIT_TEMPLATE = Path(__file__).resolve().parent.parent / "systemd" / "whetstone.service"
# Where pip puts the unit for a regular (non-editable) install: pyproject's data-files.
INSTALLED_UNIT_TEMPLATE = Path("share") / "whetstone" / "systemd" / "whetstone.service"


def unit_template() -> Path:
    """The unit file of this install: the checkout's systemd/ (editable install), else the
    copy a wheel installs under the environment's prefix."""
    for candidate in (UNIT_TEMPLATE, Path(sys.prefix) / INSTALLED_UNIT_TEMPLATE):
        if candidate.is_file():
            return candidate
    raise _fail(
        f"the systemd unit template is missing: neither {UNIT_TEMPLATE} nor "
        f"{Path(sys.prefix) / INSTALLED_UNIT_TEMPLATE} exists; reinstall whetstone"
    )


@app.command("install-service", cls=_Command)
def install_service(
    home: HomeOpt = None,
    set_: SetOpt = None,
    unit_dir: Annotated[
        Path | None,
        typer.Option(help="Where to write the unit (default: ~/.config/systemd/user)."),
    ] = None,
) -> None:
    """Write the systemd user unit that runs `whetstone up` for this home, and say how to
    enable it."""
    from common.fs import atomic_write_text

    settings = settings_for(home, set_)
    executable = Path(sys.executable).parent / "whetstone"
    if not executable.is_file():
        raise _fail(f"{executable} not found: install whetstone into this environment first")
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    target_dir = unit_dir or config_home / "systemd" / "user"
    target = target_dir / "whetstone.service"
    template = unit_template()
    readme = template.parent.parent / "README.md"
    unit = template.read_text().format(
        whetstone=executable,
        home=settings.paths.root.resolve(),
        stop_timeout=int(settings.daemon.stop_timeout_s) + 30,
        documentation=f"file://{readme}" if readme.is_file() else "man:systemd.service(5)",
    )
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        settings.paths.create()
        atomic_write_text(target, unit)
    except OSError as exc:
        raise _fail(f"cannot write {target}: {exc.strerror or exc}") from None
    console.print(f"wrote {target}", highlight=False)
    console.print(
        "enable and start it:\n"
        "  systemctl --user daemon-reload\n"
        "  systemctl --user enable --now whetstone\n"
        "keep it running while you are logged out:\n"
        f"  loginctl enable-linger {os.environ.get('USER', '$USER')}\n"
        "follow its logs:\n"
        "  journalctl --user -u whetstone -f",
        highlight=False,
    )


@app.command(cls=_Command)
def serve(
    home: HomeOpt = None,
    set_: SetOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default 8321).")] = None,
) -> None:
    """Run the API worker alone in the foreground (the daemon starts it the same way)."""
    from common import devices
    from common.run_state import daemon_pid

    settings = settings_for(home, set_, server__host=host, server__port=port)
    owner = daemon_pid(settings.paths.root)
    if owner is not None:
        raise _fail(
            f"the daemon (pid {owner}) already runs the API worker for {settings.paths.root}; "
            "`whetstone status` says where it listens"
        )
    _check_token(settings)
    # The worker is a new process image: CUDA_VISIBLE_DEVICES is set before torch loads.
    argv = [_python(), "-m", "production.server", "--home", str(settings.paths.root)]
    for item in set_ or []:
        argv += ["--set", item]
    if host is not None:
        argv += ["--host", host]
    if port is not None:
        argv += ["--port", str(port)]
    sys.stdout.flush()
    os.execve(argv[0], argv, devices.child_env(settings, "production"))


def _check_token(settings: Settings) -> None:
    """A token file others can read is refused before any worker starts (it used to be a
    traceback from inside the worker)."""
    try:
        settings.bearer_token()
    except PermissionError as exc:
        raise _fail(str(exc)) from None


@app.command(cls=_Command)
def token(home: HomeOpt = None, set_: SetOpt = None) -> None:
    """Print the API bearer token of this home, creating <home>/token (mode 0600) if absent."""
    settings = settings_for(home, set_)
    try:
        console.print(settings.paths.ensure_token(), highlight=False)
    except PermissionError as exc:
        raise _fail(str(exc)) from None


@app.command(cls=_Command)
def chat(
    home: HomeOpt = None,
    set_: SetOpt = None,
    url: Annotated[
        str | None,
        typer.Option(help="The API worker's URL (default: the one the home's daemon recorded)."),
    ] = None,
) -> None:
    """Open the terminal UI: chat, rate and correct answers, watch training, review reports."""
    from tui.app import WhetstoneApp, make_api

    settings = settings_for(home, set_)
    if url is not None and not url.startswith(("http://", "https://")):
        raise _fail(f"--url {url!r} must start with http:// or https://")
    WhetstoneApp(make_api(settings, url)).run()


def _progress_line(run: Any) -> str:
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


def _wait_for_run(settings: Settings, run_id: str, process: Any) -> int | None:
    """Show the run's progress as a live bar until it ends; return its exit code (None when
    the daemon runs it: the outcome is in the store)."""
    import time

    from rich.progress import BarColumn, Progress, TextColumn

    from data.models import RUN_FINISHED

    def running() -> bool:
        # The process may go on after the run ends: a catch-up run follows a promotion.
        if store.get_run(run_id).status in RUN_FINISHED:
            return False
        return process is None or process.poll() is None

    store = open_store(settings)
    if not (console.is_terminal and err_console.is_terminal):
        # `whetstone train --wait | tee log`: a live bar draws nothing there (26 minutes of
        # silence); a line per stage, and every 30 s while one goes on.
        try:
            shown, shown_stage, shown_at = "", None, 0.0
            while running():
                run = store.get_run(run_id)
                line = _progress_line(run)
                stage = (run.progress or {}).get("stage", run.status)
                if line != shown and (stage != shown_stage or time.monotonic() - shown_at >= 30):
                    console.print(f"{run_id}: {line}", highlight=False, soft_wrap=True)
                    shown, shown_stage, shown_at = line, stage, time.monotonic()
                time.sleep(0.5)
        finally:
            store.close()
        return None if process is None else process.returncode
    try:
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
                    description=_progress_line(run),
                )
                time.sleep(0.5)
    finally:
        store.close()
    return None if process is None else process.returncode


@app.command(cls=_Command)
def train(
    home: HomeOpt = None,
    set_: SetOpt = None,
    profile: Annotated[
        str | None, typer.Option(help="Training profile (default: training.default_profile).")
    ] = None,
    wait: Annotated[
        bool,
        typer.Option("--wait", help="Show progress until the run (and its gate) ends.", metavar=""),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Train even without enough new feedback.", metavar="")
    ] = False,
    promote_: Annotated[
        bool,
        typer.Option(
            "--promote/--no-promote", help="Promote the candidate if the gate passes.", metavar=""
        ),
    ] = True,
) -> None:
    """Train a candidate on the feedback so far, evaluate it, and promote it if it wins."""
    from orchestrator import jobs

    settings = settings_for(home, set_)
    try:
        settings.profile(profile)  # before the store is opened: a typo creates nothing
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    store = open_store(settings)
    try:
        request = jobs.request_training(
            settings, store, profile, force=force, promote=promote_, sets=set_
        )
    except (ConfigError, jobs.JobBusy) as exc:
        raise _fail(str(exc)) from None
    finally:
        store.close()
    run_id, name, owner, logfile = request.run_id, request.profile, request.daemon_pid, request.log
    if owner is not None:
        console.print(f"queued {run_id} ({name}) with the daemon (pid {owner})")
    if not wait:
        if owner is None:
            console.print(f"started {run_id} ({name}); log: {logfile}")
        console.print("`whetstone status` shows its progress")
        return
    following: str | None = run_id
    while following:
        run_id = following
        try:
            code = _wait_for_run(settings, run_id, request.process)
        except KeyboardInterrupt:
            console.print(f"stopped waiting; {run_id} goes on in the background (log: {logfile})")
            raise typer.Exit(130) from None
        following = _print_run_outcome(settings, run_id, code, logfile)
        if following:
            console.print(_following_line(settings, following))


def _following_line(settings: Settings, run_id: str) -> str:
    """What the run the same process goes on with does (development.train.follow_up)."""
    from orchestrator.schedule import RETRY_TRIGGER

    store = open_store(settings)
    try:
        trigger = store.get_run(run_id).trigger
    finally:
        store.close()
    if trigger == RETRY_TRIGGER:
        scale = settings.training.retry_learning_rate_scale
        return f"retry: {run_id} trains again at x{scale:g} the learning rate"
    return f"catch-up: {run_id} trains on the corrections the gate just judged"


def _print_run_outcome(
    settings: Settings, run_id: str, code: int | None, logfile: Path
) -> str | None:
    """Say how the run ended; return the run that follows it in the same process (a
    catch-up after a promotion, a retry after a refusal), if any."""
    store = open_store(settings)
    try:
        from orchestrator import jobs

        jobs.reap_dead_runs(store)
        run = store.get_run(run_id)
        evaluation = None
        if run.candidate_id:
            found = store.list_evaluations(run.candidate_id, limit=1)
            evaluation = found[0] if found else None
        current = open_registry(settings).current_id()
    finally:
        store.close()
    if run.status == "skipped":
        console.print(f"{run_id} skipped: {run.reason}")
        return None
    if run.status != "succeeded":
        err_console.print(f"{run_id} {run.status}: {run.error or f'exit code {code}'}")
        err_console.print(f"log: {logfile}")
        raise typer.Exit(1)
    console.print(f"{run_id} trained candidate {run.candidate_id}")
    if evaluation is not None:
        reason = (evaluation.metrics or {}).get("reason", "")
        console.print(f"gate: {evaluation.decision} ({evaluation.rule}) {reason}")
        step = (evaluation.metrics or {}).get("next_step")
        if step and current != run.candidate_id:
            console.print(f"next: {step}")
        console.print(f"report: {evaluation.report_path}")
    if current == run.candidate_id:
        console.print(f"promoted: {run.candidate_id} now serves")
    return (run.progress or {}).get("next_run")


@app.command("eval", cls=_Command)
def eval_cmd(
    candidate_id: Annotated[str, typer.Argument(metavar="ID")],
    home: HomeOpt = None,
    set_: SetOpt = None,
) -> None:
    """Evaluate a candidate against the champion and the base model, and write its report."""
    from candidates import RegistryError
    from common import devices

    settings = settings_for(home, set_)
    try:
        open_registry(settings).validate(candidate_id, base_model=settings.model.base_model)
    except RegistryError as exc:
        raise _fail(str(exc)) from None
    argv = [_python(), "-m", "development.evaluate", "--home", str(settings.paths.root)]
    argv += ["--candidate", candidate_id]
    for item in set_ or []:
        argv += ["--set", item]
    code = subprocess.call(argv, env=devices.child_env(settings, "development"))
    if code != 0:
        raise typer.Exit(code)
    console.print(f"report: {open_registry(settings).path(candidate_id) / 'report.html'}")


@app.command("export-model", cls=_Command)
def export_model(
    candidate_id: Annotated[str, typer.Argument(metavar="ID")],
    home: HomeOpt = None,
    set_: SetOpt = None,
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            help="merged (16-bit safetensors: transformers, vLLM), gguf (llama.cpp, Ollama) "
            "or lora-gguf (the adapter alone, for llama.cpp --lora / Ollama ADAPTER).",
        ),
    ] = "gguf",
    out: Annotated[
        Path | None, typer.Option(help="Folder to create (default <home>/exports/ID-FORMAT).")
    ] = None,
    outtype: Annotated[
        str, typer.Option(help="Weights in the file: f32, f16, bf16 or q8_0 (GGUF only).")
    ] = "f16",
) -> None:
    """Export a candidate for other runtimes (llama.cpp's own converters write the GGUFs)."""
    from candidates import RegistryError
    from common import devices

    formats, outtypes = ("merged", "gguf", "lora-gguf"), ("f32", "f16", "bf16", "q8_0")
    if format_ not in formats:
        raise _fail(f"--format must be one of {', '.join(formats)}; got {format_!r}", 2)
    if outtype not in outtypes:
        raise _fail(f"--outtype must be one of {', '.join(outtypes)}; got {outtype!r}", 2)
    settings = settings_for(home, set_)
    try:
        open_registry(settings).validate(candidate_id, base_model=settings.model.base_model)
    except RegistryError as exc:
        raise _fail(str(exc)) from None
    argv = [_python(), "-m", "development.export_model", candidate_id]
    argv += ["--home", str(settings.paths.root), "--format", format_, "--outtype", outtype]
    if out is not None:
        argv += ["--out", str(out.expanduser().resolve())]
    for item in set_ or []:
        argv += ["--set", item]
    code = subprocess.call(argv, env=devices.child_env(settings, "development"))
    if code != 0:
        raise typer.Exit(code)


@app.command(cls=_Command)
def trend(
    home: HomeOpt = None,
    set_: SetOpt = None,
    weeks: Annotated[int, typer.Option(min=1, help="How many weeks back.")] = 4,
    html: Annotated[
        bool,
        typer.Option("--html", help="Write the page with plots and print its path.", metavar=""),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """The model over the weeks: answers, ratings, corrections per day; promotions; scores."""
    from data.trend import text
    from data.trend import trend as read_trend

    settings = settings_for(home, set_)
    if html:
        argv = [_python(), "-m", "development.trend_report", "--home", str(settings.paths.root)]
        code = subprocess.call([*argv, "--weeks", str(weeks)])
        if code != 0:
            raise typer.Exit(code)
        return
    store = open_store(settings, existing_home=True)
    try:
        found = read_trend(store, weeks)
    finally:
        store.close()
    if as_json:
        console.print_json(data=found.as_dict())
    else:
        console.print(text(found), markup=False, highlight=False)


@app.command(cls=_Command)
def recipe(
    home: HomeOpt = None,
    set_: SetOpt = None,
    reset: Annotated[
        bool,
        typer.Option(
            "--reset", help="Go back to the config's profile; closes the search study.", metavar=""
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """The training recipe the nightly run uses, and the search's trials."""
    from orchestrator import experiments

    settings = settings_for(home, set_)
    if not settings.paths.root.is_dir():
        raise _fail(f"no whetstone home at {settings.paths.root}: check --home / WHETSTONE_HOME")
    try:
        if reset:
            dropped = experiments.reset_recipe(settings)
            console.print(
                f"dropped the recipe from {dropped['study']} #{dropped['trial']}; the nightly run "
                "uses the config's profile again"
                if dropped
                else "no recipe was adopted; the nightly run uses the config's profile"
            )
            return
        found = experiments.summary(settings)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        console.print_json(data=found)
        return
    console.print(f"recipe: {experiments.describe(found)}", markup=False, highlight=False)
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
    if table.rows:
        console.print(table)


@app.command(cls=_Command)
def report(
    candidate_id: Annotated[str, typer.Argument(metavar="ID")],
    home: HomeOpt = None,
    set_: SetOpt = None,
    html: Annotated[
        bool, typer.Option("--html", help="Print the HTML report's path only.", metavar="")
    ] = False,
) -> None:
    """Show a candidate's promotion report (Markdown in the terminal; --html for the file)."""
    from rich.markdown import Markdown

    from candidates import RegistryError

    settings = settings_for(home, set_)
    registry = open_registry(settings)
    try:
        folder = registry.path(registry.validate_id(candidate_id))
    except RegistryError as exc:
        raise _fail(str(exc)) from None
    md, page = folder / "report.md", folder / "report.html"
    if not folder.is_dir():
        raise _fail(f"there is no candidate {candidate_id}: `whetstone candidates` lists them")
    if not md.is_file():
        raise _fail(
            f"candidate {candidate_id} has no report yet: run `whetstone eval {candidate_id}`"
        )
    if html:
        console.print(str(page))
        return
    console.print(Markdown(md.read_text()))
    console.print(f"HTML with plots: {page}")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()  # click handles its own errors and exits; anything else comes out here
    except OSError as exc:
        # A read-only or full home, a folder where a file should be: say which, no traceback.
        where = f" ({exc.filename})" if exc.filename else ""
        sys.stderr.write(f"error: {exc.strerror or exc}{where}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
