"""Where the CLI writes: stdout for what a command reports, stderr for errors and the live
progress bar, and the one error line every refusal prints."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print "error: <message>" on stderr; the caller raises the returned Exit."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def print_path(label: str | None, path: object, *, out: Console = console) -> None:
    """A file's path on one line, never wrapped at the width (piped output is 80 columns):
    the person copies it, or a script opens it."""
    text = str(path) if label is None else f"{label} {path}"
    out.print(text, markup=False, highlight=False, soft_wrap=True)
