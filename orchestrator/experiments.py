"""The recipe search: Optuna trials of the training recipe on the development device's idle
time, and the recipe the nightly run then uses.

A *trial* is an ordinary training run (trigger "experiment", its own candidate and meta) of
the searched profile (experiments.profile, default schedule.nightly_profile) with four knobs
changed: learning rate, max steps, LoRA rank (alpha keeps its ratio) and the replay share.
The job scores it on the *validation* split and the general probes (development.evaluate.
score_trial), never on the holdout: the gate judges every candidate on the holdout, and a
recipe picked on it would pass the gate by construction. A trial's candidate is never
promoted (orchestrator.promotion refuses it) and retention keeps only the newest few.

The daemon asks for a trial when the development device is idle (no run running or queued,
chat idle on a shared device, not close to the nightly run), and stops it as soon as a run is
queued or the person chats on a shared device; a stopped trial is asked again later with the
same knobs. Every study starts with the current recipe as its baseline trial; the best trial
that beats it by experiments.min_improvement (and keeps the general probes within the gate's
bounds) becomes the recipe, written to <home>/recipe.json with its history.
`whetstone recipe reset` goes back to the config's profile and closes the study.

Storage: Optuna's RDB storage in <home>/experiments.db. Not in whetstone.db: Optuna and the
store both keep their Alembic revision in a table named alembic_version, so in one database
each would read the other's revision as its own and refuse (or, worse, misread) the schema.

No torch here: the daemon imports this module.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from candidates import Registry, RegistryError
from common.config import ConfigError, Settings
from common.fs import atomic_write_text
from data.store import Store
from orchestrator.schedule import EXPERIMENT_TRIGGER

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

STUDY_PREFIX = "recipe"
KNOBS = ("learning_rate", "max_steps", "lora_r", "replay_fraction")


class NoTrial(Exception):
    """Why no trial can start now (said in status)."""


def searched_profile(settings: Settings) -> str:
    return settings.resolve_profile(
        settings.experiments.profile or settings.schedule.nightly_profile
    )


def enabled(settings: Settings, development_device: str) -> bool:
    wanted = settings.experiments.enabled
    return wanted == "on" or (wanted == "auto" and development_device != "cpu")


# --- the recipe ------------------------------------------------------------------------------


def read_recipe_file(settings: Settings) -> dict[str, Any]:
    """<home>/recipe.json as written ({"current": ..., "history": [...]}); empty when absent.
    A file that does not parse raises ConfigError naming it (it is never silently replaced:
    it says which recipe the nightly run uses)."""
    path = settings.paths.recipe_file
    if not path.exists():
        return {"current": None, "history": []}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("history", []), list):
            raise ValueError("expected an object with 'current' and 'history'")
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{path} is not a recipe file: {exc}; remove it to use the config's profile"
        ) from None
    data.setdefault("history", [])
    data.setdefault("current", None)
    return data


def current_recipe(settings: Settings, profile: str | None = None) -> dict[str, Any] | None:
    """The adopted recipe if it applies to `profile` (default: the searched one) on this base
    model; None when the config's own profile values are used."""
    recipe = read_recipe_file(settings)["current"]
    if not recipe:
        return None
    if recipe.get("base_model") != settings.model.base_model:
        return None
    if recipe.get("profile") != (profile or searched_profile(settings)):
        return None
    return recipe


def _write_recipe_file(settings: Settings, data: dict[str, Any]) -> None:
    atomic_write_text(settings.paths.recipe_file, json.dumps(data, indent=1) + "\n")


def knob_sets(settings: Settings, profile: str, params: dict[str, Any]) -> list[str]:
    """The `--set KEY=VALUE` items that make a run of `profile` use `params`."""
    unknown = set(params) - set(KNOBS)
    if unknown:
        raise ConfigError(f"unknown recipe knobs {sorted(unknown)}; known: {list(KNOBS)}")
    prefix = f"training.profiles.{profile}"
    sets = []
    if "learning_rate" in params:
        sets.append(f"{prefix}.learning_rate={float(params['learning_rate'])!r}")
    if "max_steps" in params:
        sets.append(f"{prefix}.max_steps={int(params['max_steps'])}")
    if "lora_r" in params:
        rank = int(params["lora_r"])
        ratio = settings.lora.alpha / settings.lora.r
        sets += [f"{prefix}.lora_r={rank}", f"lora.alpha={max(1, round(rank * ratio))}"]
    if "replay_fraction" in params:
        sets.append(f"training.replay_fraction={float(params['replay_fraction'])!r}")
    return sets


