"""Pages and Markdown from the templates in common/templates/: the one place their text lives.

A candidate's report (candidates/reports.py writes it, development/report.py says what is in
it) and the weekly trend page (development/trend_report.py) both render here. It sits in
common, the bottom layer, because the post-promotion watch (orchestrator.watch) re-renders a
report and may import neither development nor anything that pulls in torch; jinja2 does not.

HTML templates (`*.html.jinja`) are autoescaped: prompts, answers and corrections are the
person's text and must show as text. Markdown templates are not, since a Markdown reader
would show `&lt;` literally; the `md_*` filters quote what Markdown itself would interpret.
A value a template names but the caller did not pass fails the render (StrictUndefined)
instead of leaving a silent blank in the report.
"""

from __future__ import annotations

import base64
import re
from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

TEMPLATES = Path(__file__).with_name("templates")


def md_cell(text: Any) -> str:
    """Text for one Markdown table cell: a `|` or a line break would end the cell early."""
    text = str(text)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _fence_for(text: str, shortest: int) -> str:
    # The fence outgrows any backtick run inside, so the text cannot close it.
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(shortest, longest + 1)


def md_fence(text: Any, language: str = "", quote: bool = False) -> str:
    """Text verbatim in a fenced block (optionally as a `>` quote), without a trailing newline."""
    text = str(text)
    fence = _fence_for(text, 3)
    lines = [fence + language, *(text.splitlines() or [""]), fence]
    if quote:
        lines = [f"> {line}" if line else ">" for line in lines]
    return "\n".join(lines)


def md_code(text: Any) -> str:
    """Text as inline code, whatever backticks it holds."""
    text = str(text)
    ticks = _fence_for(text, 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def data_uri(png: bytes) -> str:
    """A PNG as a data: URI, so a page carries its plots and fetches nothing."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@cache
def environment() -> Environment:
    """The one Environment (built on first use: most processes never render a page)."""
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(enabled_extensions=("html.jinja", "html"), default=False),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(md_cell=md_cell, md_fence=md_fence, md_code=md_code, data_uri=data_uri)
    return env


def render(template: str, **context: Any) -> str:
    """The text of `template` (a file name under common/templates/) with `context`."""
    return environment().get_template(template).render(**context)
