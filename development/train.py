"""Train a candidate adapter on the person's feedback, then evaluate it and (if the gate
passes) promote it.

    python -m development.train --home ~/.whetstone --profile quick_test

One run: check there is enough new data (else the run is recorded as skipped, with why);
build the datasets (holdout never touched); SFT with TRL, continuing the champion's LoRA
(or a fresh one: training.start_from), early-stopped on held-out loss; then a DPO stage
when there are correction pairs, or KTO when there are both
good and bad ratings; write the adapter as a candidate folder atomically; evaluate it against
the champion and the base; promote it when the gate says so.

A run of the recipe-searched profile uses the adopted recipe's knobs (<home>/recipe.json,
orchestrator.experiments) under its own --set items. With --trial the run is one trial of that
search: its candidate is scored on the validation split and never evaluated or promoted.

A crash records the run as failed with its error; a kill leaves the run "running" with a
dead pid, which the next `whetstone train`/`status` marks failed. Either way no candidate
appears: the registry only renames a finished, validated folder into place.

One module on purpose: a run's steps (enough data?, datasets, SFT, the preference stage,
the candidate, evaluation, promotion) read top to bottom, as nanochat's scripts do.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import shutil
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from candidates import CandidateMeta, Registry
from common import locks
from common.config import Settings, log_resolved
from common.entrypoint import (
    add_settings_arguments,
    exit_on_config_error,
    log_to_stderr,
    settings_from_args,
)
from data.store import Store
from development.gate import general_drift
from orchestrator.schedule import CATCH_UP_TRIGGER, RETRY_TRIGGER
from production.model.device_pin import pin_device

if TYPE_CHECKING:
    from data.exports import FeedbackItem
    from development.training_data import TrainingData

log = logging.getLogger("development.train")

EXIT_OK, EXIT_FAILED, EXIT_BUSY = 0, 1, 75


class TrainingBusy(RuntimeError):
    """Another training run holds the lock: never two at once."""


class TrainingDiverged(RuntimeError):
    """The trained adapter holds NaN or inf: it would answer nothing, so it is not written."""


class Terminated(BaseException):
    """SIGTERM (a cancel, the job timeout, shutdown): end the run as failed, cleanly."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(f"terminated by signal {signum}")


@contextmanager
def training_lock(settings: Settings) -> Iterator[None]:
    """An exclusive flock on <home>/run/training.lock for the whole run (freed by the kernel
    if the process dies, so a killed run never blocks the next)."""
    settings.paths.run_dir.mkdir(parents=True, exist_ok=True)
    path = settings.paths.run_dir / "training.lock"
    try:
        fd = locks.take(path, wait=False, note=f"pid {os.getpid()}")
    except locks.LockBusy as exc:
        holder = exc.note or "another process"
        raise TrainingBusy(f"another training run is in progress ({holder})") from None
    try:
        yield
    finally:
        locks.release(fd, clear=True)


def scratch_dir(settings: Settings, run_id: str) -> Path:
    """Trainer checkpoints of one run; removed when the run ends (or by the next run)."""
    return settings.paths.run_dir / "train" / run_id


@dataclass
class Stage:
    name: str  # sft | dpo | kto
    rows: int
    max_steps: int
    learning_rate: float
    why: str
    steps: int = 0
    best_step: int | None = None
    seconds: float = 0.0
    curve: dict[str, list[list[float]]] = field(default_factory=dict)
    monitor: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rows": self.rows,
            "max_steps": self.max_steps,
            "steps": self.steps,
            "best_step": self.best_step,
            "learning_rate": self.learning_rate,
            "seconds": round(self.seconds, 1),
            "why": self.why,
        }


