"""`whetstone`: the command line. Every command takes --home (default $WHETSTONE_HOME or
~/.local/share/whetstone) and --set KEY=VALUE to override one config key for this run.

This module never imports torch: the torch-side checks run as subprocesses
(`python -m production.model.doctor`, `python -m production.model.base_model`).

Every `whetstone` command is here, each a short typer function: its arguments, the settings,
store and registry it opens, and what it prints, so `whetstone --help` and this file list the
same things. What a command works out lives below it: in the rooms, and beside this file in
cli_doctor (the doctor's checks), cli_tables (what status, candidates, recipe and backup
print), cli_training (following a run) and cli_service (the systemd unit, the daemon's logs);
cli_output has the consoles and the error line.
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
from typer.core import TyperCommand, TyperGroup

from common.config import (
    ConfigError,
    Settings,
    load_settings,
    log_resolved,
    parse_sets,
)
from common.entrypoint import whetstone_command
from orchestrator.cli_output import console, fail, print_path

if TYPE_CHECKING:  # imported lazily at run time: `whetstone --help` stays fast
    from candidates import Registry
    from data.store import Store


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


def settings_for(home: Path | None, sets: list[str] | None, **flags: Any) -> Settings:
    try:
        overrides = parse_sets(sets)
        for dotted, value in flags.items():
            if value is not None:
                section, _, key = dotted.partition("__")
                overrides.setdefault(section, {})[key] = value
        settings = load_settings(home, overrides)
    except ConfigError as exc:
        raise fail(str(exc), 2) from None
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
        raise fail(
            f"no whetstone home at {root}: check --home / WHETSTONE_HOME "
            f"(`whetstone doctor --home {root}` creates one)"
        )
    try:
        settings.paths.create()
    except OSError as exc:
        raise fail(f"cannot write the home {root}: {exc.strerror} ({exc.filename})") from None
    try:
        return Store(settings.db_url)
    except StoreError as exc:
        raise fail(str(exc)) from None
    except OperationalError as exc:  # e.g. a read-only home, or a locked database
        raise fail(f"cannot open the database {settings.db_url}: {exc.orig}") from None


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
    from orchestrator import cli_doctor

    settings = settings_for(home, set_)
    report = cli_doctor.machine_report(settings, prepare=prepare)
    store = open_store(settings)
    report["database"] = cli_doctor.database_report(settings, store)
    store.close()
    if as_json:
        console.print_json(json.dumps(report))
        return
    console.print(cli_doctor.report_table(settings, report))
    if not report["model"]["loadable"]:
        raise typer.Exit(1)
    console.print(cli_doctor.next_step(settings), highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------- status


@app.command(cls=_Command)
def status(home: HomeOpt = None, set_: SetOpt = None, as_json: JsonOpt = False) -> None:
    """What the home holds now: champion, data counts, last runs, the API worker."""
    from orchestrator import cli_tables
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
    console.print(cli_tables.status_table(found, settings))


@app.command("candidates", cls=_Command)
def candidates_cmd(home: HomeOpt = None, set_: SetOpt = None, as_json: JsonOpt = False) -> None:
    """List the trained adapters, which one serves, and how each was judged."""
    from orchestrator import cli_tables
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
    console.print(cli_tables.candidates_table(rows))
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
        raise fail(str(exc)) from None
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
        raise fail(str(exc)) from None
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
        raise fail(f"--out {target} exists and is not a folder")
    store = open_store(settings)
    try:
        counts = export_all(store, target)
    except OSError as exc:
        raise fail(f"cannot write the export to {target}: {exc.strerror or exc}") from None
    finally:
        store.close()
    for kind, n in counts.items():
        print_path(f"{kind}: {n} rows ->", target / f"{kind}.jsonl")


@app.command("import", cls=_Command)
def import_cmd(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="The export file to import.")],
    home: HomeOpt = None,
    set_: SetOpt = None,
    format_: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="chatgpt (conversations.json, or the export's zip), openwebui (its chat "
            "export) or jsonl (OpenAI's chat format, one conversation a line); default: "
            "recognised from the file.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Import the history you already have: ChatGPT's data export, Open WebUI's chats (their
    ratings become feedback), OpenAI-format JSONL. Importing a file again adds nothing."""
    from data.imports import ImportRefused, import_conversations, parse

    settings = settings_for(home, set_)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise fail(f"cannot read {file}: {exc.strerror or exc}") from None
    try:
        conversations = parse(data, format_)
    except ImportRefused as exc:
        raise fail(f"{file}: {exc}; nothing was imported") from None
    from sqlalchemy.exc import SQLAlchemyError

    store = open_store(settings)
    try:
        result = import_conversations(store, conversations)
    except SQLAlchemyError as exc:  # one transaction: rolled back whole
        raise fail(f"storing {file} failed, nothing was imported: {exc}") from None
    finally:
        store.close()
    if as_json:
        console.print_json(data=result.as_dict())
        return
    console.print(
        f"imported {result.conversations} conversations ({result.messages} messages, "
        f"{result.feedback} rated or kept answers as feedback) from {file}",
        highlight=False,
        soft_wrap=True,
    )
    if result.already_imported:
        console.print(f"{result.already_imported} conversations were imported before: skipped")


