"""The charts of a candidate's report and of the weekly trend page, as PNG bytes.

Drawing only: the callers (development/report.py, development/trend_report.py) decide what is
shown and pass plain numbers and labels. matplotlib's object API with the Agg canvas, never
pyplot, so no global figure state leaks between reports and no display is needed.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from data.trend import Trend, by_day

MODEL_COLORS = {"candidate": "#2b7bba", "champion": "#e08a1e", "base": "#8c8c8c"}

Point = tuple[float, float]  # (step, loss)


@dataclass(frozen=True)
class LossStage:
    name: str
    train: Sequence[Point]
    held_out: Sequence[Point]


@dataclass(frozen=True)
class Bar:
    model: str  # candidate | champion | base: picks the colour
    title: str  # the tick label
    value: float | None  # in the unit shown (percent already times 100); None: not measured
    label: str  # the value as the report's table writes it


@dataclass(frozen=True)
class MetricPanel:
    label: str
    better: str | None  # lower | higher | None
    bars: Sequence[Bar]


def png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _grid(count: int, max_columns: int, width: float, height: float) -> tuple[Figure, list]:
    columns = min(count, max_columns)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False).ravel())
    for ax in axes[count:]:
        ax.set_visible(False)
    return figure, axes


def loss_png(stages: Sequence[LossStage]) -> bytes:
    # One panel per stage: SFT and DPO losses have different meanings and scales, and each
    # stage counts its steps from 1, so sharing one axis would overlay unrelated curves.
    figure, axes = _grid(len(stages), 3, 4.6, 3.4)
    for ax, stage in zip(axes, stages, strict=False):
        for points, label, style, color in (
            (stage.train, "train", "-", MODEL_COLORS["candidate"]),
            (stage.held_out, "held-out", "--", MODEL_COLORS["champion"]),
        ):
            if not points:
                continue
            steps, losses = zip(*points, strict=True)
            # Short series get markers, or a single point would not show at all.
            marker = "o" if len(points) <= 30 else None
            ax.plot(steps, losses, style, color=color, marker=marker, markersize=3, label=label)
        ax.set_title(f"stage: {stage.name}")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        steps_seen = {step for step, _ in (*stage.train, *stage.held_out)}
        if len(steps_seen) == 1:
            # One step only: matplotlib would zoom to ±0.05 of it, a meaningless scale.
            only = steps_seen.pop()
            ax.set_xlim(only - 1, only + 1)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return png(figure)


def metrics_png(panels: Sequence[MetricPanel]) -> bytes:
    # One small panel per metric: NLLs, accuracies and ms/token share no scale.
    figure, axes = _grid(len(panels), 4, 3.2, 2.9)
    for ax, panel in zip(axes, panels, strict=False):
        for position, bar in enumerate(panel.bars):
            if bar.value is None:
                # Say the value is missing, or an empty slot reads as a bar of zero.
                ax.text(position, 0, "n/a", ha="center", va="bottom", fontsize=8, color="#666")
                continue
            drawn = ax.bar(position, bar.value, color=MODEL_COLORS[bar.model], width=0.7)
            ax.bar_label(drawn, labels=[bar.label], fontsize=7, padding=2)
        ax.set_xticks(range(len(panel.bars)), [bar.title for bar in panel.bars], fontsize=8)
        ax.set_xlim(-0.6, len(panel.bars) - 0.4)
        ax.margins(y=0.18)
        ax.axhline(0, color="#444", linewidth=0.6)
        title = textwrap.fill(panel.label, 30)
        if panel.better in ("lower", "higher"):
            title += f"\n({panel.better} is better)"
        ax.set_title(title, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    return png(figure)


def _use_png(days: list[dict[str, Any]], trend: Trend) -> bytes:
    """Response time (median time to the first token, tokens per second) and how long the
    conversations ran (turns, and tokens of the longest context), per day."""
    figure = Figure(figsize=(9, 6.4), layout="constrained")
    first, speed, turns, tokens = figure.subplots(4, 1, sharex=True)

    def line(ax: Any, points: list[tuple[Any, Any]], style: str, label: str) -> None:
        points = [p for p in points if p[1] is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], style, color="#2b7bba")
        ax.set_ylabel(label)

    line(first, [(d["day"], d["median_ttft_s"]) for d in days], "o-", "first token (s)")
    line(speed, [(d["day"], d["tokens_per_s"]) for d in days], "o-", "tokens/s")
    started = [c.as_dict() | {"date": c.day} for c in trend.conversations]
    line(turns, [(c["date"], c["turns_per_conversation"]) for c in started], "s-", "turns/chat")
    line(tokens, [(c["date"], c["tokens_per_conversation"]) for c in started], "s-", "tokens/chat")
    first.set_title("response time, and conversation length by the day it started")
    return png(figure)


def trend_pngs(trend: Trend) -> dict[str, bytes]:
    """`daily` (answers, rating, corrected share), `use` (response time and conversation
    length) and, with champions, `champions` (their scores when each was promoted)."""
    days = by_day(trend)
    images: dict[str, bytes] = {}
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
    images["daily"] = png(figure)
    images["use"] = _use_png(days, trend)
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
        images["champions"] = png(figure)
    return images
