"""A candidate's report files, report.md and report.html, and their one writer.

What a report says is a ReportView: development/report.py builds it from an evaluation, and
`write` keeps it in the candidate's meta.json (field `report`) before rendering both files
through common/render.py. Whatever happens to the candidate later is recorded in meta.json
too (a rollback by the post-promotion watch: `record_rollback`), and `rerender` renders
both files again from meta.json alone. So nothing ever edits a finished report, and the
files always agree with meta.json.

Torch-free and below orchestrator in the layers (see pyproject's import contracts): the
watch imports it, and so does the training worker's report step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from candidates.meta import META_FILE, CandidateMeta, read_meta, update_meta
from common.fs import atomic_write_bytes, atomic_write_text, fsync_dir
from common.render import render

log = logging.getLogger(__name__)

MD_FILE = "report.md"
HTML_FILE = "report.html"
LOSS_PNG = "loss.png"
METRICS_PNG = "metrics.png"
PLOT_FILES = (METRICS_PNG, LOSS_PNG)
DASH = "—"
# meta.metrics key: one entry per rollback by the watch, oldest first.
ROLLBACKS = "rollbacks"

Item = tuple[str, str]  # a (label, value) line


class Cell(BaseModel):
    text: str
    css: str = ""  # the HTML page's class for it ("num better", "fail"); Markdown ignores it


class Table(BaseModel):
    headers: list[str]
    rows: list[list[Cell]]


class Check(BaseModel):
    rule: str
    status: str  # "pass" | "FAIL" | "n/a"
    detail: str
    deciding: bool = False


class ExamplePart(BaseModel):
    field: str  # prompt | champion | candidate | base | correction
    label: str
    text: str


class ReportView(BaseModel):
    """What a report says, as text ready to show. Everything but the id and the decision may
    be empty: a report is still written when an evaluation had little to go on."""

    candidate_id: str
    decision: str
    rule: str
    reason: str = ""
    next_step: str = ""  # what the person can do after a refusal
    summary: list[Item] = Field(default_factory=list)
    checks: list[Check] = Field(default_factory=list)
    metrics: Table | None = None
    metric_notes: list[str] = Field(default_factory=list)
    plots: list[str] = Field(default_factory=list)  # the PNG files beside the report it shows
    examples: list[list[ExamplePart]] = Field(default_factory=list)
    # What the person taught since the champion, asked again of the candidate and of it.
    taught_summary: str | None = None
    taught: Table | None = None
    data_span: str | None = None
    data_extras: list[Item] = Field(default_factory=list)
    data_counts: Table | None = None
    training: list[Item] = Field(default_factory=list)
    stages: Table | None = None
    config: str | None = None  # the training config as indented JSON
    monitor_verdict: str | None = None
    monitor_notes: list[str] = Field(default_factory=list)

    @property
    def decision_kind(self) -> str:
        """promote or reject (green or red on the page); anything else is shown in grey."""
        kind = self.decision.strip().lower()
        return kind if kind in ("promote", "reject") else "other"


class Rollback(BaseModel):
    """The watch rolled this candidate back after the person rated it clearly worse."""

    at: datetime
    reason: str  # reads after "The person ": "rated 2.50 on average over ..."
    now_serving: str | None = None  # None: the base model

    @property
    def when(self) -> str:
        return fmt_time(self.at)


def fmt_time(value: Any) -> str:
    """A moment as a person reads it: `2026-11-21 03:20 UTC` (other offsets kept as given)."""
    if value is None or value == "":
        return DASH
    try:
        moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if moment.utcoffset() == timedelta(0):
        return moment.strftime("%Y-%m-%d %H:%M UTC")
    return moment.isoformat(sep=" ", timespec="minutes")


# --- rendering -------------------------------------------------------------------------------


def markdown(view: ReportView, rollbacks: list[Rollback] | None = None) -> str:
    """report.md's text; it links the plot files named in `view.plots`."""
    text = render("report.md.jinja", view=view, rollbacks=rollbacks or [])
    # Each section ends in a blank line, so the template's sections need not know which is last.
    return text.rstrip("\n") + "\n"