def recipe_sets(settings: Settings, profile: str) -> list[str]:
    """What a (non-trial) run of `profile` adds before its own --set items: the adopted
    recipe's knobs, or nothing."""
    recipe = current_recipe(settings, profile)
    return knob_sets(settings, profile, recipe["params"]) if recipe else []


def config_params(settings: Settings, profile: str) -> dict[str, Any]:
    """The knobs as the config (without a recipe) sets them."""
    values = settings.profile(profile)
    return {
        "learning_rate": values.learning_rate,
        "max_steps": values.max_steps,
        "lora_r": settings.lora_rank(profile),
        "replay_fraction": settings.training.replay_fraction,
    }


def reset_recipe(settings: Settings, why: str = "reset by the person") -> dict[str, Any] | None:
    """Back to the config's profile values; the study the recipe came from is closed (no
    trial runs in it and nothing is adopted from it again). Returns the recipe dropped."""
    data = read_recipe_file(settings)
    dropped = data["current"]
    if dropped:
        data["history"].append({**dropped, "dropped_at": _now(), "dropped_because": why})
        with _storage_session(settings) as storage:
            study = _load(settings, storage, dropped.get("study"))
            if study is not None:
                study.set_user_attr("closed", why)
    data["current"] = None
    _write_recipe_file(settings, data)
    log.info("recipe reset (%s)", why)
    return dropped


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- the study -------------------------------------------------------------------------------


@contextmanager
def _storage_session(settings: Settings) -> Iterator[Any]:
    """Optuna's storage on <home>/experiments.db, disposed on exit (its engine holds the file)."""
    import optuna

    optuna.logging.disable_default_handler()  # its records go to our logging instead
    optuna.logging.enable_propagation()
    path = settings.paths.experiments_db_file
    path.parent.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{path}", engine_kwargs={"connect_args": {"timeout": 30}}
    )
    try:
        yield storage
    finally:
        storage.engine.dispose()


