"""Render an evaluation report into a candidate folder: report.md, report.html and two plots.

The report dict comes from development/evaluate.py. Only `candidate_id`, `decision` and `rule`
are required; everything else may be missing or None, because a report must still be written
when an evaluation had little to go on (champion is the base model, no holdout pairs, no loss
curve recorded).

    report.md     Markdown; user text is shown verbatim inside fenced blocks, so it stays inert
                  in a Markdown viewer and readable in a terminal.
    report.html   one self-contained page: inline CSS, plots as data: URIs, no scripts. Every
                  value from the report is escaped, since prompts and answers are user text.
    loss.png      train / held-out loss per training stage (only when a curve was recorded)
    metrics.png   one small bar chart per metric: candidate / champion / base

`markdown()`, `html_page()` and `plots()` are the pure builders; `render()` writes the files,
each atomically (temp file in the same folder, fsync, rename), so a reader of the folder never
sees half a report.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import logging
import math
import re
import textwrap
from collections.abc import Collection, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from common.fs import atomic_write_bytes, fsync_dir

log = logging.getLogger(__name__)

MD_FILE = "report.md"
HTML_FILE = "report.html"
LOSS_PNG = "loss.png"
METRICS_PNG = "metrics.png"
PLOT_FILES = (METRICS_PNG, LOSS_PNG)

REQUIRED_KEYS = ("candidate_id", "decision", "rule")
MAX_EXAMPLES = 5
MODELS = ("candidate", "champion", "base")
MODEL_TITLES = {"candidate": "Candidate", "champion": "Champion", "base": "Base"}
MODEL_COLORS = {"candidate": "#2b7bba", "champion": "#e08a1e", "base": "#8c8c8c"}
DASH = "—"

# A table cell: its text and a CSS class for the HTML page ("" for none).
Cell = tuple[str, str]


# --- small, forgiving accessors: the report is JSON from another process -------------------


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _number(value: Any) -> float | None:
    """A finite number, or None (bools are flags, not measurements)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _check_required(report: Mapping[str, Any]) -> None:
    missing = [key for key in REQUIRED_KEYS if report.get(key) is None]
    if missing:
        raise ValueError(f"report lacks required key(s): {', '.join(missing)}")


# --- formatting ------------------------------------------------------------------------------


def _fmt_number(value: Any) -> str:
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        # .4g turns 12345.6 into 1.235e+04, which is harder to read than the plain number.
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def _fmt_value(value: Any) -> str:
    """Any JSON value as one line of text (nested values as compact JSON)."""
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, ensure_ascii=False, default=str)
    if value is None or isinstance(value, bool | int | float):
        return _fmt_number(value)
    return str(value)


def _fmt_metric(value: Any, info: Mapping[str, Any]) -> str:
    number = _number(value)
    if number is not None and info.get("percent"):
        return f"{number * 100:.4g}%"
    return _fmt_number(value)


def _fmt_time(value: Any) -> str:
    if value is None or value == "":
        return DASH
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if moment.utcoffset() == timedelta(0):
        return moment.strftime("%Y-%m-%d %H:%M UTC")
    return moment.isoformat(sep=" ", timespec="minutes")


def _fmt_duration(value: Any) -> str:
    seconds = _number(value)
    if seconds is None:
        return DASH
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s"


def _delta(candidate: Any, other: Any, info: Mapping[str, Any]) -> Cell:
    """Candidate minus other, with whether that is an improvement given the metric's direction."""
    mine, theirs = _number(candidate), _number(other)
    if mine is None or theirs is None:
        return DASH, ""
    diff = mine - theirs
    # Float noise (1.1 - 1.0 - 0.1) must read as "no change", not as +2.776e-17.
    if abs(diff) <= 1e-12 * max(1.0, abs(mine), abs(theirs)):
        diff = 0.0
    unit = " pp" if info.get("percent") else ""
    if diff == 0:
        return f"0{unit}", ""
    text = f"{diff * 100:+.4g}{unit}" if unit else f"{diff:+.4g}"
    better = info.get("better")
    if better not in ("lower", "higher"):
        return text, ""
    improved = diff < 0 if better == "lower" else diff > 0
    verdict = "better" if improved else "worse"
    return f"{text} ({verdict})", verdict