def switch_memory(settings: Settings, enabled: bool) -> str:
    """memory.enabled in config.toml; a running API worker writes it and follows at once."""
    from common.config import set_in_config
    from orchestrator.promotion import running_server, worker_headers

    state = "on" if enabled else "off"
    server = running_server(settings)
    if server is None:
        try:
            set_in_config(settings.home, "memory.enabled", enabled)
        except ConfigError as exc:
            raise fail(str(exc)) from None
        return f"memory {state} (memory.enabled = {str(enabled).lower()} in config.toml)"
    import httpx

    try:
        answer = httpx.patch(
            f"{server['url']}/v1/memory",
            json={"enabled": enabled},
            headers=worker_headers(settings),
            timeout=30,
        )
    except httpx.HTTPError as exc:
        raise fail(f"the API worker at {server['url']} did not answer: {exc}") from None
    if answer.status_code != 200:
        raise fail(f"the API worker refused: {answer.json()['error']['message']}")
    return (
        f"memory {state} (memory.enabled = {str(enabled).lower()} in config.toml); "
        f"the API worker at {server['url']} follows from the next message"
    )


@app.command(cls=_Command)
def memory(
    action: Annotated[
        str,
        typer.Argument(metavar="ACTION", help="list (the notes), forget ID, on, or off."),
    ] = "list",
    note_id: Annotated[
        str | None, typer.Argument(metavar="ID", help="The note to forget (forget only).")
    ] = None,
    home: HomeOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The memory: notes made from your corrections, given to the model from the next
    message on while memory.enabled is true. `forget ID` removes a note's text for good;
    `on`/`off` sets memory.enabled in config.toml (a running worker follows at once)."""
    from data.errors import NotFound
    from data.views import note_view

    if action not in ("list", "forget", "on", "off"):
        raise fail(f"unknown action {action!r}: list, forget ID, on, or off", 2)
    if action == "forget" and note_id is None:
        raise fail("forget needs the note's ID (`whetstone memory list` shows them)", 2)
    if action != "forget" and note_id is not None:
        raise fail(f"{action} takes no ID", 2)
    settings = settings_for(home, set_)
    if action in ("on", "off"):
        said = switch_memory(settings, action == "on")
        if as_json:
            console.print_json(data={"enabled": action == "on"})
        else:
            console.print(said, highlight=False)
        return
    store = open_store(settings, existing_home=True)
    try:
        if action == "forget":
            assert note_id is not None
            try:
                store.forget_note(note_id)
            except NotFound as exc:
                raise fail(str(exc)) from None
            if as_json:
                console.print_json(data={"id": note_id, "forgotten": True})
            else:
                console.print(f"forgot note {note_id}", highlight=False)
            return
        # Learned: what the adapter serving now answers right without the note.
        learned = store.learned_notes(open_registry(settings).current_id())
        notes = [note_view(n, learned) for n in store.list_notes(limit=1000)]
    finally:
        store.close()
    if as_json:
        console.print_json(data={"data": notes, "enabled": settings.memory.enabled})
        return
    state = "on" if settings.memory.enabled else "off (memory.enabled = false)"
    console.print(f"memory: {len(notes)} note(s), {state}", highlight=False)
    for note in notes:
        asked = f"{note['question']} -> " if note["question"] else ""
        console.print(
            f"{note['id']}  [{note['status']}]  {asked}{note['text']}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


# -------------------------------------------------------------------------- backup/restore


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
    from orchestrator import cli_tables
    from orchestrator.backup import BackupError, create_backup

    settings = settings_for(home, set_)
    try:
        result = create_backup(settings, dest)
    except BackupError as exc:
        raise fail(str(exc)) from None
    manifest = result.manifest
    listed = {entry["path"] for entry in manifest["files"]}
    also = [name for name in ("config.toml", "recipe.json", "experiments.db") if name in listed]
    print_path("backup written to", result.path)
    console.print(
        f"  database: {manifest['conversations']} conversation(s), schema "
        f"{manifest['schema_revision']}, integrity ok\n"
        f"  adapters: {cli_tables.adapters_text(manifest)}\n"
        f"  also: {', '.join(also) or 'nothing else'}\n"
        f"  size: {cli_tables.size_text(result.size)} in {len(manifest['files'])} file(s)",
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
    from orchestrator import cli_tables
    from orchestrator.backup import RestoreRefused, restore_backup, verify_backup

    settings = settings_for(home, set_)
    try:
        if check:
            manifest = verify_backup(source)
        else:
            result = restore_backup(settings, source, force=force)
            manifest = result.manifest
    except RestoreRefused as exc:
        raise fail(f"not restored: {exc}" if not check else str(exc)) from None
    written = (
        f"written {manifest.get('created_at', '?')} "
        f"by whetstone {manifest.get('whetstone_version', '?')}"
    )
    adapters = cli_tables.adapters_text(manifest)
    if check:
        console.print(
            f"{source}: a whole backup ({written}): {len(manifest['files'])} file(s) match their "
            f"checksums, schema {manifest['schema_revision']}, integrity ok\n"
            f"  {manifest['conversations']} conversation(s); adapters: {adapters}",
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
        f"  adapters: {adapters}",
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
    from orchestrator import cli_service
    from orchestrator.daemon import run_daemon

    settings = settings_for(home, set_, server__host=host, server__port=port)
    _check_token(settings)
    try:
        check_bind(settings)
    except ConfigError as exc:
        raise fail(str(exc), 2) from None
    owner = daemon_pid(settings.paths.root)
    if owner is not None:  # before any logging or banner: nothing of ours was started
        raise fail(str(HomeBusy(settings.paths.root, owner)))
    cli_service.daemon_logging(settings)
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
        raise fail(str(exc)) from None
    raise typer.Exit(code)


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
    from orchestrator import cli_service

    settings = settings_for(home, set_)
    target = cli_service.install_unit(settings, unit_dir)
    print_path("wrote", target)
    console.print(cli_service.enable_help(), highlight=False)


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
        raise fail(
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
        raise fail(str(exc)) from None


@app.command(cls=_Command)
def token(home: HomeOpt = None, set_: SetOpt = None) -> None:
    """Print the API bearer token of this home, creating <home>/token (mode 0600) if absent."""
    settings = settings_for(home, set_)
    try:
        console.print(settings.paths.ensure_token(), highlight=False)
    except PermissionError as exc:
        raise fail(str(exc)) from None


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
        raise fail(f"--url {url!r} must start with http:// or https://")
    WhetstoneApp(make_api(settings, url)).run()


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
    from orchestrator import cli_training, jobs

    settings = settings_for(home, set_)
    try:
        settings.profile(profile)  # before the store is opened: a typo creates nothing
    except ConfigError as exc:
        raise fail(str(exc)) from None
    store = open_store(settings)
    try:
        request = jobs.request_training(
            settings, store, profile, force=force, promote=promote_, sets=set_
        )
    except (ConfigError, jobs.JobBusy) as exc:
        raise fail(str(exc)) from None
    finally:
        store.close()
    run_id, name, owner, logfile = request.run_id, request.profile, request.daemon_pid, request.log
    if owner is not None:
        console.print(f"queued {run_id} ({name}) with the daemon (pid {owner})")
    if not wait:
        if owner is None:
            print_path(f"started {run_id} ({name}); log:", logfile)
        console.print("`whetstone status` shows its progress")
        return
    following: str | None = run_id
    while following:
        run_id = following
        store = open_store(settings)
        try:
            try:
                code = cli_training.wait_for_run(store, run_id, request.process)
            except KeyboardInterrupt:
                console.print(
                    f"stopped waiting; {run_id} goes on in the background (log: {logfile})"
                )
                raise typer.Exit(130) from None
            registry = open_registry(settings)
            following = cli_training.print_outcome(store, registry, run_id, code, logfile)
            if following:
                console.print(cli_training.following_line(settings, store, following))
        finally:
            store.close()


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
        raise fail(str(exc)) from None
    argv = [_python(), "-m", "development.evaluate", "--home", str(settings.paths.root)]
    argv += ["--candidate", candidate_id]
    for item in set_ or []:
        argv += ["--set", item]
    code = subprocess.call(argv, env=devices.child_env(settings, "development"))
    if code != 0:
        raise typer.Exit(code)
    page = open_registry(settings).path(candidate_id) / "report.html"
    print_path("report:", page)


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
        raise fail(f"--format must be one of {', '.join(formats)}; got {format_!r}", 2)
    if outtype not in outtypes:
        raise fail(f"--outtype must be one of {', '.join(outtypes)}; got {outtype!r}", 2)
    settings = settings_for(home, set_)
    try:
        open_registry(settings).validate(candidate_id, base_model=settings.model.base_model)
    except RegistryError as exc:
        raise fail(str(exc)) from None
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
    from orchestrator import cli_tables, experiments

    settings = settings_for(home, set_)
    if not settings.paths.root.is_dir():
        raise fail(f"no whetstone home at {settings.paths.root}: check --home / WHETSTONE_HOME")
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
        raise fail(str(exc)) from None
    if as_json:
        console.print_json(data=found)
        return
    console.print(f"recipe: {experiments.describe(found)}", markup=False, highlight=False)
    table = cli_tables.trials_table(found)
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
        raise fail(str(exc)) from None
    md, page = folder / "report.md", folder / "report.html"
    if not folder.is_dir():
        raise fail(f"there is no candidate {candidate_id}: `whetstone candidates` lists them")
    if not md.is_file():
        raise fail(
            f"candidate {candidate_id} has no report yet: run `whetstone eval {candidate_id}`"
        )
    if html:
        print_path(None, page)
        return
    console.print(Markdown(md.read_text()))
    print_path("HTML with plots:", page)


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