def html_page(
    view: ReportView, images: Mapping[str, bytes], rollbacks: list[Rollback] | None = None
) -> str:
    """report.html's text: one self-contained page, `images` (PNG bytes by file name) inline."""
    shown = {name: data for name, data in images.items() if name in PLOT_FILES}
    return render("report.html.jinja", view=view, images=shown, rollbacks=rollbacks or [])


# --- writing ---------------------------------------------------------------------------------


def write(folder: Path, view: ReportView, images: Mapping[str, bytes]) -> tuple[Path, Path]:
    """Write the plot PNGs, keep `view` in meta.json (when the folder has one: a bare folder
    gets the files only) and render report.md and report.html. Returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Plots first, so the report that links them never appears before they do.
    for name, data in images.items():
        atomic_write_bytes(folder / name, data)
    meta = None
    if (folder / META_FILE).exists():
        meta = update_meta(folder, report=view.model_dump(mode="json"))
    paths = _write_pages(folder, view, images, meta)
    # A plot from an earlier render that this report has no data for would mislead a reader.
    for name in PLOT_FILES:
        if name not in images:
            with contextlib.suppress(FileNotFoundError):
                (folder / name).unlink()
    fsync_dir(folder)
    return paths


def rerender(folder: Path) -> tuple[Path, Path]:
    """Render report.md and report.html again from meta.json (and the plots beside them)."""
    folder = Path(folder)
    meta = read_meta(folder)
    view = _view_of(meta)
    images = {name: (folder / name).read_bytes() for name in view.plots if (folder / name).exists()}
    view = view.model_copy(update={"plots": [name for name in view.plots if name in images]})
    paths = _write_pages(folder, view, images, meta)
    fsync_dir(folder)
    return paths


def record_rollback(
    folder: Path, reason: str, now_serving: str | None, at: datetime | None = None
) -> tuple[Path, Path]:
    """Record in meta.json that the watch rolled this candidate back, then re-render."""
    folder = Path(folder)
    entry = Rollback(at=at or datetime.now(UTC), reason=reason, now_serving=now_serving)
    metrics = read_meta(folder).metrics
    earlier = list(metrics.get(ROLLBACKS) or [])
    update_meta(folder, metrics={**metrics, ROLLBACKS: [*earlier, entry.model_dump(mode="json")]})
    log.info("recorded the rollback of %s in %s", folder.name, META_FILE)
    return rerender(folder)


def _write_pages(
    folder: Path, view: ReportView, images: Mapping[str, bytes], meta: CandidateMeta | None
) -> tuple[Path, Path]:
    rollbacks = _rollbacks_of(meta) if meta is not None else []
    md_path, html_path = folder / MD_FILE, folder / HTML_FILE
    atomic_write_text(md_path, markdown(view, rollbacks))
    atomic_write_text(html_path, html_page(view, images, rollbacks))
    log.info("wrote the report of %s into %s (%s)", view.candidate_id, folder, view.decision)
    return md_path, html_path


def _rollbacks_of(meta: CandidateMeta) -> list[Rollback]:
    rollbacks = []
    for entry in meta.metrics.get(ROLLBACKS) or []:
        try:
            rollbacks.append(Rollback.model_validate(entry))
        except ValidationError:
            log.warning("ignoring a malformed %s entry in %s of %s", ROLLBACKS, META_FILE, meta.id)
    return rollbacks


def _view_of(meta: CandidateMeta) -> ReportView:
    """The view kept in meta.json; without one (never evaluated, or evaluated before views
    were kept there) what meta.json says of the candidate and its last evaluation."""
    if meta.report:
        try:
            return ReportView.model_validate(meta.report)
        except ValidationError:
            log.warning("the report kept in %s of %s is malformed; rebuilding", META_FILE, meta.id)
    evaluation = meta.metrics.get("evaluation")
    evaluation = evaluation if isinstance(evaluation, Mapping) else {}
    return ReportView(
        candidate_id=meta.id,
        decision=str(evaluation.get("decision") or "not evaluated"),
        rule=str(evaluation.get("rule") or "none"),
        reason=str(evaluation.get("reason") or ""),
        summary=[
            ("Candidate", meta.id),
            ("Base model", meta.base_model),
            ("Created", fmt_time(meta.created_at)),
        ],
    )
