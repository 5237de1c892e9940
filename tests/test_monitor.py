"""The loss monitor's callbacks on transformers' own TrainerState/TrainerControl: which
held-out loss is followed, and when the target stops a run."""

from __future__ import annotations

from transformers import TrainerControl, TrainerState

from development.monitor import LossCurve, TargetLoss, verdict


def at(step: int) -> TrainerState:
    state = TrainerState()
    state.global_step = step
    return state


def test_target_loss_stops_at_the_first_evaluation_that_reaches_it() -> None:
    target = TargetLoss("eval_person_loss", 0.5)
    control = TrainerControl()
    target.on_evaluate(None, at(4), control, metrics={"eval_person_loss": 0.9})
    # The general prompts' loss is not what the run is for: it never stops it.
    target.on_evaluate(None, at(4), control, metrics={"eval_general_loss": 0.1})
    assert not control.should_training_stop and target.reached_at is None
    target.on_evaluate(None, at(8), control, metrics={"eval_person_loss": 0.5})
    assert control.should_training_stop and target.reached_at == 8


def test_curve_follows_the_person_loss_and_keeps_the_general_one() -> None:
    curve = LossCurve("eval_person_loss")
    control = TrainerControl()
    for step, person, general in ((0, 2.0, 1.0), (4, 0.8, 0.9), (8, 0.9, 0.85)):
        curve.on_log(None, at(step), control, logs={"eval_person_loss": person})
        curve.on_log(None, at(step), control, logs={"eval_general_loss": general})
        curve.on_log(None, at(step), control, logs={"loss": 3.0 - step / 4})
    data = curve.as_dict()
    assert data["eval"] == [[0, 2.0], [4, 0.8], [8, 0.9]]
    assert data["eval_general"] == [[0, 1.0], [4, 0.9], [8, 0.85]]
    assert verdict(curve)["best_step"] == 4