def plan_stages(
    data: Any,
    settings: Settings,
    profile_name: str,
    *,
    continuing: bool = False,
    learning_rate_scale: float = 1.0,
) -> list[Stage]:
    """SFT first; then DPO when there are correction/rating pairs, else KTO when there are
    both desirable and undesirable answers. The preference stage starts from the SFT adapter.
    Every stage passes over its rows at most `training.max_epochs` times, or `continue_epochs` times
    when continuing the champion (its rows are only what is new and a sample of the earlier),
    at the profile's learning rate times `continue_learning_rate_scale`; every stage's rate
    times `learning_rate_scale` (a retry of a refused run)."""
    profile = settings.profile(profile_name)
    training = settings.training
    sft_steps = profile.max_steps
    why = f"{data.counts['sft_rows']} person rows + {data.counts['replay_rows']} replay rows"
    epochs, key = (
        (training.continue_epochs, "continue_epochs")
        if continuing
        else (training.max_epochs, "max_epochs")
    )
    per_step = profile.batch_size * profile.grad_accum
    passes = math.ceil(epochs * len(data.sft) / per_step)
    if passes < sft_steps:
        sft_steps = max(1, passes)
        why += f", {epochs:g} epochs (training.{key})"
    sft_lr = profile.learning_rate
    if continuing and training.continue_learning_rate_scale != 1:
        sft_lr *= training.continue_learning_rate_scale
        why += f", learning rate x{training.continue_learning_rate_scale:g} when continuing"
    if learning_rate_scale != 1:
        sft_lr *= learning_rate_scale
        why += f", learning rate x{learning_rate_scale:g} (a retry of a refused run)"
    stages = [Stage("sft", len(data.sft), sft_steps, sft_lr, why)]
    steps = profile.preference_steps
    steps = max(1, profile.max_steps // 2) if steps is None else steps
    lr = (profile.preference_learning_rate or profile.learning_rate / 4) * learning_rate_scale
    if steps == 0:
        return stages

    # The preference stage's own batch (run_preference): pairs need at least two rows.
    preference_per_step = max(2, profile.batch_size) * profile.grad_accum

    def capped(rows: int, why: str) -> tuple[int, str]:
        # The same epoch cap as SFT: a newcomer's standard run made 100 DPO steps of 16
        # rows over 5 pairs (320 passes, 21 minutes on two cores) and was refused for +34.5%
        # general-probe NLL.
        passes = math.ceil(epochs * rows / preference_per_step)
        if passes < steps:
            return max(1, passes), f"{why}, {epochs:g} epochs (training.{key})"
        return steps, why

    if len(data.dpo) >= 2:
        dpo_steps, why = capped(len(data.dpo), f"{len(data.dpo)} preference pairs")
        stages.append(Stage("dpo", len(data.dpo), dpo_steps, lr, why))
    elif data.counts["kto_desirable"] >= 2 and data.counts["kto_undesirable"] >= 2:
        kto_steps, why = capped(
            len(data.kto),
            f"{data.counts['kto_desirable']} good / {data.counts['kto_undesirable']} bad "
            f"answers, weights {data.kto_weights}",
        )
        stages.append(Stage("kto", len(data.kto), kto_steps, lr, why))
    return stages


def _peak_host_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB on Linux


def hardware(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _common_args(
    settings: Settings, profile: str, device: str, out: Path, stage: Stage, batch: int
) -> dict:
    import torch

    warmup = math.ceil(stage.max_steps * settings.profile(profile).warmup_ratio)
    cuda = device.startswith("cuda")
    return {
        "output_dir": str(out),
        "max_steps": stage.max_steps,
        "per_device_train_batch_size": batch,
        "per_device_eval_batch_size": batch,
        "learning_rate": stage.learning_rate,
        "warmup_steps": warmup,
        "lr_scheduler_type": "linear",
        "logging_steps": 1,
        "report_to": "none",
        "seed": settings.training.seed,
        "data_seed": settings.training.seed,
        "use_cpu": not cuda,
        "bf16": cuda and torch.cuda.is_bf16_supported(),
        "fp16": cuda and not torch.cuda.is_bf16_supported(),
        "disable_tqdm": True,
        "optim": _optimizer(settings.profile(profile).optimizer, cuda),
        "dataloader_num_workers": 0,
        "max_length": settings.model.max_seq_length,
        "gradient_checkpointing": gradient_checkpointing(settings, device),
    }


def gradient_checkpointing(settings: Settings, device: str) -> bool:
    """Whether training recomputes activations (training.gradient_checkpointing; see its
    comment) on `device`."""
    choice = settings.training.gradient_checkpointing
    return device.startswith("cuda") if choice == "auto" else choice == "on"


def padding_free(settings: Settings, backend: str) -> bool:
    """Whether SFT batches are padding-free (training.padding_free; see its comment) with
    `backend` (choose_backend's answer) training."""
    import importlib.util

    unsloth = backend == "unsloth"
    choice = settings.training.padding_free
    if choice == "auto":
        return unsloth and importlib.util.find_spec("flash_attn") is not None
    if choice == "on" and not unsloth:
        # TRL refuses padding-free batches it cannot cut to max_length; Unsloth cuts them.
        raise ValueError(
            "training.padding_free = 'on' needs the unsloth backend (CUDA); this run uses "
            "transformers, whose trainer does not cut padding-free rows to "
            "model.max_seq_length: set it to 'auto' or 'off'"
        )
    return choice == "on"


def _optimizer(wanted: str, cuda: bool) -> str:
    if wanted == "adamw_8bit" and not cuda:
        raise ValueError("optimizer adamw_8bit needs a CUDA device (bitsandbytes)")
    if wanted != "auto":
        return wanted
    import importlib.util

    return "adamw_8bit" if cuda and importlib.util.find_spec("bitsandbytes") else "adamw_torch"


def _attach_lora(
    model: Any, settings: Settings, profile_name: str, backend: str, device: str
) -> Any:
    from production.model.gpt_oss_layout import lora_targets

    rank = settings.lora_rank(profile_name)
    # Keep alpha/r as configured when a profile overrides the rank.
    alpha = max(1, round(settings.lora.alpha * rank / settings.lora.r))
    # On GPT-OSS in Unsloth's 4-bit layout the MLP names become every expert's Linear, for
    # both backends alike (PEFT alone would put LoRA on attention only).
    targets = lora_targets(model, settings.lora.target_modules)
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        # Unsloth stacks the expert LoRA of a MoE block into one `weight_stack` Parameter;
        # TRL's DPO/KTO copy every ".default." parameter into a "ref" adapter by name and
        # fail on it ("Linear has no attribute weight_stack", GPT-OSS on an H200). Per-expert
        # parameters, as PEFT makes them, keep the preference stage working.
        os.environ["UNSLOTH_MOE_STACKED_LORA"] = "0"
        return FastLanguageModel.get_peft_model(
            model,
            r=rank,
            lora_alpha=alpha,
            lora_dropout=settings.lora.dropout,
            target_modules=targets,
            use_gradient_checkpointing=(
                "unsloth" if gradient_checkpointing(settings, device) else False
            ),
            random_state=settings.training.seed,
            use_rslora=settings.lora.use_rslora,
        )
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=settings.lora.dropout,
        target_modules=targets,
        use_rslora=settings.lora.use_rslora,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _continue_champion(
    model: Any, settings: Settings, registry: Registry, champion: str | None, has_new_rows: bool
) -> str:
    """Copy the champion's LoRA weights into this run's fresh adapter, so training continues
    what it learned (training.start_from). Returns "" when done, else why it was not: a
    champion of another base model or LoRA shape (rank, alpha, modules) is never forced in,
    and a forced run with nothing new to add retrains on all feedback instead."""
    if settings.training.start_from != "champion":
        return "training.start_from is 'base'"
    if champion is None:
        return "no champion yet"
    if not has_new_rows:
        return f"nothing new to train on since the champion {champion}"
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    candidate = registry.get(champion)
    if candidate.meta is None or not candidate.valid:
        return f"the champion {champion} is not readable ({candidate.error})"
    if candidate.meta.base_model != settings.model.base_model:
        return f"the champion {champion} was trained on {candidate.meta.base_model}"
    theirs = json.loads((candidate.path / "adapter_config.json").read_text())
    ours = model.peft_config["default"]
    for key in ("r", "lora_alpha", "use_rslora"):
        if theirs.get(key) != getattr(ours, key):
            return f"the champion's LoRA {key} is {theirs.get(key)}, not {getattr(ours, key)}"
    drift = _general_drift(candidate.meta.metrics)
    allowed = settings.training.continue_max_drift_share * settings.gate.max_general_nll_increase
    if drift is not None and drift > allowed:
        return (
            f"the champion's general-probe NLL is {drift * 100:+.1f}% over the base's, past "
            f"{allowed * 100:+.1f}% (training.continue_max_drift_share of the gate's bound): "
            "continuing would add to it"
        )
    refused = _refused_continuation(registry, champion)
    if refused:
        return refused
    weights = load_file(str(candidate.path / "adapter_model.safetensors"))
    fresh = get_peft_model_state_dict(model)
    if set(weights) != set(fresh):
        return "the champion's LoRA sits on other modules than this run's"
    for name, tensor in fresh.items():
        if weights[name].shape != tensor.shape:
            shapes = f"{tuple(weights[name].shape)}, not {tuple(tensor.shape)}"
            return f"the champion's {name} is {shapes}"
    set_peft_model_state_dict(model, weights)
    return ""


def _refused_continuation(registry: Registry, champion: str) -> str:
    """Why not to continue `champion` again: the newest run that continued it was refused by
    the gate for general drift. Continuing adds drift to what the champion carries (measured
    over a simulated week: +13% and then +20% over the base from a champion at -5%, two
    nights refused in a row with the week's newest facts in neither), and the next
    continuation would start from the same place; a fresh adapter on all feedback does not
    inherit it. "" when there is no such run."""
    continued = [
        c
        for c in registry.list()
        if c.meta is not None and c.meta.config.get("started_from") == champion
    ]
    if not continued:
        return ""
    newest = continued[-1]
    judged = newest.meta.metrics.get("evaluation") or {}
    if judged.get("decision") != "reject" or judged.get("rule") != "general_regression":
        return ""
    drift = _general_drift(newest.meta.metrics)
    by = f" ({drift * 100:+.1f}% over the base)" if drift is not None else ""
    return (
        f"the last run that continued the champion {champion}, {newest.id}, was refused for "
        f"general drift{by}: continuing again would start from where that drift came from"
    )


def non_finite_tensors(model: Any) -> list[str]:
    """Names of the trained adapter's LoRA tensors holding NaN or inf (none when healthy)."""
    import torch
    from peft import get_peft_model_state_dict

    weights = get_peft_model_state_dict(model, adapter_name="default")
    return [name for name, tensor in weights.items() if not torch.isfinite(tensor).all()]


def refuse_non_finite(model: Any) -> None:
    """Raise TrainingDiverged when the trained adapter holds NaN or inf."""
    broken = non_finite_tensors(model)
    if broken:
        raise TrainingDiverged(
            f"training left NaN or inf in {len(broken)} of the adapter's tensors (first: "
            f"{broken[0]}); no candidate was written: lower the profile's learning_rate"
        )


def _general_drift(metrics: dict[str, Any]) -> float | None:
    """How far an adapter's general-probe NLL rose over the base's when it was judged, or
    None when it was not (promoted by hand, or judged by an older whetstone)."""
    scored = (metrics.get("evaluation") or {}).get("metrics") or {}
    return general_drift(scored.get("candidate") or {}, scored.get("base") or {})


def _train_stage(trainer: Any, stage: Stage, curve: Any, *, chooses: bool = True) -> Any:
    """Run one TRL trainer and record its steps, time, loss curve and verdict on `stage`
    (`chooses`: whether the trainer kept its best checkpoint, else its last)."""
    from transformers import PrinterCallback

    from development.monitor import verdict

    trainer.remove_callback(PrinterCallback)  # logs reach the curve and progress instead
    started = time.monotonic()
    trainer.train()
    stage.seconds = time.monotonic() - started
    stage.steps = trainer.state.global_step
    stage.curve = curve.as_dict()
    stage.monitor = verdict(curve, kept_last=None if chooses else stage.steps)
    stage.best_step = stage.monitor.get("best_step")
    log.info(
        "%s: %d steps in %.1f s; %s",
        stage.name,
        stage.steps,
        stage.seconds,
        stage.monitor["notes"],
    )
    return trainer.model


def choose_checkpoint(settings: Settings, person_rows: int) -> bool:
    """Whether the person's held-out rows (`person_rows` of them) are enough to pick the
    checkpoint, stop early and call a run worse than its start
    (training.min_person_validation_rows); the general prompts alone never decide."""
    return person_rows >= settings.training.min_person_validation_rows


def run_sft(
    model: Any, tokenizer: Any, data: Any, stage: Stage, settings: Settings, ctx: RunContext
) -> Any:
    from datasets import Dataset
    from transformers import EarlyStoppingCallback
    from trl import SFTConfig, SFTTrainer

    from development.monitor import LossCurve, Progress, TargetLoss

    profile = settings.profile(ctx.profile)
    has_eval = bool(data.validation)
    eval_every = profile.eval_every or max(1, stage.max_steps // 5)
    # The person's held-out feedback is what the run is for: when there is some, it alone
    # picks the checkpoint and stops the run (the general prompts' loss is logged beside it).
    person_rows = data.counts.get("validation_person_rows", 0)
    general = data.validation[person_rows:]
    # Too few of the person's held-out rows to choose a checkpoint by: the held-out loss is
    # still logged, but the run trains its planned steps and the gate judges the result.
    chooses = has_eval and choose_checkpoint(settings, person_rows)
    if person_rows and general:
        eval_data: Any = {
            "person": Dataset.from_list(data.validation[:person_rows]),
            "general": Dataset.from_list(general),
        }
        key = "eval_person_loss"
    else:
        eval_data = Dataset.from_list(data.validation) if has_eval else None
        key = "eval_loss"
    args = SFTConfig(
        **_common_args(
            settings, ctx.profile, ctx.device, ctx.scratch / "sft", stage, profile.batch_size
        ),
        gradient_accumulation_steps=profile.grad_accum,
        completion_only_loss=True,
        packing=False,
        # Set either way: Unsloth turns it on by itself when left unset.
        padding_free=ctx.padding_free,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_every,
        eval_on_start=has_eval,
        save_strategy="steps" if chooses else "no",
        save_steps=eval_every,
        save_total_limit=2,
        save_only_model=True,
        load_best_model_at_end=chooses,
        metric_for_best_model=key,
        greater_is_better=False,
    )
    curve = LossCurve(key)
    callbacks: list[Any] = [curve, Progress(ctx.report, "sft", 1, len(ctx.stages), key=key)]
    if chooses:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=2))
    if chooses and profile.target_loss is not None and key == "eval_person_loss":
        callbacks.append(TargetLoss(key, profile.target_loss))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(data.sft),
        eval_dataset=eval_data,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    return _train_stage(trainer, stage, curve, chooses=chooses or not has_eval)


def run_preference(
    model: Any, tokenizer: Any, data: Any, stage: Stage, settings: Settings, ctx: RunContext
) -> Any:
    from datasets import Dataset

    from development.monitor import LossCurve, Progress

    profile = settings.profile(ctx.profile)
    common = _common_args(
        settings,
        ctx.profile,
        ctx.device,
        ctx.scratch / stage.name,
        stage,
        max(2, profile.batch_size),
    )
    common |= {"gradient_accumulation_steps": profile.grad_accum, "save_strategy": "no"}
    curve = LossCurve()
    callbacks = [curve, Progress(ctx.report, stage.name, len(ctx.stages), len(ctx.stages))]
    if stage.name == "dpo":
        from trl import DPOConfig, DPOTrainer

        # The model already carries the SFT adapter, so TRL copies it as the frozen
        # reference: DPO then moves away from the SFT policy, not from the base.
        losses = {"loss_type": ["sigmoid"]}
        if profile.dpo_sft_weight > 0:
            losses = {
                "loss_type": ["sigmoid", "sft"],
                "loss_weights": [1.0, profile.dpo_sft_weight],
            }
        trainer = DPOTrainer(
            model=model,
            args=DPOConfig(**common, beta=profile.beta, **losses),
            train_dataset=Dataset.from_list(data.dpo),
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    else:
        from trl import KTOConfig, KTOTrainer

        desirable, undesirable = data.kto_weights
        trainer = KTOTrainer(
            model=model,
            args=KTOConfig(
                **common,
                beta=profile.beta,
                desirable_weight=desirable,
                undesirable_weight=undesirable,
            ),
            train_dataset=Dataset.from_list(data.kto),
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    return _train_stage(trainer, stage, curve)


@dataclass
class RunContext:
    settings: Settings
    store: Store
    run_id: str
    profile: str
    device: str
    scratch: Path
    stages: list[Stage] = field(default_factory=list)
    padding_free: bool = False  # resolved once per run (training.padding_free)
    peaks: Any = None  # production.model.gpu_memory.StagePeaks, made when the job starts
    # What set the knobs besides the config: the adopted recipe, or the trial being run.
    recipe: dict[str, Any] | None = None
    trial: str | None = None  # "study:number" of a recipe trial
    trigger: str = "manual"  # what started the run (a catch-up starts none after it)
    # A catch-up redoes the promoted candidate's run with what its gate released: it starts
    # where that run started (the champion before it, or a fresh adapter), not from it.
    redo_of: str | None = None
    # A retry trains every stage at this times the learning rate (plan_stages).
    learning_rate_scale: float = 1.0
    verdict: dict[str, Any] | None = None  # the gate's on this run's candidate, once judged

    def mark(self, stage: str) -> None:
        if self.peaks is None:
            from production.model.gpu_memory import StagePeaks

            self.peaks = StagePeaks(self.device)
        self.peaks.mark(stage)

    def report(self, progress: dict[str, Any]) -> None:
        self.store.update_run(self.run_id, progress={**progress, "updated_at": time.time()})


def train_candidate(ctx: RunContext, *, force: bool = False) -> str | None:
    """One run, start to candidate. Returns the candidate id, or None when skipped (the run
    is recorded skipped, with why). The steps below, in the order this calls them."""
    registry = Registry(ctx.settings.paths.candidates_dir)
    start = _starting_point(ctx, registry)
    if not _enough_data(ctx, start, force=force):
        return None
    started = time.monotonic()
    backend, model, tokenizer = _load_model(ctx)
    base_answers = _answer_replay_prompts(ctx, model, tokenizer)
    items = _frozen_feedback(ctx.store)
    paraphrases = _paraphrase_corrections(ctx, model, tokenizer, items, start)
    model.config.use_cache = False
    rows = _rows_builder(ctx.settings, items, base_answers, tokenizer, paraphrases)
    model, data, not_continued = _attach_adapter(
        ctx, registry, start, backend, model, tokenizer, rows
    )
    snapshot = data.snapshot()
    ctx.store.update_run(ctx.run_id, data_snapshot=snapshot)
    if not data.sft:
        ctx.store.update_run(ctx.run_id, status="skipped", reason="no SFT rows after the split")
        return None
    _plan(ctx, data, not_continued)
    model = _train_sft(ctx, model, tokenizer, data, not_continued)
    if model is None:
        return None
    model = _train_preference(ctx, model, tokenizer, data)
    ctx.report({"stage": "saving", "step": 0, "max_steps": 0})
    meta = _candidate_meta(ctx, registry, start, backend, not_continued, snapshot, started)
    return _write_candidate(ctx, registry, meta, model)


@dataclass(frozen=True)
class StartPoint:
    """What a run builds on."""

    champion: str | None  # the adapter serving now: the new candidate's parent
    # The adapter the run continues: the champion, or where the run a catch-up redoes started.
    adapter: str | None
    snapshot: dict[str, Any] | None  # the data that adapter was trained on (its meta's)


def _starting_point(ctx: RunContext, registry: Registry) -> StartPoint:
    champion = registry.current_id()
    # What this run builds on: the champion, or where the run a catch-up redoes started.
    start = champion
    if ctx.redo_of is not None:
        redone = registry.get(ctx.redo_of).meta
        start = redone.config.get("started_from") if redone is not None else None
    start_meta = registry.get(start).meta if start is not None else None
    start_snapshot = start_meta.data if start_meta is not None else None
    return StartPoint(champion, start, start_snapshot)


def _enough_data(ctx: RunContext, start: StartPoint, *, force: bool) -> bool:
    """Whether there is enough new feedback since `start` (or the run is forced); a run
    without is recorded skipped, with why."""
    from development import training_data

    enough = training_data.sufficiency(ctx.store, ctx.settings, start.snapshot)
    if not enough.enough and not force:
        ctx.store.update_run(ctx.run_id, status="skipped", reason=enough.reason)
        log.info("skipped: %s", enough.reason)
        return False
    return True


def _load_model(ctx: RunContext) -> tuple[str, Any, Any]:
    """(backend, model, tokenizer): the base model loaded for training on the run's device."""
    from common.devices import choose_backend
    from development import modeling

    settings = ctx.settings
    # Unsloth hands back a patched transformers class, so ask the loader, not the model.
    backend = choose_backend(settings, ctx.device)
    # A setting this run cannot honour fails here, before the model loads.
    ctx.padding_free = padding_free(settings, backend)
    ctx.report({"stage": "loading", "step": 0, "max_steps": 0})
    model, tokenizer = modeling.load_base(settings, ctx.device, for_training=True)
    ctx.mark("load")
    return backend, model, tokenizer


def _answer_replay_prompts(ctx: RunContext, model: Any, tokenizer: Any) -> Any:
    """The base model's answers to the replay prompts (cached in the home's models/replay/
    after the first run)."""
    from development import modeling, training_data

    settings = ctx.settings
    reported = 0.0

    def answering(step: int, steps: int) -> None:
        # Once a second at most: each report is a write to the store.
        nonlocal reported
        if time.monotonic() - reported >= 1.0 or step == steps:
            reported = time.monotonic()
            ctx.report({"stage": "base answers", "step": step, "max_steps": steps})

    base_answers = training_data.load_base_answers(
        settings,
        lambda prompts: modeling.base_answers(model, tokenizer, settings, prompts, answering),
    )
    ctx.mark("base answers")
    return base_answers


def _frozen_feedback(store: Store) -> list[FeedbackItem]:
    """The feedback this run reads, its placements frozen first."""
    from data import exports

    # What this run reads is frozen where it is placed before anything is built from it: a
    # correction arriving in between (the TUI sends the rating first) would otherwise move
    # an answer this run trains on into the holdout. What arrives after waits for a later run.
    frozen = store.freeze_placements()
    return [item for item in exports.feedback_items(store) if item.message_id in frozen]


def _paraphrase_corrections(
    ctx: RunContext, model: Any, tokenizer: Any, items: list[FeedbackItem], start: StartPoint
) -> Any:
    """Other wordings of each new corrected question, by the base model (before any
    adapter)."""
    from development import modeling, training_data, variants

    settings = ctx.settings
    questions = training_data.corrected_questions(items, settings, start.snapshot)
    cache = variants.cache_file(settings.paths.models_dir, settings.model.base_model)
    if not settings.model.writes_paraphrases:
        return variants.paraphrases(questions, cache, None)  # what was written before, if any
    ctx.report({"stage": "paraphrasing", "step": 0, "max_steps": 0})
    harmony = settings.model.chat_format == "harmony"
    return variants.paraphrases(
        questions,
        cache,
        lambda prompts: [
            g.text
            for g in modeling.generate(
                model,
                tokenizer,
                [[{"role": "user", "content": prompt}] for prompt in prompts],
                # Harmony answers after its analysis channel: room for both.
                max_new_tokens=256 if harmony else 40,
                chat_format=settings.model.chat_format,
            )
        ],
    )


def _rows_builder(
    settings: Settings,
    items: list[FeedbackItem],
    base_answers: Any,
    tokenizer: Any,
    paraphrases: Any,
) -> Callable[..., TrainingData]:
    """rows(snapshot, loss=None): the training data from this run's feedback, split against
    `snapshot` (the data an adapter being continued was trained on; None: all of it)."""
    from development import modeling, training_data

    def count(prompt: list[dict[str, str]], answer: str) -> int:
        return modeling.token_count(tokenizer, prompt, answer)

    def rows(
        snapshot: dict[str, Any] | None,
        loss: Callable[[list[dict[str, Any]]], list[float]] | None = None,
    ) -> TrainingData:
        return training_data.build(
            items, settings, base_answers, count, snapshot, loss, paraphrases=paraphrases
        )

    return rows


def _attach_adapter(
    ctx: RunContext,
    registry: Registry,
    start: StartPoint,
    backend: str,
    model: Any,
    tokenizer: Any,
    rows: Callable[..., TrainingData],
) -> tuple[Any, TrainingData, str | None]:
    """(model, data, why not continued): the LoRA attached, continuing `start`'s adapter when
    training.start_from allows it (else fresh, and why), and the rows it trains on."""
    from transformers import set_seed

    settings = ctx.settings
    # The rows a continuation would train on, known before the champion's weights load.
    continuation = rows(start.snapshot) if start.snapshot is not None else None
    set_seed(settings.training.seed)
    model = _attach_lora(model, settings, ctx.profile, backend, ctx.device)
    has_new_rows = continuation is not None and bool(continuation.sft)
    not_continued = _continue_champion(model, settings, registry, start.adapter, has_new_rows)
    if ctx.redo_of is not None and start.adapter is None:
        not_continued = f"it redoes the run of {ctx.redo_of}, which started fresh"
    if not_continued or continuation is None:
        log.info("a fresh adapter on all feedback: %s", not_continued)
        data = rows(None)
    else:
        log.info("continuing the champion %s on new feedback and earlier replay", start.adapter)
        assert start.adapter is not None  # a continuation has the champion's adapter
        data = rows(start.snapshot, _champion_loss(model, tokenizer, settings, start.adapter))
    return model, data, not_continued


# The champion's loss on rows it was asked about, by (champion, prompt, answer), for this
# process's life. A catch-up redoes its run from the same start in the same process, so it
# scores mostly the rows the run before it scored: on a 90-day history (benchmarks.history,
# two cores) each of the night's two runs spent 80 s before its first step, most of it
# scoring ~800 earlier and replay rows with the same champion.
_champion_scores: dict[tuple[str, str, str], float] = {}


def _champion_loss(
    model: Any, tokenizer: Any, settings: Settings, champion_id: str
) -> Callable[[list[dict[str, Any]]], list[float]]:
    """The champion's loss on candidate rows (training_data.build's replay choice); rows
    this process already scored with `champion_id` are not scored again."""
    from development import modeling

    def champion_loss(candidates: list[dict[str, Any]]) -> list[float]:
        keys = [
            (champion_id, json.dumps(row["prompt"]), row["completion"][0]["content"])
            for row in candidates
        ]
        new = [i for i, key in enumerate(keys) if key not in _champion_scores]
        if new:
            # The model holds the champion's weights here (nothing trained yet).
            scores = modeling.score_answers(
                model,
                tokenizer,
                [(candidates[i]["prompt"], keys[i][2]) for i in new],
                max_length=settings.model.max_seq_length,
            )
            for i, score in zip(new, scores, strict=True):
                _champion_scores[keys[i]] = score.nll_per_token
        model.train()
        log.info("scored %d rows with the champion (%d known)", len(new), len(keys) - len(new))
        return [_champion_scores[key] for key in keys]

    return champion_loss


def _plan(ctx: RunContext, data: TrainingData, not_continued: str | None) -> None:
    """The run's stages: SFT, then DPO or KTO when the data has pairs or labels."""
    ctx.stages = plan_stages(
        data,
        ctx.settings,
        ctx.profile,
        continuing=not not_continued,
        learning_rate_scale=ctx.learning_rate_scale,
    )
    log.info("stage plan: %s", [(s.name, s.max_steps, s.why) for s in ctx.stages])


def _train_sft(
    ctx: RunContext, model: Any, tokenizer: Any, data: TrainingData, not_continued: str | None
) -> Any | None:
    """The SFT stage; None (the run recorded skipped) when every checkpoint was worse on
    the person's held-out feedback than the weights it started from."""
    settings = ctx.settings
    model = run_sft(model, tokenizer, data, ctx.stages[0], settings, ctx)
    ctx.mark("sft")
    sft = ctx.stages[0].monitor or {}
    # Judged on the person's own held-out feedback (not the general prompts alone): when
    # every checkpoint is worse than the weights it started from (the champion's, when
    # continuing), the candidate could only be a step back. A recipe trial still scores it.
    person_judged = choose_checkpoint(settings, data.counts.get("validation_person_rows", 0))
    keep = settings.training.write_worse_candidates or ctx.trial
    if sft.get("verdict") == "worse" and person_judged and not keep:
        refuse_non_finite(model)  # a diverged run is a failure to name, not a quiet skip
        began = "the base" if not_continued else "the champion"
        reason = (
            "no candidate: every checkpoint was worse on the person's held-out feedback than "
            f"{began} it started from ({sft['notes'][0]}); teach more and train again, or "
            "try a gentler profile (`whetstone train --profile full`)"
        )
        ctx.store.update_run(ctx.run_id, status="skipped", reason=reason)
        log.info("skipped: %s", reason)
        return None
    return model


def _train_preference(ctx: RunContext, model: Any, tokenizer: Any, data: TrainingData) -> Any:
    """The preference stages after SFT (DPO or KTO, if planned); the model ready to save."""
    for stage in ctx.stages[1:]:
        model = run_preference(model, tokenizer, data, stage, ctx.settings, ctx)
        ctx.mark(stage.name)
    model.eval()
    refuse_non_finite(model)
    return model


def _candidate_meta(
    ctx: RunContext,
    registry: Registry,
    start: StartPoint,
    backend: str,
    not_continued: str | None,
    snapshot: dict[str, Any],
    started: float,
) -> CandidateMeta:
    """The candidate's meta.json: its config, data snapshot, training metrics, hardware."""
    settings = ctx.settings
    profile = settings.profile(ctx.profile)
    return CandidateMeta(
        id=registry.new_id(),
        base_model=settings.model.base_model,
        parent=start.champion,
        config={
            "profile": ctx.profile,
            "profile_settings": profile.model_dump(),
            "lora": settings.lora.model_dump(),
            "training": settings.training.model_dump(exclude={"profiles"}),
            "model": settings.model.model_dump(),
            "backend": backend,
            "optimizer": _optimizer(profile.optimizer, ctx.device.startswith("cuda")),
            "padding_free": ctx.padding_free,
            "gradient_checkpointing": gradient_checkpointing(settings, ctx.device),
            "run_id": ctx.run_id,
            "trigger": ctx.trigger,
            "learning_rate_scale": ctx.learning_rate_scale,
            "recipe": ctx.recipe,
            "trial": ctx.trial,
            # The adapter this one continued (training.start_from), or why it started fresh.
            "started_from": None if not_continued else start.adapter,
            "fresh_because": not_continued or None,
        },
        data=snapshot,
        metrics={
            "training": {
                "stages": [stage.summary() for stage in ctx.stages],
                # Peak GPU memory (GiB) per stage of this job; {} on the CPU.
                "peak_gpu_gib": ctx.peaks.as_dict(),
                # Peak resident host memory of this job so far (loading and training).
                "peak_host_gib": _peak_host_gib(),
                "loss_curve": {stage.name: stage.curve for stage in ctx.stages},
                "monitor": ctx.stages[0].monitor,
            }
        },
        hardware=hardware(ctx.device),
        duration_s=round(time.monotonic() - started, 1),
    )


def _write_candidate(ctx: RunContext, registry: Registry, meta: CandidateMeta, model: Any) -> str:
    """The adapter and its meta written as a candidate folder (atomically), and recorded."""
    from production.model.gpt_oss_layout import adapter_placement

    def write_files(folder: Path) -> None:
        # Only the trained adapter: DPO adds a frozen "ref" copy that must not ship.
        model.save_pretrained(str(folder), selected_adapters=["default"])
        # meta.json is written after this: the LoRA tensors per module kind go in it.
        placement = adapter_placement(folder)
        meta.metrics["training"]["adapter_tensors"] = placement
        log.info("adapter tensors per module kind: %s", placement)

    candidate = registry.create(meta, write_files)
    ctx.store.record_candidate(
        candidate.id,
        base_model=ctx.settings.model.base_model,
        run_id=ctx.run_id,
        parent_id=meta.parent,
        metrics=meta.metrics,
    )
    log.info("candidate %s written in %.1f s", candidate.id, meta.duration_s)
    return candidate.id


def reap_scratch(settings: Settings, keep: str | None = None) -> None:
    """Checkpoint folders of runs that ended (or died) are of no further use."""
    root = settings.paths.run_dir / "train"
    if root.is_dir():
        for folder in root.iterdir():
            if folder.name != keep:
                shutil.rmtree(folder, ignore_errors=True)


def _free_training_memory(device: str) -> None:
    """The training model is unreachable once the candidate is written: free it before the
    scoring model loads."""
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_settings_arguments(parser)
    parser.add_argument("--profile", help="training profile (default training.default_profile)")
    parser.add_argument("--run-id", help="a queued run to carry out (default: a new one)")
    parser.add_argument("--trigger", default="manual", help="what started the run (for status)")
    parser.add_argument("--force", action="store_true", help="train even without new data")
    parser.add_argument("--no-evaluate", action="store_true", help="stop after training")
    parser.add_argument("--no-promote", action="store_true", help="evaluate but never promote")
    parser.add_argument(
        "--trial",
        metavar="STUDY:NUMBER",
        help="a recipe trial (orchestrator.experiments): scored on the validation split, "
        "never evaluated by the gate or promoted; the adopted recipe is not applied",
    )
    args = parser.parse_args(argv)

    from orchestrator import experiments

    settings = settings_from_args(args)
    with exit_on_config_error():
        # `auto` (the default) is recorded as the profile it stands for on this device.
        profile = settings.resolve_profile(args.profile)
        settings.profile(profile)
        recipe = None if args.trial else experiments.current_recipe(settings, profile)
    if recipe:
        # The recipe's knobs first: the run's own --set items still win.
        knobs = experiments.knob_sets(settings, profile, recipe["params"])
        settings = settings_from_args(args, extra_sets=knobs)
    settings.paths.create()
    # stderr: `whetstone train` and the daemon send it to <home>/logs/<run id>.log.
    log_to_stderr(settings)
    signal.signal(signal.SIGTERM, _raise_terminated)
    # Before torch is imported anywhere: this process sees only its GPU (or none).
    device = pin_device(settings, "development")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    store = Store(settings.db_url)
    run_id = args.run_id or store.create_run(profile, args.trigger).id
    ctx = RunContext(settings, store, run_id, profile, device, scratch_dir(settings, run_id))
    ctx.recipe, ctx.trial, ctx.trigger = recipe, args.trial, args.trigger
    try:
        with training_lock(settings):
            store.update_run(run_id, status="running", pid=os.getpid(), profile=profile)
            log_resolved(settings)
            reap_scratch(settings, keep=run_id)
            if recipe:
                log.info("recipe %s #%s: %s", recipe["study"], recipe["trial"], recipe["params"])
            promoted = carry_out(ctx, args)
            while promoted is not None:  # None: skipped, and the run says why
                follow = None if args.trial or args.no_promote else follow_up(ctx, promoted)
                store.update_run(
                    ctx.run_id,
                    status="succeeded",
                    progress={"stage": "done", **({"next_run": follow.run_id} if follow else {})},
                )
                if follow is None:
                    break
                # The same process and lock carry it out: nothing else can start in between.
                shutil.rmtree(ctx.scratch, ignore_errors=True)
                ctx = follow
                promoted = carry_out(ctx, args, force=True)
            return EXIT_OK
    except TrainingBusy as exc:
        store.update_run(ctx.run_id, status="skipped", reason=str(exc))
        log.warning("%s", exc)
        return EXIT_BUSY
    except BaseException as exc:
        log.error("training run %s failed", ctx.run_id, exc_info=True)
        error = "".join(traceback.format_exception_only(exc)).strip() or type(exc).__name__
        try:
            stopped = store.get_run(ctx.run_id) if isinstance(exc, Terminated) else None
            if stopped is not None and stopped.status == "cancelled":
                log.info("run %s cancelled: %s", ctx.run_id, stopped.reason)
            else:  # the daemon records why it stopped us before the signal
                why = stopped.reason if stopped is not None else None
                error = f"{why} ({error})" if why else error
                store.update_run(ctx.run_id, status="failed", error=error[-2000:])
        except Exception:
            log.exception("could not record the failure of %s", ctx.run_id)
        if isinstance(exc, KeyboardInterrupt):
            return 130
        return EXIT_FAILED
    finally:
        shutil.rmtree(ctx.scratch, ignore_errors=True)
        store.close()


def carry_out(ctx: RunContext, args: argparse.Namespace, *, force: bool = False) -> bool | None:
    """Train one run's candidate, then (unless the arguments say otherwise) evaluate it and
    promote it when the gate says so. True when it was promoted; None when the run was
    skipped (it recorded why)."""
    settings, store = ctx.settings, ctx.store
    # A trial searches on the data as it is: "nothing new" does not skip it.
    candidate_id = train_candidate(ctx, force=force or args.force or bool(args.trial))
    if candidate_id is None:
        return None
    store.update_run(ctx.run_id, candidate_id=candidate_id)
    if args.trial:
        from development import evaluate

        _free_training_memory(ctx.device)
        ctx.report({"stage": "scoring trial", "step": 0, "max_steps": 0})
        evaluate.score_trial(settings, store, candidate_id, ctx.device)
        return False
    if args.no_evaluate:
        return False
    from development import evaluate

    _free_training_memory(ctx.device)
    ctx.report({"stage": "evaluating", "step": 0, "max_steps": 0})

    def measuring(what: str, done: int, total: int) -> None:
        ctx.report({"stage": what, "step": done, "max_steps": total})

    result = evaluate.evaluate_candidate(
        settings, store, candidate_id, ctx.device, progress=measuring
    )
    ctx.verdict = result
    if result["decision"] != "promote" or args.no_promote:
        return False
    from orchestrator import promotion

    registry = Registry(settings.paths.candidates_dir)
    promotion.promote(settings, store, registry, candidate_id, actor="gate")
    log.info("%s", promotion.notify_worker(settings))
    return True


# The refusals a gentler run answers: the gate's next step for each is a lower learning rate
# or more replay (gate.NEXT_STEPS). A refusal on the person's own held-out items is not: the
# candidate learned too little or the wrong thing, and less learning would not help.
RETRIED_RULES = frozenset({"sanity", "general_regression", "general_facts"})


def follow_up(ctx: RunContext, promoted: bool) -> RunContext | None:
    """The run this process carries out next, if any: a catch-up after a promotion, a retry
    at a lower learning rate after a refusal the gate blames on too much learning."""
    settings = ctx.settings
    if promoted:
        run_id = catch_up_run(ctx)
        trigger, scale = CATCH_UP_TRIGGER, ctx.learning_rate_scale
    else:
        run_id = retry_run(ctx)
        trigger = RETRY_TRIGGER
        scale = ctx.learning_rate_scale * settings.training.retry_learning_rate_scale
    if run_id is None:
        return None
    follow = RunContext(
        settings, ctx.store, run_id, ctx.profile, ctx.device, scratch_dir(settings, run_id)
    )
    follow.recipe, follow.trigger, follow.learning_rate_scale = ctx.recipe, trigger, scale
    if promoted:
        follow.redo_of = Registry(settings.paths.candidates_dir).current_id()
    return follow


def retry_run(ctx: RunContext) -> str | None:
    """After a refusal by one of RETRIED_RULES: the run that trains again from the same start
    at training.retry_learning_rate_scale times the learning rate (carried out next in this
    process), or None when it is off or this run is itself a retry or a catch-up."""
    settings = ctx.settings
    scale = settings.training.retry_learning_rate_scale
    verdict = ctx.verdict or {}
    rule = verdict.get("rule")
    deciding = next((c for c in verdict.get("checks", []) if c["rule"] == rule), {})
    # Refused for want of a measurement (no general probes to score): nothing to retry.
    if scale == 0 or rule not in RETRIED_RULES or not deciding.get("measured", True):
        return None
    if ctx.trigger in (RETRY_TRIGGER, CATCH_UP_TRIGGER):
        return None
    run_id = _start_follow_run(ctx, RETRY_TRIGGER)
    log.info(
        "retry: the gate refused the candidate of %s (%s); run %s trains again at x%g the "
        "learning rate",
        ctx.run_id,
        rule,
        run_id,
        scale,
    )
    return run_id


def _start_follow_run(ctx: RunContext, trigger: str) -> str:
    """The run this process carries out next, recorded as running from the start (a queued
    run is one a dispatcher may start), with the last run's training memory freed."""
    run = ctx.store.create_run(ctx.profile, trigger)
    ctx.store.update_run(run.id, status="running", pid=os.getpid())
    _free_training_memory(ctx.device)
    return run.id


def catch_up_run(ctx: RunContext) -> str | None:
    """After a promotion: the run that redoes it with the corrections its gate just judged
    (training.catch_up; carried out next in this process), or None when there are none or
    it is off."""
    from development import training_data

    settings, store = ctx.settings, ctx.store
    if not settings.training.catch_up or ctx.trigger == CATCH_UP_TRIGGER:
        return None
    registry = Registry(settings.paths.candidates_dir)
    champion = registry.current_id()
    if champion is None:
        return None
    released = training_data.released_corrections(store, settings, registry.get(champion).meta.data)
    if not released:
        return None
    run_id = _start_follow_run(ctx, CATCH_UP_TRIGGER)
    log.info(
        "catch-up: %d correction(s) the champion of %s never trained on (those its gate "
        "just judged, and any made since); run %s redoes the run with them",
        released,
        ctx.run_id,
        run_id,
    )
    return run_id


if __name__ == "__main__":
    raise SystemExit(main())
