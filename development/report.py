"""A candidate's evaluation report: what it says, built from the evaluator's report dict.

The report dict comes from development/evaluate.py. Only `candidate_id`, `decision` and `rule`
are required; everything else may be missing or None, because a report must still be written
when an evaluation had little to go on (champion is the base model, no holdout pairs, no loss
curve recorded).

`view()` turns the dict into a candidates.reports.ReportView (text ready to show); `plots()`
draws its charts (development/plots.py). The page layout lives in the templates under
common/templates/, and candidates.reports is the one writer of the files:

    report.md     Markdown; user text is shown verbatim inside fenced blocks, so it stays inert
                  in a Markdown viewer and readable in a terminal.
    report.html   one self-contained page: inline CSS, plots as data: URIs, no scripts; every
                  value is autoescaped, since prompts and answers are user text.
    loss.png      train / held-out loss per training stage (only when a curve was recorded)
    metrics.png   one small bar chart per metric: candidate / champion / base

The view is also kept in the candidate's meta.json, so the watch after a promotion can render
the report again with what happened since (candidates.reports.rerender).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from candidates import reports
from candidates.reports import (
    DASH,
    LOSS_PNG,
    METRICS_PNG,
    Cell,
    Check,
    ExamplePart,
    Item,
    ReportView,
    Table,
    fmt_time,
)
from development import plots as charts

log = logging.getLogger(__name__)

MD_FILE = reports.MD_FILE
HTML_FILE = reports.HTML_FILE
PLOT_FILES = reports.PLOT_FILES

REQUIRED_KEYS = ("candidate_id", "decision", "rule")
MAX_EXAMPLES = 5
MODELS = ("candidate", "champion", "base")
MODEL_TITLES = {"candidate": "Candidate", "champion": "Champion", "base": "Base"}


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
    """Candidate minus other, marked better or worse given the metric's direction."""
    mine, theirs = _number(candidate), _number(other)
    if mine is None or theirs is None:
        return Cell(text=DASH, css="num")
    diff = mine - theirs
    # Float noise (1.1 - 1.0 - 0.1) must read as "no change", not as +2.776e-17.
    if abs(diff) <= 1e-12 * max(1.0, abs(mine), abs(theirs)):
        diff = 0.0
    unit = " pp" if info.get("percent") else ""
    if diff == 0:
        return Cell(text=f"0{unit}", css="num")
    text = f"{diff * 100:+.4g}{unit}" if unit else f"{diff:+.4g}"
    better = info.get("better")
    if better not in ("lower", "higher"):
        return Cell(text=text, css="num")
    improved = diff < 0 if better == "lower" else diff > 0
    verdict = "better" if improved else "worse"
    return Cell(text=f"{text} ({verdict})", css=f"num {verdict}")


# --- what the report says --------------------------------------------------------------------


def _champion_is_base(report: Mapping[str, Any]) -> bool:
    return report.get("champion_id") is None


def _summary(report: Mapping[str, Any]) -> list[Item]:
    champion = report.get("champion_id")
    items = [
        ("Candidate", str(report["candidate_id"])),
        ("Champion", str(champion) if champion is not None else "the base model"),
        ("Base model", _fmt_value(report.get("base_model"))),
        ("Created", fmt_time(report.get("created_at"))),
    ]
    if report.get("evaluation_seconds") is not None:
        items.append(("Evaluation took", _fmt_duration(report.get("evaluation_seconds"))))
    return items


def _checks(report: Mapping[str, Any]) -> list[Check]:
    deciding = str(report["rule"])
    rows = []
    for check in _list(report.get("checks")):
        check = _dict(check)
        rule = _fmt_value(check.get("rule"))
        passed = check.get("passed")
        status = "pass" if passed is True else "FAIL" if passed is False else "n/a"
        detail = _fmt_value(check.get("detail", ""))
        rows.append(Check(rule=rule, status=status, detail=detail, deciding=rule == deciding))
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