# --- content, shared by the Markdown and HTML builders ---------------------------------------


def _decision(report: Mapping[str, Any]) -> tuple[str, str]:
    """(text, css class) of the decision; unknown decisions are shown as they are, in grey."""
    decision = str(report["decision"])
    kind = decision.strip().lower()
    return decision.upper(), kind if kind in ("promote", "reject") else "other"


def _champion_is_base(report: Mapping[str, Any]) -> bool:
    return report.get("champion_id") is None


def _summary(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    champion = report.get("champion_id")
    items = [
        ("Candidate", str(report["candidate_id"])),
        ("Champion", str(champion) if champion is not None else "the base model"),
        ("Base model", _fmt_value(report.get("base_model"))),
        ("Created", _fmt_time(report.get("created_at"))),
    ]
    if report.get("evaluation_seconds") is not None:
        items.append(("Evaluation took", _fmt_duration(report.get("evaluation_seconds"))))
    return items


def _check_rows(report: Mapping[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(rule, "pass" | "FAIL" | "n/a", detail, is the deciding rule) for each check."""
    deciding = str(report["rule"])
    rows = []
    for check in _list(report.get("checks")):
        check = _dict(check)
        rule = _fmt_value(check.get("rule"))
        passed = check.get("passed")
        status = "pass" if passed is True else "FAIL" if passed is False else "n/a"
        rows.append((rule, status, _fmt_value(check.get("detail", "")), rule == deciding))
    return rows


def _metric_models(report: Mapping[str, Any]) -> list[str]:
    metrics = _dict(report.get("metrics"))
    return [model for model in MODELS if _dict(metrics.get(model))]


def _metric_names(report: Mapping[str, Any]) -> list[str]:
    """metric_info's order first (the evaluator's chosen order), then any others as found."""
    metrics = _dict(report.get("metrics"))
    models = _metric_models(report)
    seen: list[str] = []
    order = [*_dict(report.get("metric_info"))]
    for model in models:
        order.extend(_dict(metrics.get(model)))
    for name in order:
        values = [_dict(metrics.get(m)).get(name) for m in models]
        # Lists (missed probes, sanity failures) are details, not table rows.
        numeric = any(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if name not in seen and numeric:
            seen.append(name)
    return seen


def _metric_info(report: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    return _dict(_dict(report.get("metric_info")).get(name))


def _metric_table(report: Mapping[str, Any]) -> tuple[list[str], list[list[Cell]]]:
    metrics = _dict(report.get("metrics"))
    models = _metric_models(report)
    compare = [m for m in ("champion", "base") if m in models and "candidate" in models]
    headers = [
        "Metric",
        "Better",
        *(MODEL_TITLES[m] for m in models),
        *(f"Δ vs {m}" for m in compare),
    ]
    rows = []
    for name in _metric_names(report):
        info = _metric_info(report, name)
        values = {m: _dict(metrics.get(m)).get(name) for m in models}
        row: list[Cell] = [
            (str(info.get("label") or name), ""),
            (str(info.get("better") or DASH), ""),
        ]
        row.extend((_fmt_metric(values[m], info), "num") for m in models)
        for other in compare:
            text, verdict = _delta(values["candidate"], values[other], info)
            row.append((text, f"num {verdict}".strip()))
        rows.append(row)
    return headers, rows


def _metric_notes(report: Mapping[str, Any]) -> list[str]:
    models = _metric_models(report)
    notes = [
        "Δ is the candidate minus the other model; percentages differ in percentage points "
        "(pp). 'Better' says which direction is an improvement."
    ]
    if "champion" not in models:
        if _champion_is_base(report):
            notes.append("The champion is the base model, so the base column is the champion.")
        else:
            notes.append("No champion metrics were recorded.")
    return notes


def _humanize(key: Any) -> str:
    return str(key).replace("_", " ")


def _data(
    report: Mapping[str, Any],
) -> tuple[str | None, list[tuple[str, str]], list[tuple[str, str]]]:
    """(feedback date range, counts by kind, any other entries such as evaluated_on)."""
    data = _dict(report.get("data"))
    first, last = data.get("first_feedback_at"), data.get("last_feedback_at")
    span = None
    if first is not None or last is not None:
        span = f"Feedback from {_fmt_time(first)} to {_fmt_time(last)}."
    counts = [
        (_humanize(kind), _fmt_value(count)) for kind, count in _dict(data.get("counts")).items()
    ]
    known = ("counts", "first_feedback_at", "last_feedback_at")
    extras = []
    for key, value in data.items():
        if key in known or value is None:
            continue
        if isinstance(value, Mapping):
            shown = ", ".join(f"{_humanize(k)} {_fmt_value(v)}" for k, v in value.items())
        else:
            shown = _fmt_value(value)
        extras.append((_humanize(key).capitalize(), shown))
    return span, counts, extras


def _examples(report: Mapping[str, Any]) -> list[list[tuple[str, str, str]]]:
    """Per example, the (field, label, text) parts to show, in reading order."""
    champion_label = "Champion (base model)" if _champion_is_base(report) else "Champion"
    labels = {
        "prompt": "Prompt",
        "champion": champion_label,
        "candidate": "Candidate",
        "base": "Base model",
        "correction": "Your correction",
    }
    examples = []
    for example in _list(report.get("examples"))[:MAX_EXAMPLES]:
        example = _dict(example)
        parts = []
        for field, label in labels.items():
            value = example.get(field)
            if value is None or (field == "correction" and value == ""):
                continue
            # An empty answer is itself a finding worth showing, unlike an empty correction.
            parts.append((field, label, str(value) if value != "" else "(empty answer)"))
        if parts:
            examples.append(parts)
    return examples


def _training(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    training = _dict(report.get("training"))
    items = []
    if training.get("profile") is not None:
        items.append(("Profile", _fmt_value(training.get("profile"))))
    if training.get("duration_s") is not None:
        items.append(("Duration", _fmt_duration(training.get("duration_s"))))
    hardware = training.get("hardware")
    if isinstance(hardware, Mapping) and hardware:
        items.append(("Hardware", ", ".join(f"{k} {_fmt_value(v)}" for k, v in hardware.items())))
    elif hardware is not None:
        items.append(("Hardware", _fmt_value(hardware)))
    return items


def _stage_table(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    stages = [_dict(s) for s in _list(_dict(report.get("training")).get("stages"))]
    stages = [s for s in stages if s]
    headers: list[str] = []
    for stage in stages:
        headers.extend(key for key in stage if key not in headers)
    if "name" in headers:
        headers.remove("name")
        headers.insert(0, "name")
    rows = [[_fmt_value(stage.get(key)) for key in headers] for stage in stages]
    return headers, rows


def _config_json(report: Mapping[str, Any]) -> str | None:
    config = _dict(report.get("training")).get("config")
    if config is None or config == {}:
        return None
    return json.dumps(config, indent=2, ensure_ascii=False, default=str)


def _monitor(report: Mapping[str, Any]) -> tuple[str | None, list[str]]:
    monitor = _dict(_dict(report.get("training")).get("monitor"))
    verdict = monitor.get("verdict")
    notes = [_fmt_value(note) for note in _list(monitor.get("notes"))]
    return (None if verdict is None else _fmt_value(verdict)), notes


# --- plots -----------------------------------------------------------------------------------


def _points(raw: Any) -> list[tuple[float, float]]:
    """[[step, loss], ...] (or {"step", "loss"} dicts) without unusable points."""
    points = []
    for point in _list(raw):
        if isinstance(point, list | tuple) and len(point) >= 2:
            step, loss = _number(point[0]), _number(point[1])
        elif isinstance(point, Mapping):
            step, loss = _number(point.get("step")), _number(point.get("loss"))
        else:
            continue
        if step is not None and loss is not None:
            points.append((step, loss))
    return points


def _loss_stages(report: Mapping[str, Any]) -> list[tuple[str, list, list]]:
    curve = _dict(_dict(report.get("training")).get("loss_curve"))
    stages = []
    for name, series in curve.items():
        train, held_out = _points(_dict(series).get("train")), _points(_dict(series).get("eval"))
        if train or held_out:
            stages.append((str(name), train, held_out))
    return stages


def _has_metric_numbers(report: Mapping[str, Any]) -> bool:
    metrics = _dict(report.get("metrics"))
    return any(
        _number(_dict(metrics.get(model)).get(name)) is not None
        for model in _metric_models(report)
        for name in _metric_names(report)
    )


def _expected_plots(report: Mapping[str, Any]) -> list[str]:
    names = []
    if _has_metric_numbers(report):
        names.append(METRICS_PNG)
    if _loss_stages(report):
        names.append(LOSS_PNG)
    return names


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _loss_png(report: Mapping[str, Any]) -> bytes:
    # One panel per stage: SFT and DPO losses have different meanings and scales, and each
    # stage counts its steps from 1, so sharing one axis would overlay unrelated curves.
    stages = _loss_stages(report)
    columns = min(len(stages), 3)
    rows = math.ceil(len(stages) / columns)
    figure = Figure(figsize=(4.6 * columns, 3.4 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (name, train, held_out) in zip(axes, stages, strict=False):
        for points, label, style, color in (
            (train, "train", "-", MODEL_COLORS["candidate"]),
            (held_out, "held-out", "--", MODEL_COLORS["champion"]),
        ):
            if not points:
                continue
            steps, losses = zip(*points, strict=True)
            # Short series get markers, or a single point would not show at all.
            marker = "o" if len(points) <= 30 else None
            ax.plot(steps, losses, style, color=color, marker=marker, markersize=3, label=label)
        ax.set_title(f"stage: {name}")
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        steps_seen = {step for step, _ in (*train, *held_out)}
        if len(steps_seen) == 1:
            # One step only: matplotlib would zoom to ±0.05 of it, a meaningless scale.
            only = steps_seen.pop()
            ax.set_xlim(only - 1, only + 1)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(stages) :]:
        ax.set_visible(False)
    return _png(figure)


def _metrics_png(report: Mapping[str, Any]) -> bytes:
    # One small panel per metric: NLLs, accuracies and ms/token share no scale.
    metrics = _dict(report.get("metrics"))
    models = _metric_models(report)
    names = [
        name
        for name in _metric_names(report)
        if any(_number(_dict(metrics.get(m)).get(name)) is not None for m in models)
    ]
    columns = min(len(names), 4)
    rows = math.ceil(len(names) / columns)
    figure = Figure(figsize=(3.2 * columns, 2.9 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):
        info = _metric_info(report, name)
        for position, model in enumerate(models):
            value = _number(_dict(metrics.get(model)).get(name))
            if value is None:
                # Say the value is missing, or an empty slot reads as a bar of zero.
                ax.text(position, 0, "n/a", ha="center", va="bottom", fontsize=8, color="#666")
                continue
            shown = value * 100 if info.get("percent") else value
            bars = ax.bar(position, shown, color=MODEL_COLORS[model], width=0.7)
            ax.bar_label(bars, labels=[_fmt_metric(value, info)], fontsize=7, padding=2)
        ax.set_xticks(range(len(models)), [MODEL_TITLES[m] for m in models], fontsize=8)
        ax.set_xlim(-0.6, len(models) - 0.4)
        ax.margins(y=0.18)
        ax.axhline(0, color="#444", linewidth=0.6)
        title = textwrap.fill(str(info.get("label") or name), 30)
        if info.get("better") in ("lower", "higher"):
            title += f"\n({info['better']} is better)"
        ax.set_title(title, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    return _png(figure)


def plots(report: dict[str, Any]) -> dict[str, bytes]:
    """The PNGs for this report by file name: metrics.png and loss.png, where there is data.

    A plot that fails to draw is logged and left out: a report without a chart is still a
    report, one that crashes on a chart is none.
    """
    images: dict[str, bytes] = {}
    builders = {METRICS_PNG: _metrics_png, LOSS_PNG: _loss_png}
    for name in _expected_plots(report):
        try:
            images[name] = builders[name](report)
        except Exception:
            log.warning("could not draw %s for %s", name, report.get("candidate_id"), exc_info=True)
    return images


# --- Markdown --------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(_md_cell(h) for h in headers) + " |",
        "|" + "|".join(" --- " for _ in headers) + "|",
    ]
    lines.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows)
    return [*lines, ""]


def _md_fence(text: str, language: str = "", quote: bool = False) -> list[str]:
    """Text in a fenced block, verbatim: the fence outgrows any backtick run inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    lines = [fence + language, *(text.splitlines() or [""]), fence]
    if quote:
        lines = [f"> {line}" if line else ">" for line in lines]
    return [*lines, ""]


def _md_code(text: str) -> str:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def markdown(report: dict[str, Any], images: Collection[str] | None = None) -> str:
    """report.md's text. `images`: the plot file names to link (default: those with data)."""
    _check_required(report)
    shown = set(_expected_plots(report) if images is None else images)
    decision, _ = _decision(report)
    out = [f"# Evaluation report: {report['candidate_id']}", ""]
    out.extend(f"- **{label}:** {value}" for label, value in _summary(report))
    out.append("")

    out += [f"## Decision: **{decision}**", ""]
    rule_line = f"Deciding rule: {_md_code(str(report['rule']))}"
    if report.get("reason"):
        rule_line += f" — {report['reason']}"
    out += [rule_line, ""]

    checks = _check_rows(report)
    if checks:
        out += ["## Checks", ""]
        rows = [
            [
                f"{rule} (deciding)" if deciding else rule,
                f"**{status}**" if status == "FAIL" else status,
                detail,
            ]
            for rule, status, detail, deciding in checks
        ]
        out += _md_table(["Rule", "Result", "Detail"], rows)

    headers, metric_rows = _metric_table(report)
    out += ["## Metrics", ""]
    if metric_rows:
        out += _md_table(headers, [[text for text, _ in row] for row in metric_rows])
        out += [*(f"_{note}_" for note in _metric_notes(report)), ""]
    else:
        out += ["No metrics recorded.", ""]
    if METRICS_PNG in shown:
        out += [f"![metrics]({METRICS_PNG})", ""]

    examples = _examples(report)
    if examples:
        out += ["## Held-out examples", ""]
        for number, parts in enumerate(examples, start=1):
            out += [f"### Example {number}", ""]
            for _field, label, text in parts:
                out += [f"**{label}**", ""]
                out += _md_fence(text, "text", quote=True)

    span, counts, extras = _data(report)
    if span or counts or extras:
        out += ["## Data used", ""]
        if span:
            out += [span, ""]
        if extras:
            out += [*(f"- **{label}:** {value}" for label, value in extras), ""]
        if counts:
            out += _md_table(["Kind", "Count"], [list(c) for c in counts])

    out += ["## Training", ""]
    training = _training(report)
    if training:
        out.extend(f"- **{label}:** {value}" for label, value in training)
        out.append("")
    stage_headers, stage_rows = _stage_table(report)
    if stage_rows:
        out += ["### Stages", ""]
        out += _md_table(stage_headers, stage_rows)
    out += ["### Loss", ""]
    if LOSS_PNG in shown:
        out += [f"![loss]({LOSS_PNG})", ""]
    else:
        out += ["No loss curve recorded.", ""]
    config = _config_json(report)
    if config is not None:
        out += ["### Config", ""]
        out += _md_fence(config, "json")

    verdict, notes = _monitor(report)
    out += ["## Training monitor", ""]
    if verdict is None and not notes:
        out += ["No monitor verdict recorded.", ""]
    else:
        out += [f"**Verdict:** {verdict if verdict is not None else DASH}", ""]
        if notes:
            out += [*(f"- {note}" for note in notes), ""]
    return "\n".join(out).rstrip("\n") + "\n"


# --- HTML ------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1100px; margin: 2em auto; padding: 0 1em; line-height: 1.45; }
h1 { font-size: 1.5em; word-break: break-all; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.decision { padding: .7em 1.1em; border-radius: 6px; color: #fff; font-size: 1.4em;
            font-weight: 700; display: inline-block; }
.decision.promote { background: #1e7e34; }
.decision.reject { background: #b02a37; }
.decision.other { background: #555; }
.reason { font-size: 1.05em; }
.pass { color: #1e7e34; font-weight: 600; }
.fail { color: #b02a37; font-weight: 700; }
tr.deciding { background: #fff3cd; }
.better { color: #1e7e34; }
.worse { color: #b02a37; }
.note { color: #555; font-size: .9em; }
pre { white-space: pre-wrap; word-break: break-word; background: #f6f8fa; padding: .6em;
      border-radius: 4px; margin: .2em 0 .8em; }
.example { border: 1px solid #ddd; border-radius: 6px; padding: .4em 1em; margin: 1em 0; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
.label { font-weight: 600; margin-top: .4em; }
img { max-width: 100%; }
@media (max-width: 700px) { .pair { grid-template-columns: 1fr; } }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _html_table(
    headers: list[str], rows: list[list[Cell]], row_classes: list[str] | None = None
) -> list[str]:
    out = ["<table>", "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr>"]
    for index, row in enumerate(rows):
        row_class = row_classes[index] if row_classes else ""
        cells = "".join(
            f'<td class="{_e(cls)}">{_e(text)}</td>' if cls else f"<td>{_e(text)}</td>"
            for text, cls in row
        )
        out.append(
            f'<tr class="{_e(row_class)}">{cells}</tr>' if row_class else f"<tr>{cells}</tr>"
        )
    out.append("</table>")
    return out


def _html_image(images: Mapping[str, bytes], name: str, alt: str) -> list[str]:
    payload = base64.b64encode(images[name]).decode("ascii")
    return [f'<p><img alt="{_e(alt)}" src="data:image/png;base64,{payload}"></p>']


def html_page(report: dict[str, Any], images: Mapping[str, bytes] | None = None) -> str:
    """report.html's text: one self-contained page; `images` maps plot file names to PNG bytes."""
    _check_required(report)
    images = {name: data for name, data in (images or {}).items() if name in PLOT_FILES}
    decision, decision_class = _decision(report)
    title = f"Evaluation report: {report['candidate_id']}"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{_e(title)}</h1>",
        "<ul>",
        *(
            f"<li><strong>{_e(label)}:</strong> {_e(value)}</li>"
            for label, value in _summary(report)
        ),
        "</ul>",
        "<h2>Decision</h2>",
        f'<div class="decision {decision_class}">{_e(decision)}</div>',
    ]
    reason = f" — {_e(report['reason'])}" if report.get("reason") else ""
    out.append(f'<p class="reason">Deciding rule: <code>{_e(report["rule"])}</code>{reason}</p>')

    checks = _check_rows(report)
    if checks:
        out.append("<h2>Checks</h2>")
        rows: list[list[Cell]] = []
        classes = []
        for rule, status, detail, deciding in checks:
            status_class = {"pass": "pass", "FAIL": "fail"}.get(status, "")
            shown_rule = f"{rule} (deciding)" if deciding else rule
            rows.append([(shown_rule, ""), (status, status_class), (detail, "")])
            classes.append("deciding" if deciding else "")
        out += _html_table(["Rule", "Result", "Detail"], rows, classes)

    out.append("<h2>Metrics</h2>")
    headers, metric_rows = _metric_table(report)
    if metric_rows:
        out += _html_table(headers, metric_rows)
        out += [f'<p class="note">{_e(note)}</p>' for note in _metric_notes(report)]
    else:
        out.append("<p>No metrics recorded.</p>")
    if METRICS_PNG in images:
        out += _html_image(images, METRICS_PNG, "metrics: candidate, champion and base")

    examples = _examples(report)
    if examples:
        out.append("<h2>Held-out examples</h2>")
        for number, parts in enumerate(examples, start=1):
            out += ['<div class="example">', f"<h3>Example {number}</h3>"]
            by_field = {field: (label, text) for field, label, text in parts}
            answers = [by_field[f] for f in ("champion", "candidate") if f in by_field]
            for field in ("prompt", "base"):
                if field in by_field:
                    label, text = by_field[field]
                    out += [f'<div class="label">{_e(label)}</div>', f"<pre>{_e(text)}</pre>"]
            if answers:
                # Champion and candidate side by side: the comparison the gate is about.
                out.append('<div class="pair">')
                for label, text in answers:
                    out.append(
                        f'<div><div class="label">{_e(label)}</div><pre>{_e(text)}</pre></div>'
                    )
                out.append("</div>")
            if "correction" in by_field:
                label, text = by_field["correction"]
                out += [f'<div class="label">{_e(label)}</div>', f"<pre>{_e(text)}</pre>"]
            out.append("</div>")

    span, counts, extras = _data(report)
    if span or counts or extras:
        out.append("<h2>Data used</h2>")
        if span:
            out.append(f"<p>{_e(span)}</p>")
        if extras:
            out.append("<ul>")
            out += [
                f"<li><strong>{_e(label)}:</strong> {_e(value)}</li>" for label, value in extras
            ]
            out.append("</ul>")
        if counts:
            out += _html_table(["Kind", "Count"], [[(k, ""), (c, "num")] for k, c in counts])

    out.append("<h2>Training</h2>")
    training = _training(report)
    if training:
        out.append("<ul>")
        out += [f"<li><strong>{_e(label)}:</strong> {_e(value)}</li>" for label, value in training]
        out.append("</ul>")
    stage_headers, stage_rows = _stage_table(report)
    if stage_rows:
        out.append("<h3>Stages</h3>")
        out += _html_table(stage_headers, [[(cell, "") for cell in row] for row in stage_rows])
    out.append("<h3>Loss</h3>")
    if LOSS_PNG in images:
        out += _html_image(images, LOSS_PNG, "training and held-out loss per stage")
    else:
        out.append("<p>No loss curve recorded.</p>")
    config = _config_json(report)
    if config is not None:
        out += ["<h3>Config</h3>", f"<pre>{_e(config)}</pre>"]

    out.append("<h2>Training monitor</h2>")
    verdict, notes = _monitor(report)
    if verdict is None and not notes:
        out.append("<p>No monitor verdict recorded.</p>")
    else:
        shown_verdict = verdict if verdict is not None else DASH
        out.append(f"<p><strong>Verdict:</strong> {_e(shown_verdict)}</p>")
        if notes:
            out += ["<ul>", *(f"<li>{_e(note)}</li>" for note in notes), "</ul>"]
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


# --- writing ---------------------------------------------------------------------------------


def render(report: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    """Write report.md, report.html and the plot PNGs into folder; return (md_path, html_path)."""
    _check_required(report)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = plots(report)
    # Plots first, so the report that links them never appears before they do.
    for name, data in images.items():
        atomic_write_bytes(folder / name, data)
    md_path, html_path = folder / MD_FILE, folder / HTML_FILE
    atomic_write_bytes(md_path, markdown(report, images).encode("utf-8"))
    atomic_write_bytes(html_path, html_page(report, images).encode("utf-8"))
    # A plot from an earlier render that this report has no data for would mislead a reader.
    for name in PLOT_FILES:
        if name not in images:
            with contextlib.suppress(FileNotFoundError):
                (folder / name).unlink()
    fsync_dir(folder)
    log.info("wrote report for %s into %s (%s)", report["candidate_id"], folder, report["decision"])
    return md_path, html_path
