"""Running whetstone as a service: the systemd user unit `whetstone install-service` writes,
and the log handlers of `whetstone up` (stderr with journald's priorities under systemd,
and a rotating <home>/logs/daemon.log)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from common.config import ConsoleFilter, Settings
from orchestrator.cli_output import fail

UNIT_TEMPLATE = Path(__file__).resolve().parent.parent / "systemd" / "whetstone.service"
# Where pip puts the unit for a regular (non-editable) install: pyproject's data-files.
INSTALLED_UNIT_TEMPLATE = Path("share") / "whetstone" / "systemd" / "whetstone.service"


def unit_template() -> Path:
    """The unit file of this install: the checkout's systemd/ (editable install), else the
    copy a wheel installs under the environment's prefix."""
    for candidate in (UNIT_TEMPLATE, Path(sys.prefix) / INSTALLED_UNIT_TEMPLATE):
        if candidate.is_file():
            return candidate
    raise fail(
        f"the systemd unit template is missing: neither {UNIT_TEMPLATE} nor "
        f"{Path(sys.prefix) / INSTALLED_UNIT_TEMPLATE} exists; reinstall whetstone"
    )


def install_unit(settings: Settings, unit_dir: Path | None) -> Path:
    """Write the unit that runs this environment's `whetstone up` for the home into
    `unit_dir` (default ~/.config/systemd/user); returns its path."""
    from common.fs import atomic_write_text

    executable = Path(sys.executable).parent / "whetstone"
    if not executable.is_file():
        raise fail(f"{executable} not found: install whetstone into this environment first")
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
        raise fail(f"cannot write {target}: {exc.strerror or exc}") from None
    return target


def enable_help() -> str:
    """How to start the unit, keep it running logged out, and follow its logs."""
    return (
        "enable and start it:\n"
        "  systemctl --user daemon-reload\n"
        "  systemctl --user enable --now whetstone\n"
        "keep it running while you are logged out:\n"
        f"  loginctl enable-linger {os.environ.get('USER', '$USER')}\n"
        "follow its logs:\n"
        "  journalctl --user -u whetstone -f"
    )


class _JournalFormatter(logging.Formatter):
    """Under systemd (JOURNAL_STREAM set) each line starts with its syslog priority, so
    `journalctl -p err` works; journald adds the time itself."""

    def format(self, record: logging.LogRecord) -> str:
        priority = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}
        return f"<{priority.get(record.levelname, 6)}>{super().format(record)}"


def daemon_logging(settings: Settings) -> None:
    """Replace the one-shot commands' quiet handler with the daemon's: stderr (journald's
    format under systemd) and a rotating daemon.log, at settings.log_level."""
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
