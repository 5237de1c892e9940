"""The loss monitor's callbacks on transformers' own TrainerState/TrainerControl: which
held-out loss is followed, when the target stops a run, and which adapter tensors diverged."""

from __future__ import annotations

from pathlib import Path

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


def test_a_diverged_adapter_is_named_before_it_could_become_a_candidate(tmp_path: Path) -> None:
    """A run whose LoRA went NaN (too high a learning rate) would serve empty answers: the
    job names the broken tensors and writes no candidate (train.TrainingDiverged). The DPO
    stage's frozen "ref" copy is not what ships, so it is not what is checked."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from development.train import non_finite_tensors
    from tests.tiny_models import tiny_llama

    base = AutoModelForCausalLM.from_pretrained(tiny_llama(tmp_path / "tiny"))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("ref", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert non_finite_tensors(model) == []
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["ref"].weight.fill_(
            float("nan")
        )
    assert non_finite_tensors(model) == []
    with torch.no_grad():
        layer = model.base_model.model.model.layers[1].self_attn.v_proj
        layer.lora_B["default"].weight[0, 0] = float("inf")
    assert non_finite_tensors(model) == [
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    ]


def test_a_run_whose_every_checkpoint_is_worse_than_its_start_is_called_worse() -> None:
    """The weights before training are measured, not saved: the checkpoint kept is the best
    after the start, and when even that is above the start, the run made things worse (the
    seed-1 week's night 6: 0.458 -> 0.507, 0.636, 0.645). Within 2% of the start is noise."""
    curve = LossCurve("eval_person_loss")
    for step, loss in ((0, 0.458), (4, 0.507), (8, 0.636), (12, float("nan"))):
        curve.on_log(None, at(step), TrainerControl(), logs={"eval_person_loss": loss})
    worse = verdict(curve)
    assert (worse["verdict"], worse["best_step"]) == ("worse", 4)
    assert "above the 0.4580 before training (the best, 0.5070, by 10.7%)" in worse["notes"][-1]

    flat = LossCurve("eval_person_loss")
    for step, loss in ((0, 0.458), (4, 0.465), (8, 0.470)):
        flat.on_log(None, at(step), TrainerControl(), logs={"eval_person_loss": loss})
    assert (verdict(flat)["verdict"], verdict(flat)["best_step"]) == ("underfitting", 4)