def _metric_table(report: Mapping[str, Any]) -> Table | None:
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
        row = [
            Cell(text=str(info.get("label") or name)),
            Cell(text=str(info.get("better") or DASH)),
        ]
        row.extend(Cell(text=_fmt_metric(values[m], info), css="num") for m in models)
        row.extend(_delta(values["candidate"], values[other], info) for other in compare)
        rows.append(row)
    return Table(headers=headers, rows=rows) if rows else None


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


def _data(report: Mapping[str, Any]) -> tuple[str | None, list[Item], Table | None]:
    """(feedback date range, any other entries such as evaluated_on, counts by kind)."""
    data = _dict(report.get("data"))
    first, last = data.get("first_feedback_at"), data.get("last_feedback_at")
    span = None
    if first is not None or last is not None:
        span = f"Feedback from {fmt_time(first)} to {fmt_time(last)}."
    counts = [
        [Cell(text=_humanize(kind)), Cell(text=_fmt_value(count), css="num")]
        for kind, count in _dict(data.get("counts")).items()
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
    table = Table(headers=["Kind", "Count"], rows=counts) if counts else None
    return span, extras, table


def _examples(report: Mapping[str, Any]) -> list[list[ExamplePart]]:
    """Per example, the parts to show, in reading order."""
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
            text = str(value) if value != "" else "(empty answer)"
            parts.append(ExamplePart(field=field, label=label, text=text))
        if parts:
            examples.append(parts)
    return examples


def _taught(report: Mapping[str, Any]) -> tuple[str | None, Table | None]:
    """Each correction the candidate trained on and its champion never had, asked again of
    both: a line saying how many each answered, and the answers."""
    rows = [_dict(row) for row in _list(report.get("taught"))]
    if not rows:
        return None, None
    reference = "base" if _champion_is_base(report) else "champion"
    title = "Base model" if reference == "base" else "Champion"

    def cell(row: Mapping[str, Any], who: str) -> Cell:
        answer = _dict(row.get(who))
        said = answer.get("says_it") is True
        text = str(answer.get("answer") or "(empty answer)")
        return Cell(text=("✓ " if said else "✗ ") + text, css="better" if said else "worse")

    def count(who: str) -> int:
        return sum(1 for row in rows if _dict(row.get(who)).get("says_it") is True)

    summary = (
        f"Asked again, the candidate says {count('candidate')} of the {len(rows)} "
        f"correction(s) taught since the {title.lower()} (✓: at least half of the "
        f"correction's words that the question does not hold); the {title.lower()} says "
        f"{count(reference)}."
    )
    table = Table(
        headers=["You asked", "Your correction", "Candidate", title],
        rows=[
            [
                Cell(text=_fmt_value(row.get("question"))),
                Cell(text=_fmt_value(row.get("correction"))),
                cell(row, "candidate"),
                cell(row, reference),
            ]
            for row in rows
        ],
    )
    return summary, table


def _training(report: Mapping[str, Any]) -> list[Item]:
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


def _stage_table(report: Mapping[str, Any]) -> Table | None:
    stages = [_dict(s) for s in _list(_dict(report.get("training")).get("stages"))]
    stages = [s for s in stages if s]
    if not stages:
        return None
    headers: list[str] = []
    for stage in stages:
        headers.extend(key for key in stage if key not in headers)
    if "name" in headers:
        headers.remove("name")
        headers.insert(0, "name")
    rows = [[Cell(text=_fmt_value(stage.get(key))) for key in headers] for stage in stages]
    return Table(headers=headers, rows=rows)


def _config_json(report: Mapping[str, Any]) -> str | None:
    config = _dict(report.get("training")).get("config")
    if config is None or config == {}:
        return None
    return json.dumps(config, indent=2, ensure_ascii=False, default=str)


def _monitor(report: Mapping[str, Any]) -> tuple[str | None, list[str]]:
    """(verdict, notes); the verdict is None only when the monitor said nothing at all."""
    monitor = _dict(_dict(report.get("training")).get("monitor"))
    verdict = monitor.get("verdict")
    notes = [_fmt_value(note) for note in _list(monitor.get("notes"))]
    if verdict is None:
        return (DASH if notes else None), notes
    return _fmt_value(verdict), notes


def view(report: Mapping[str, Any], plot_files: Collection[str] | None = None) -> ReportView:
    """What the report says. `plot_files`: the plots it shows (default: those with data)."""
    _check_required(report)
    shown = set(_expected_plots(report) if plot_files is None else plot_files)
    span, extras, counts = _data(report)
    verdict, notes = _monitor(report)
    taught_summary, taught = _taught(report)
    return ReportView(
        candidate_id=str(report["candidate_id"]),
        decision=str(report["decision"]),
        rule=str(report["rule"]),
        reason=str(report.get("reason") or ""),
        next_step=str(report.get("next_step") or ""),
        summary=_summary(report),
        checks=_checks(report),
        metrics=_metric_table(report),
        metric_notes=_metric_notes(report),
        plots=[name for name in PLOT_FILES if name in shown],
        examples=_examples(report),
        taught_summary=taught_summary,
        taught=taught,
        data_span=span,
        data_extras=extras,
        data_counts=counts,
        training=_training(report),
        stages=_stage_table(report),
        config=_config_json(report),
        monitor_verdict=verdict,
        monitor_notes=notes,
    )


# --- plots -----------------------------------------------------------------------------------


def _points(raw: Any) -> list[charts.Point]:
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


def _loss_stages(report: Mapping[str, Any]) -> list[charts.LossStage]:
    curve = _dict(_dict(report.get("training")).get("loss_curve"))
    stages = []
    for name, series in curve.items():
        train, held_out = _points(_dict(series).get("train")), _points(_dict(series).get("eval"))
        if train or held_out:
            stages.append(charts.LossStage(str(name), train, held_out))
    return stages


def _metric_panels(report: Mapping[str, Any]) -> list[charts.MetricPanel]:
    """One panel per metric that some model has a number for."""
    metrics = _dict(report.get("metrics"))
    models = _metric_models(report)
    panels = []
    for name in _metric_names(report):
        info = _metric_info(report, name)
        bars = []
        for model in models:
            raw = _dict(metrics.get(model)).get(name)
            value = _number(raw)
            if value is not None and info.get("percent"):
                value *= 100
            bars.append(charts.Bar(model, MODEL_TITLES[model], value, _fmt_metric(raw, info)))
        if any(bar.value is not None for bar in bars):
            label = str(info.get("label") or name)
            panels.append(charts.MetricPanel(label, info.get("better"), bars))
    return panels


def _expected_plots(report: Mapping[str, Any]) -> list[str]:
    names = []
    if _metric_panels(report):
        names.append(METRICS_PNG)
    if _loss_stages(report):
        names.append(LOSS_PNG)
    return names


def plots(report: Mapping[str, Any]) -> dict[str, bytes]:
    """The PNGs for this report by file name: metrics.png and loss.png, where there is data.

    A plot that fails to draw is logged and left out: a report without a chart is still a
    report, one that crashes on a chart is none.
    """
    images: dict[str, bytes] = {}
    for name in _expected_plots(report):
        try:
            if name == METRICS_PNG:
                images[name] = charts.metrics_png(_metric_panels(report))
            else:
                images[name] = charts.loss_png(_loss_stages(report))
        except Exception:
            log.warning("could not draw %s for %s", name, report.get("candidate_id"), exc_info=True)
    return images


# --- text and files --------------------------------------------------------------------------


def markdown(report: Mapping[str, Any], images: Collection[str] | None = None) -> str:
    """report.md's text. `images`: the plot file names to link (default: those with data)."""
    return reports.markdown(view(report, images))


def html_page(report: Mapping[str, Any], images: Mapping[str, bytes] | None = None) -> str:
    """report.html's text: one self-contained page; `images` maps plot file names to PNG bytes."""
    images = images or {}
    return reports.html_page(view(report, images), images)


def render(report: Mapping[str, Any], folder: Path) -> tuple[Path, Path]:
    """Write report.md, report.html and the plot PNGs into folder (and keep what the report
    says in its meta.json, when it is a candidate's); return (md_path, html_path)."""
    _check_required(report)
    images = plots(report)
    return reports.write(Path(folder), view(report, images), images)
