"""The training history: training runs, the candidates they wrote, the evaluations that
judged them and the promotion audit log. Rows are only added and updated, never deleted:
`whetstone status`, the reports and the trend read them back.

`TrainingHistory` is the Store's half that holds them (data/store.py has the conversations
and feedback); the Store gives it its sessions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from data.errors import InvalidInput, NotFound
from data.feedback_rules import mark_first
from data.models import (
    EVAL_DECISIONS,
    PROMOTION_ACTIONS,
    RUN_FINISHED,
    RUN_STATUSES,
    CandidateRecord,
    Evaluation,
    Message,
    Promotion,
    TrainingRun,
    new_id,
    utcnow,
)
from data.validation import (
    check_choice,
    check_json_object,
    check_known_fields,
    check_number,
    check_text,
    check_time,
)

RUN_FIELDS = frozenset(
    {
        "status",
        "profile",
        "reason",
        "error",
        "candidate_id",
        "data_snapshot",
        "progress",
        "pid",
        "started_at",
        "finished_at",
    }
)
CANDIDATE_FIELDS = frozenset({"status", "metrics", "parent_id", "run_id", "base_model"})


class TrainingHistory:
    """Runs, candidate records, evaluations and promotions, over the Store's sessions."""

    # The Store's: a read-write transaction (BEGIN IMMEDIATE on SQLite) and a read-only one.
    session: Callable[[], AbstractContextManager[Session]]
    read_session: Callable[[], AbstractContextManager[Session]]

    # --- training runs ------------------------------------------------------------------

    def create_run(
        self, profile: str, trigger: str, *, data_snapshot: dict[str, Any] | None = None
    ) -> TrainingRun:
        """A new queued run (id ``run_...``); trigger is free text (manual, nightly, ...)."""
        check_text("profile", profile, nullable=False)
        check_text("trigger", trigger, nullable=False)
        check_json_object("data_snapshot", data_snapshot)
        with self.session() as session:
            run = TrainingRun(
                id=new_id("run"),
                status="queued",
                profile=profile,
                trigger=trigger,
                data_snapshot=dict(data_snapshot or {}),
                progress={},
                created_at=utcnow(),
            )
            session.add(run)
        return run

    def update_run(self, run_id: str, **fields: Any) -> TrainingRun:
        """Set any of status, profile, reason, error, candidate_id, data_snapshot, progress,
        pid, started_at, finished_at. Moving to running sets started_at, and to a finished
        status (succeeded/failed/skipped/cancelled) sets finished_at, unless given."""
        check_known_fields(fields, RUN_FIELDS, "training run")
        if "status" in fields:
            check_choice("status", fields["status"], RUN_STATUSES, nullable=False)
        for name in ("profile",):
            if name in fields:
                check_text(name, fields[name], nullable=False)
        for name in ("reason", "error", "candidate_id"):
            check_text(name, fields.get(name))
        for name in ("data_snapshot", "progress"):
            if name in fields:
                check_json_object(name, fields[name], nullable=False)
        check_number("pid", fields.get("pid"), integer=True)
        for name in ("started_at", "finished_at"):
            check_time(name, fields.get(name))
        with self.session() as session:
            run = session.get(TrainingRun, run_id)
            if run is None:
                raise NotFound(f"unknown training run {run_id}")
            status = fields.get("status")
            now = utcnow()
            if status == "running" and run.started_at is None:
                fields.setdefault("started_at", now)
            if status in RUN_FINISHED and run.finished_at is None:
                fields.setdefault("finished_at", now)
            for name, value in fields.items():
                # Copy JSON values: the ORM only sees a change when a new object is assigned.
                setattr(run, name, dict(value) if isinstance(value, Mapping) else value)
        return run

    def get_run(self, run_id: str) -> TrainingRun:
        """One training run; NotFound if unknown."""
        with self.read_session() as session:
            run = session.get(TrainingRun, run_id)
            if run is None:
                raise NotFound(f"unknown training run {run_id}")
            return run

    def list_runs(
        self, limit: int = 20, *, status: str | None = None, except_trigger: str | None = None
    ) -> list[TrainingRun]:
        """Runs, newest first, optionally only those with ``status`` and not started by
        ``except_trigger``."""
        check_choice("status", status, RUN_STATUSES)
        stmt = select(TrainingRun).order_by(TrainingRun.created_at.desc()).limit(max(0, limit))
        if status is not None:
            stmt = stmt.where(TrainingRun.status == status)
        if except_trigger is not None:
            stmt = stmt.where(TrainingRun.trigger != except_trigger)
        with self.read_session() as session:
            return list(session.scalars(stmt))

    def latest_run(
        self, status: str | None = None, *, except_trigger: str | None = None
    ) -> TrainingRun | None:
        """The newest run (with ``status`` if given, not by ``except_trigger``), or None."""
        runs = self.list_runs(1, status=status, except_trigger=except_trigger)
        return runs[0] if runs else None

    # --- candidates, evaluations, promotions --------------------------------------------

    def record_candidate(
        self,
        candidate_id: str,
        *,
        base_model: str,
        run_id: str | None = None,
        parent_id: str | None = None,
        status: str = "trained",
        metrics: dict[str, Any] | None = None,
    ) -> CandidateRecord:
        """Record a candidate adapter; the id is its folder name under <home>/candidates/."""
        check_text("candidate_id", candidate_id, nullable=False)
        if not candidate_id.strip():
            raise InvalidInput("candidate_id is empty")
        check_text("base_model", base_model, nullable=False)
        check_text("parent_id", parent_id)
        check_text("status", status, nullable=False)
        check_json_object("metrics", metrics)
        with self.session() as session:
            if session.get(CandidateRecord, candidate_id) is not None:
                raise InvalidInput(f"candidate {candidate_id} is already recorded")
            if run_id is not None and session.get(TrainingRun, run_id) is None:
                raise InvalidInput(f"unknown training run {run_id} for candidate {candidate_id}")
            candidate = CandidateRecord(
                id=candidate_id,
                run_id=run_id,
                base_model=base_model,
                parent_id=parent_id,
                status=status,
                metrics=dict(metrics or {}),
                created_at=utcnow(),
            )
            session.add(candidate)
        return candidate

    def get_candidate_record(self, candidate_id: str) -> CandidateRecord:
        """One candidate record; NotFound if unknown."""
        with self.read_session() as session:
            candidate = session.get(CandidateRecord, candidate_id)
            if candidate is None:
                raise NotFound(f"unknown candidate {candidate_id}")
            return candidate

    def update_candidate(self, candidate_id: str, **fields: Any) -> CandidateRecord:
        """Set any of status, metrics, parent_id, run_id, base_model."""
        check_known_fields(fields, CANDIDATE_FIELDS, "candidate")
        for name in ("status", "base_model"):
            if name in fields:
                check_text(name, fields[name], nullable=False)
        check_text("parent_id", fields.get("parent_id"))
        if "metrics" in fields:
            check_json_object("metrics", fields["metrics"], nullable=False)
        with self.session() as session:
            candidate = session.get(CandidateRecord, candidate_id)
            if candidate is None:
                raise NotFound(f"unknown candidate {candidate_id}")
            run_id = fields.get("run_id")
            if run_id is not None and session.get(TrainingRun, run_id) is None:
                raise InvalidInput(f"unknown training run {run_id} for candidate {candidate_id}")
            for name, value in fields.items():
                setattr(candidate, name, dict(value) if isinstance(value, Mapping) else value)
        return candidate

    def record_evaluation(
        self,
        candidate_id: str,
        *,
        decision: str,
        rule: str,
        metrics: dict[str, Any] | None = None,
        champion_id: str | None = None,
        report_path: str | None = None,
        judged_message_ids: Iterable[str] = (),
    ) -> Evaluation:
        """Record an evaluation of a candidate against champion_id (None: the base model)
        and the gate's decision (promote/reject) with the rule that decided it. The held-out
        answers it judged on (`judged_message_ids`) are marked judged in the same transaction:
        later runs train on them (the rolling holdout, data/splits.py)."""
        check_text("candidate_id", candidate_id, nullable=False)
        check_choice("decision", decision, EVAL_DECISIONS, nullable=False)
        check_text("rule", rule, nullable=False)
        check_json_object("metrics", metrics)
        check_text("champion_id", champion_id)
        report_path = None if report_path is None else str(report_path)
        with self.session() as session:
            evaluation = Evaluation(
                id=new_id("eval"),
                candidate_id=candidate_id,
                champion_id=champion_id,
                metrics=dict(metrics or {}),
                decision=decision,
                rule=rule,
                report_path=report_path,
                created_at=utcnow(),
            )
            session.add(evaluation)
            mark_first(session, Message.judged_at, judged_message_ids, evaluation.created_at)
        return evaluation

    def list_evaluations(
        self, candidate_id: str | None = None, *, limit: int = 100
    ) -> list[Evaluation]:
        """Evaluations (of one candidate if given), newest first."""
        stmt = select(Evaluation).order_by(Evaluation.created_at.desc()).limit(max(0, limit))
        if candidate_id is not None:
            stmt = stmt.where(Evaluation.candidate_id == candidate_id)
        with self.read_session() as session:
            return list(session.scalars(stmt))

    def record_promotion(
        self,
        action: str,
        candidate_id: str | None,
        previous_id: str | None = None,
        *,
        forced: bool = False,
        reason: str | None = None,
        actor: str | None = None,
    ) -> Promotion:
        """Append to the promotion audit log: action promote/rollback/auto_rollback,
        candidate_id = what became current (None: the base model), previous_id = what was."""
        check_choice("action", action, PROMOTION_ACTIONS, nullable=False)
        for name, value in (
            ("candidate_id", candidate_id),
            ("previous_id", previous_id),
            ("reason", reason),
            ("actor", actor),
        ):
            check_text(name, value)
        if not isinstance(forced, bool):
            raise InvalidInput(f"forced must be true or false; got {forced!r}")
        with self.session() as session:
            promotion = Promotion(
                id=new_id("promo"),
                action=action,
                candidate_id=candidate_id,
                previous_id=previous_id,
                forced=forced,
                reason=reason,
                actor=actor,
                created_at=utcnow(),
            )
            session.add(promotion)
        return promotion

    def list_promotions(self, limit: int = 50) -> list[Promotion]:
        """The promotion audit log, newest first."""
        with self.read_session() as session:
            return list(
                session.scalars(
                    select(Promotion).order_by(Promotion.created_at.desc()).limit(max(0, limit))
                )
            )
