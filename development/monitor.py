"""Trainer callbacks: the loss curve with a verdict on it, and progress for `status`/the TUI.

The seeds' idea was a target *training* loss (0.5 "optimal", below 0.3 "overfitting risk").
Training loss cannot tell memorising from learning, so the verdict here is judged on the
held-out loss (validation feedback plus general prompts the run never trains on):

    worse         every checkpoint's held-out loss is more than 2% above its value before
                  training: the run only made the held-out answers less likely (judged on
                  the person's feedback, train.py then writes no candidate unless
                  training.write_worse_candidates is set or the run is a recipe trial)
    underfitting  held-out loss fell less than 2% from its value before training
    overfitting   held-out loss ended more than 5% above its best while training loss fell
                  (the best checkpoint is the one kept, so the candidate is still the best)
    ok            otherwise
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger(__name__)

UNDERFIT_BELOW = 0.02
WORSE_ABOVE = 0.02
OVERFIT_ABOVE = 0.05


class LossCurve(TrainerCallback):
    """Records [step, loss] for training and held-out loss of one stage. `key` is the
    monitored held-out loss (eval_person_loss when the run has the person's validation
    feedback); the general prompts' held-out loss is kept beside it when logged."""

    def __init__(self, key: str = "eval_loss") -> None:
        self.key = key
        self.train: list[list[float]] = []
        self.eval: list[list[float]] = []
        self.eval_general: list[list[float]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any):
        logs = logs or {}
        if "loss" in logs:
            self.train.append([state.global_step, round(float(logs["loss"]), 5)])
        if self.key in logs:
            self.eval.append([state.global_step, round(float(logs[self.key]), 5)])
        if "eval_general_loss" in logs:
            self.eval_general.append(
                [state.global_step, round(float(logs["eval_general_loss"]), 5)]
            )

    def as_dict(self) -> dict[str, list[list[float]]]:
        curves = {"train": self.train, "eval": self.eval}
        if self.eval_general:
            curves["eval_general"] = self.eval_general
        return curves


class TargetLoss(TrainerCallback):
    """Stops training at the first evaluation whose monitored held-out loss is at or below
    `target` (the checkpoint saved at that step is then the best one, and is kept)."""

    def __init__(self, key: str, target: float) -> None:
        self.key, self.target = key, target
        self.reached_at: int | None = None

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kw):
        value = (metrics or {}).get(self.key)
        if value is not None and value <= self.target and self.reached_at is None:
            self.reached_at = state.global_step
            control.should_training_stop = True
            log.info(
                "held-out loss %.4f <= target %.4f at step %d: stopping",
                value,
                self.target,
                state.global_step,
            )


def verdict(curve: LossCurve, kept_last: int | None = None) -> dict[str, Any]:
    """{"verdict": worse|ok|underfitting|overfitting|unmonitored, "notes": [...], "best_step"}.
    `best_step` is the checkpoint the trainer keeps: the best held-out loss after the start
    (the weights before training are measured, not saved), or `kept_last`, the last step,
    when the held-out rows were too few to choose by (the loss is then only reported)."""
    if len(curve.eval) < 2:
        return {"verdict": "unmonitored", "notes": ["no held-out loss recorded"]}
    # A loss that went NaN or inf is the worst there is, not one min() may skip or pick.
    points = [(step, loss if math.isfinite(loss) else math.inf) for step, loss in curve.eval]
    start_step, start = points[0]
    best_step, best = min(points[1:], key=lambda point: point[1])
    end_step, end = curve.eval[-1]
    fell = (start - best) / start if start > 0 else 0.0
    change = f"{fell * 100:.1f}% lower" if fell >= 0 else f"{-fell * 100:.1f}% higher"
    notes = [
        f"held-out loss {start:.4f} at step {int(start_step)} -> best {best:.4f} at step "
        f"{int(best_step)} ({change}), last {end:.4f} at step {int(end_step)}"
    ]
    train_fell = len(curve.train) >= 2 and curve.train[-1][1] < curve.train[0][1]
    if start > 0 and best > start * (1 + WORSE_ABOVE):
        notes.append(
            f"worse: every checkpoint's held-out loss is above the {start:.4f} before training "
            f"(the best, {best:.4f}, by {(best - start) / start * 100:.1f}%)"
        )
        label = "worse"
    elif fell < UNDERFIT_BELOW:
        notes.append("underfitting: held-out loss barely moved; more steps or a higher LR")
        label = "underfitting"
    elif end > best * (1 + OVERFIT_ABOVE) and train_fell:
        kept = "" if kept_last is not None else f"; the step-{int(best_step)} checkpoint was kept"
        notes.append(
            f"overfitting: held-out loss rose {((end - best) / best) * 100:.1f}% above its best "
            f"while training loss kept falling{kept}"
        )
        label = "overfitting"
    else:
        label = "ok"
    if kept_last is not None:
        notes.append(
            f"the last checkpoint (step {kept_last}) was kept: too few of the person's held-out "
            "rows to choose by (training.min_person_validation_rows)"
        )
        best_step = kept_last
    return {"verdict": label, "notes": notes, "best_step": int(best_step)}


class Progress(TrainerCallback):
    """Writes {stage, step, max_steps, loss, eval_loss, eta_s} through `report` (at most once
    a second, and always at the end), so other processes can show a live bar."""

    def __init__(
        self,
        report: Callable[[dict[str, Any]], None],
        stage: str,
        stage_number: int,
        stages: int,
        min_interval_s: float = 1.0,
        key: str = "eval_loss",
    ) -> None:
        self.key = key
        self.report = report
        self.base = {"stage": stage, "stage_number": stage_number, "stages": stages}
        self.min_interval_s = min_interval_s
        self.started = time.monotonic()
        self.last_sent = 0.0
        self.loss: float | None = None
        self.eval_loss: float | None = None

    def _send(self, state: Any, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_sent < self.min_interval_s:
            return
        self.last_sent = now
        elapsed = now - self.started
        step, total = state.global_step, state.max_steps or 0
        eta = elapsed / step * (total - step) if step and total else None
        try:
            self.report(
                {
                    **self.base,
                    "step": step,
                    "max_steps": total,
                    "loss": self.loss,
                    "eval_loss": self.eval_loss,
                    "elapsed_s": round(elapsed, 1),
                    "eta_s": None if eta is None else round(eta, 1),
                }
            )
        except Exception:  # progress is advisory: a locked database must not stop training
            log.warning("could not record progress", exc_info=True)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any):
        self.started = time.monotonic()
        self._send(state, force=True)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any):
        logs = logs or {}
        if "loss" in logs:
            self.loss = round(float(logs["loss"]), 5)
        if self.key in logs:
            self.eval_loss = round(float(logs[self.key]), 5)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any):
        self._send(state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any):
        self._send(state, force=True)
