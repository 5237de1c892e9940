"""The trend over weeks (data.trend) as a compact text table and as a self-contained HTML page
with plots (matplotlib, embedded as PNG): answers and mean rating per day, the share of
answers corrected, promotions and rollbacks as marks on the same days, and each champion's
held-out and general-knowledge scores when it was promoted.

    python -m development.trend_report --home ~/.local/share/whetstone [--weeks 8] [--out F]

writes the page (default <home>/reports/trend-<date>.html, atomically) and prints its path;
`whetstone trend --html` and the daemon's weekly job run exactly this. No torch here.
"""

from __future__ import annotations

import argparse
import base64
import html
import sys
from datetime import UTC, datetime
from pathlib import Path

from matplotlib.figure import Figure

from common.fs import atomic_write_text
from data.trend import Trend, by_day, text, trend
from development.report import _png as report_png


def _png(figure: Figure) -> str:
    return base64.b64encode(report_png(figure)).decode("ascii")


def plots(trend: Trend) -> dict[str, str]:
    """Base64 PNGs: `daily` (answers, rating, corrected share) and, with champions,
    `champions` (their scores over time)."""
    days = by_day(trend)
    images: dict[str, str] = {}
    figure = Figure(figsize=(9, 6.4), layout="constrained")
    top, middle, bottom = figure.subplots(3, 1, sharex=True)
    x = [d["day"] for d in days]
    top.bar(x, [d["answers"] for d in days], color="#2b7bba")
    top.set_ylabel("answers")
    rated = [(d["day"], d["mean_rating"]) for d in days if d["mean_rating"] is not None]
    middle.plot([r[0] for r in rated], [r[1] for r in rated], "o-", color="#e08a1e")
    middle.set_ylim(1, 5)
    middle.set_ylabel("mean rating")
    bottom.plot(x, [100 * d["corrected_share"] for d in days], "s-", color="#8c8c8c")
    bottom.set_ylabel("% corrected")
    for event in trend.events:
        when = datetime.fromisoformat(event["at"]).date()
        color = "#2a9d3f" if event["action"] == "promote" else "#c0392b"
        for ax in (top, middle, bottom):
            ax.axvline(when, color=color, linestyle="--", linewidth=1)
    top.set_title("per day (dashed: green promotion, red rollback)")
    images["daily"] = _png(figure)
    if trend.champions:
        names = sorted({k for c in trend.champions for k in c} - {"at", "candidate_id"})
        figure = Figure(figsize=(9, 2.6 * max(1, len(names))), layout="constrained")
        axes = figure.subplots(max(1, len(names)), 1, sharex=True, squeeze=False).ravel()
        for ax, name in zip(axes, names, strict=False):
            points = [
                (datetime.fromisoformat(c["at"]), c[name])
                for c in trend.champions
                if isinstance(c.get(name), int | float)
            ]
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color="#2b7bba")
            ax.set_ylabel(name)
        axes[0].set_title("each champion when promoted")
        images["champions"] = _png(figure)
    return images


def html_page(trend: Trend, title: str = "whetstone: the trend") -> str:
    images = plots(trend)
    figures = "".join(
        f'<img alt="{name}" src="data:image/png;base64,{data}">' for name, data in images.items()
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:60rem;margin:2rem auto}"
        "pre{background:#f6f6f6;padding:1rem;overflow-x:auto}img{max-width:100%}</style>"
        f"</head><body><h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(trend.since.date().isoformat())} to "
        f"{html.escape(trend.until.date().isoformat())}</p>"
        f"{figures}<pre>{html.escape(text(trend))}</pre></body></html>\n"
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
