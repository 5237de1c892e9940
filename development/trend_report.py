"""The trend over weeks (data.trend) as a compact text table and as a self-contained HTML page
with plots (matplotlib, embedded as PNG): answers and mean rating per day, the share of
answers corrected, promotions and rollbacks as marks on the same days, and each champion's
held-out and general-knowledge scores when it was promoted. The page's layout is
common/templates/trend.html.jinja; the charts are drawn by development/plots.py.

    python -m development.trend_report --home ~/.local/share/whetstone [--weeks 8] [--out F]

writes the page (default <home>/reports/trend-<date>.html, atomically) and prints its path;
`whetstone trend --html` and the daemon's weekly job run exactly this. No torch here.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from common.fs import atomic_write_text
from common.render import render
from data.trend import Trend, text, trend
from development.plots import trend_pngs


def html_page(trend: Trend, title: str = "whetstone: the trend") -> str:
    """The page's text: the charts inline, the text table below them."""
    return render(
        "trend.html.jinja",
        title=title,
        since=trend.since.date().isoformat(),
        until=trend.until.date().isoformat(),
        images=trend_pngs(trend),
        table=text(trend),
    )


def write_page(home: Path | None, weeks: int, out: Path | None = None) -> Path:
    from common.config import load_settings
    from data.store import Store

    settings = load_settings(home)
    store = Store(settings.db_url)
    try:
        found = trend(store, weeks)
    finally:
        store.close()
    out = out or settings.paths.root / "reports" / f"trend-{datetime.now(UTC):%Y-%m-%d}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, html_page(found, f"whetstone: the last {weeks} weeks"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--weeks", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.weeks < 1:
        parser.error("--weeks must be at least 1")
    sys.stdout.write(f"{write_page(args.home, args.weeks, args.out)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