def _sampler(settings: Settings, finished: int) -> Any:
    import optuna

    cfg = settings.experiments
    # Constraints come from the trials themselves (Trial.set_constraint), which TPE reads.
    return optuna.samplers.TPESampler(
        # A fresh sampler is built for every ask: a fixed seed would repeat its first draw.
        seed=settings.training.seed + finished,
        n_startup_trials=max(2, cfg.max_trials // 2),
    )


def _load(settings: Settings, storage: Any, name: str | None) -> optuna.Study | None:
    import optuna

    if not name:
        return None
    try:
        finished = storage.get_n_trials(storage.get_study_id_from_name(name))
        return optuna.load_study(
            study_name=name, storage=storage, sampler=_sampler(settings, finished)
        )
    except KeyError:
        return None


def _studies(storage: Any, settings: Settings, profile: str) -> list[Any]:
    """This profile's studies on this base model, oldest first."""
    import optuna

    prefix = f"{STUDY_PREFIX}-{profile}-"
    summaries = [
        s
        for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
        if s.study_name.startswith(prefix)
        and s.user_attrs.get("base_model") == settings.model.base_model
    ]
    return sorted(summaries, key=lambda s: s.user_attrs.get("feedback_items", 0))


def distributions(settings: Settings, profile: str) -> dict[str, Any]:
    """The search space, around the config's profile values. The baseline trial may lie
    outside a float range (a recipe adopted before the config changed; Optuna warns and runs
    it), but must be among the categorical choices (Optuna refuses a value not in them)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    cfg = settings.experiments
    base = config_params(settings, profile)
    recipe = current_recipe(settings, profile)
    start = recipe["params"] if recipe else base
    lr_low, lr_high = (base["learning_rate"] * s for s in cfg.learning_rate_scale)
    steps = {max(1, round(base["max_steps"] * s)) for s in cfg.max_steps_scale}
    return {
        "learning_rate": FloatDistribution(lr_low, lr_high, log=True),
        "max_steps": CategoricalDistribution(sorted(steps | {int(start["max_steps"])})),
        "lora_r": CategoricalDistribution(sorted(set(cfg.lora_ranks) | {int(start["lora_r"])})),
        "replay_fraction": FloatDistribution(*cfg.replay_fraction),
    }


def _current_study(settings: Settings, storage: Any, store: Store) -> optuna.Study:
    """The open study, or a new one (with the current recipe as its first, baseline trial)
    when there is none or experiments.new_study_after feedback items arrived since it began.
    Raises NoTrial when the newest study is closed or used up its trials."""
    import optuna

    profile = searched_profile(settings)
    items = store.count_feedback_since(None)
    # Trials are compared on one validation split: once a gate's judgement has moved its
    # items into training (the rolling holdout), a study's trials would be scored on others.
    validation = _validation_digest(settings, store)
    summaries = _studies(storage, settings, profile)
    newest = summaries[-1] if summaries else None
    if newest is not None and newest.user_attrs.get("validation") in (None, validation):
        began_with = int(newest.user_attrs.get("feedback_items", 0))
        if items - began_with < settings.experiments.new_study_after:
            study = _load(settings, storage, newest.study_name)
            assert study is not None
            closed = study.user_attrs.get("closed")
            if closed:
                raise NoTrial(f"study {study.study_name} was closed ({closed})")
            done = _finished(study)
            if len(done) >= settings.experiments.max_trials:
                raise NoTrial(
                    f"study {study.study_name} ran its {len(done)} trials; the next starts "
                    f"after {settings.experiments.new_study_after} new feedback items"
                )
            failed = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("failed")]
            if len(failed) >= settings.experiments.max_trials:
                raise NoTrial(
                    f"study {study.study_name}: {len(failed)} trials failed (see their runs' "
                    "logs); no more until the next study"
                )
            return study
    name = f"{STUDY_PREFIX}-{profile}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    study = optuna.create_study(
        study_name=name, storage=storage, direction="minimize", sampler=_sampler(settings, 0)
    )
    study.set_user_attr("base_model", settings.model.base_model)
    study.set_user_attr("profile", profile)
    study.set_user_attr("feedback_items", items)
    study.set_user_attr("validation", validation)
    recipe = current_recipe(settings, profile)
    baseline = recipe["params"] if recipe else config_params(settings, profile)
    study.enqueue_trial(baseline, user_attrs={"baseline": True})
    log.info("recipe search: study %s over %d feedback items", name, items)
    return study


def _fits_gate(trial: Any) -> bool:
    return all(value <= 0 for value in trial.constraints.values())


def _finished(study: optuna.Study) -> list[Any]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


_validation_ids: dict[tuple[str, int, int], list[str]] = {}


def validation_ids(settings: Settings, store: Store) -> list[str]:
    """The answers the validation split holds now, sorted (cached per feedback count and
    judged count: a gate's judgement moves the split's items into training)."""
    key = (settings.db_url, store.count_feedback_since(None), store.count_judged())
    if key not in _validation_ids:
        from data.exports import feedback_items
        from data.splits import split_items

        split = split_items(
            feedback_items(store),
            settings.training.holdout_fraction,
            settings.training.validation_fraction,
        )
        _validation_ids[key] = sorted(item.message_id for item in split.validation)
    return _validation_ids[key]


def validation_items(settings: Settings, store: Store) -> int:
    """Feedback items the validation split holds now."""
    return len(validation_ids(settings, store))


def _validation_digest(settings: Settings, store: Store) -> str:
    import hashlib

    return hashlib.sha256("\n".join(validation_ids(settings, store)).encode()).hexdigest()[:16]


def start_trial(settings: Settings, store: Store) -> tuple[str, int, list[str]]:
    """Ask the study for the next trial and queue its run. Returns (run id, trial number,
    --set items); the caller starts the run's process. Raises NoTrial saying why not."""
    profile = searched_profile(settings)
    have = validation_items(settings, store)
    if have < settings.experiments.min_validation_items:
        raise NoTrial(
            f"{have} validation item(s); trials need {settings.experiments.min_validation_items} "
            "(experiments.min_validation_items)"
        )
    with _storage_session(settings) as storage:
        study = _current_study(settings, storage, store)
        trial = study.ask(distributions(settings, profile))
        run = store.create_run(profile, EXPERIMENT_TRIGGER)
        trial.set_user_attr("run_id", run.id)
        sets = knob_sets(settings, profile, trial.params)
        args = ["--trial", f"{study.study_name}:{trial.number}"]
        for item in sets:
            args += ["--set", item]
        store.update_run(run.id, progress={"stage": "queued", "args": args})
        log.info("recipe trial %s #%d: %s", study.study_name, trial.number, trial.params)
        return run.id, trial.number, args


def settle(settings: Settings, store: Store, registry: Registry) -> list[str]:
    """Tell the study how every trial whose run has ended did (from its candidate's
    meta.json); adopt a better recipe. Stateless, so a daemon restarted mid-trial settles it
    later. Returns what happened, one line each."""
    from optuna.trial import TrialState

    said: list[str] = []
    if not settings.paths.experiments_db_file.exists():
        return said
    with _storage_session(settings) as storage:
        for summary in _studies(storage, settings, searched_profile(settings)):
            study = _load(settings, storage, summary.study_name)
            assert study is not None
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            for trial in running:
                line = _settle_one(settings, store, registry, storage, study, trial)
                if line:
                    said.append(line)
            if running and not study.user_attrs.get("closed"):
                line = _adopt_best(settings, study)
                if line:
                    said.append(line)
    for line in said:
        log.info("%s", line)
    return said


def _settle_one(
    settings: Settings,
    store: Store,
    registry: Registry,
    storage: Any,
    study: optuna.Study,
    trial: Any,
) -> str | None:
    from data.errors import NotFound

    run_id = trial.user_attrs.get("run_id")
    try:
        run = store.get_run(run_id) if run_id else None
    except NotFound:
        run = None
    if run is not None and run.status in ("queued", "running"):
        return None
    where = f"{study.study_name} #{trial.number}"
    score = None
    if run is not None and run.status == "succeeded" and run.candidate_id:
        try:
            meta = registry.get(run.candidate_id).meta
        except RegistryError:  # removed by hand before it was settled: counted as failed
            meta = None
        score = (meta.metrics if meta else {}).get("trial")
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study.study_name), trial.number
    )
    if not score:
        # Stopped (chat, a queued run, the daemon stopping): asked again with the same knobs.
        # Failed by itself: not again (the knobs may be the cause), and counted.
        from optuna.trial import TrialState

        stopped = run is not None and run.status == "cancelled"
        storage.set_trial_user_attr(trial_id, "stopped" if stopped else "failed", True)
        study.tell(trial.number, state=TrialState.FAIL)
        if stopped:
            again = {k: v for k, v in trial.user_attrs.items() if k == "baseline"}
            study.enqueue_trial(trial.params, user_attrs=again)
            return f"recipe trial {where} stopped ({run.reason}); asked again later"
        why = (run.error or run.reason or run.status) if run is not None else "its run is gone"
        return f"recipe trial {where} failed: {why}"
    import optuna

    running = optuna.trial.Trial(study, trial_id)
    for name, value in score["constraints"].items():
        running.set_constraint(name, value)
    storage.set_trial_user_attr(trial_id, "candidate_id", run.candidate_id)
    storage.set_trial_user_attr(trial_id, "score", score)
    study.tell(trial.number, score["validation_nll"])
    return f"recipe trial {where}: validation NLL {score['validation_nll']:.4f}" + (
        "" if score["fits_gate"] else " (loses general knowledge: not eligible)"
    )


