"""What every `python -m <room>.<module>` entry point does alike: the --home and --set
arguments, a bad config or --set ending the process with exit 2 and `error: ...` on stderr
(as argparse does for a bad argument), and logging to stderr at the configured level (the
daemon and `whetstone train` send a job's stderr to its log file)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from common.config import ConfigError, Settings, load_settings, parse_sets

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """--home and --set KEY=VALUE (repeatable), read back by `settings_from_args`."""
    parser.add_argument(
        "--home", type=Path, default=None, help="whetstone home (default WHETSTONE_HOME)"
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key for this process",
    )


@contextlib.contextmanager
def exit_on_config_error() -> Iterator[None]:
    """A ConfigError inside ends the process: `error: ...` on stderr, exit code 2."""
    try:
        yield
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(2) from None


def settings_from_args(
    args: argparse.Namespace,
    overrides: dict[str, dict[str, Any]] | None = None,
    *,
    extra_sets: Sequence[str] = (),
) -> Settings:
    """The settings for --home and --set; `extra_sets` go before --set (which wins), and
    `overrides` ({"server": {"port": 9000}}) after it. A bad value exits (exit_on_config_error)."""
    with exit_on_config_error():
        merged = parse_sets([*extra_sets, *args.sets])
        for section, values in (overrides or {}).items():
            merged.setdefault(section, {}).update(values)
        return load_settings(args.home, merged)


# Loggers whose warnings say nothing the person can act on: bitsandbytes' CPU backend asks
# for the `kernels` package on every run, though nothing here runs 4-bit matmuls on the CPU;
# alembic's INFO lines describe each migration check.
QUIET_LOGGERS = {"bitsandbytes.backends.cpu.ops": logging.ERROR, "alembic": logging.WARNING}


def log_to_stderr(settings: Settings, fmt: str = LOG_FORMAT) -> None:
    logging.basicConfig(level=settings.log_level, format=fmt, stream=sys.stderr)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def whetstone_command() -> str:
    """How to type `whetstone` here: the bare name where the shell finds this installation's
    script, else its full path (after `make run` the script is in .venv/bin, which is not on
    the PATH: a banner that said `whetstone chat` gave `command not found`)."""
    import shutil

    script = Path(sys.executable).with_name("whetstone")
    found = shutil.which("whetstone")
    if found is not None and Path(found).resolve() == script.resolve():
        return "whetstone"
    return str(script) if script.exists() else "whetstone"