def _adopt_best(settings: Settings, study: optuna.Study) -> str | None:
    done = _finished(study)
    baseline = next((t for t in done if t.user_attrs.get("baseline")), None)
    feasible = [t for t in done if _fits_gate(t)]
    if baseline is None or not feasible:
        return None
    best = min(feasible, key=lambda t: t.value)
    if best.number == baseline.number or best.params == baseline.params:
        return None
    bound = baseline.value * (1 - settings.experiments.min_improvement)
    baseline_fits = baseline in feasible
    if baseline_fits and not best.value <= bound:
        return None
    data = read_recipe_file(settings)
    current = data["current"]
    if current and current.get("study") == study.study_name and current.get("trial") == best.number:
        return None
    record = {
        "profile": searched_profile(settings),
        "base_model": settings.model.base_model,
        "params": best.params,
        "study": study.study_name,
        "trial": best.number,
        "candidate_id": best.user_attrs.get("candidate_id"),
        "validation_nll": best.value,
        "baseline_validation_nll": baseline.value,
        "adopted_at": _now(),
    }
    if current:
        data["history"].append({**current, "dropped_at": _now(), "dropped_because": "replaced"})
    data["current"] = record
    _write_recipe_file(settings, data)
    gain = 1 - best.value / baseline.value if baseline.value else math.nan
    return (
        f"recipe adopted from {study.study_name} #{best.number}: {best.params} "
        f"(validation NLL {best.value:.4f} vs {baseline.value:.4f}, {gain:.1%} better)"
    )


def stop_reason(
    settings: Settings, store: Store, run_id: str, started_at: datetime, shared_device: bool
) -> str | None:
    """Why a running trial must stop now: a run is queued (the nightly, every-N, or the
    person's), or the person chatted on a device the trial shares; None to go on."""
    waiting = [r for r in store.list_runs(limit=5, status="queued") if r.id != run_id]
    if waiting:
        return f"run {waiting[-1].id} ({waiting[-1].trigger}) is queued"
    if shared_device:
        last = store.last_message_at()
        if last is not None and last >= started_at:
            return "the person is chatting on the device the trial shares"
    return None


_summaries: dict[str, tuple[tuple[int, ...], dict[str, Any]]] = {}


def summary(settings: Settings) -> dict[str, Any]:
    """The recipe and the newest study, for `whetstone status`, /v1/status and the TUI
    (cached until recipe.json or experiments.db changes: status is polled)."""
    stamps = []
    for path in (settings.paths.recipe_file, settings.paths.experiments_db_file):
        try:
            stat = path.stat()
            stamps += [stat.st_mtime_ns, stat.st_size]
        except OSError:
            stamps += [0, 0]
    key = str(settings.paths.root)
    cached = _summaries.get(key)
    if cached is not None and cached[0] == tuple(stamps):
        return cached[1]
    try:
        found = _summary(settings)
    except Exception as exc:  # a damaged experiments.db must not break status
        log.warning("recipe search summary: %s", exc)
        found = {"profile": searched_profile(settings), "error": f"{type(exc).__name__}: {exc}"}
    found["line"] = describe(found)
    _summaries[key] = (tuple(stamps), found)
    return found


def _summary(settings: Settings) -> dict[str, Any]:
    profile = searched_profile(settings)
    try:
        recipe = current_recipe(settings, profile)
    except ConfigError as exc:
        return {"profile": profile, "error": str(exc)}
    out: dict[str, Any] = {
        "profile": profile,
        "enabled": settings.experiments.enabled,
        "recipe": recipe,
        "config_params": config_params(settings, profile),
        "study": None,
    }
    if not settings.paths.experiments_db_file.exists():
        return out
    from optuna.trial import TrialState

    with _storage_session(settings) as storage:
        summaries = _studies(storage, settings, profile)
        if not summaries:
            return out
        study = _load(settings, storage, summaries[-1].study_name)
        assert study is not None
        trials = study.get_trials(deepcopy=False)
        out["study"] = {
            "name": study.study_name,
            "closed": study.user_attrs.get("closed"),
            "max_trials": settings.experiments.max_trials,
            "finished": sum(t.state == TrialState.COMPLETE for t in trials),
            "trials": [
                {
                    "number": t.number,
                    "state": t.state.name.lower(),
                    "params": t.params,
                    "validation_nll": t.value,
                    "baseline": bool(t.user_attrs.get("baseline")),
                    "fits_gate": _fits_gate(t),
                    "run_id": t.user_attrs.get("run_id"),
                }
                for t in trials
            ],
        }
    return out


def describe(found: dict[str, Any]) -> str:
    """One line on the training recipe: adopted (from which trial, how much better) or the
    config's, and where the search stands."""
    if found.get("error"):
        return f"unreadable: {found['error']}"
    recipe = found.get("recipe")
    if recipe:
        knobs = ", ".join(f"{k}={knob_text(v)}" for k, v in recipe["params"].items())
        line = (
            f"{knobs} (adopted {recipe['adopted_at']} from {recipe['study']} #{recipe['trial']}: "
            f"validation NLL {recipe['validation_nll']:.4f} vs "
            f"{recipe['baseline_validation_nll']:.4f})"
        )
    else:
        line = f"the config's {found['profile']} profile"
    study = found.get("study")
    if study:
        state = f"closed: {study['closed']}" if study["closed"] else "open"
        line += f"; search {study['finished']}/{study['max_trials']} trials ({state})"
    elif found.get("enabled") == "off":
        line += "; search off (experiments.enabled)"
    return line


def knob_text(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
