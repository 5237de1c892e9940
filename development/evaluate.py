"""Score a candidate, the current champion and the base model on the same data, run the
gate, and write the report.

    python -m development.evaluate --home ~/.whetstone --candidate cand-...

All three are scored in one process on one copy of the base weights: the adapters are
loaded side by side and switched (the base is the model with adapters disabled).

    holdout_nll            per-token NLL of the person's held-out targets (corrections, and
                           answers rated 4-5): how much closer the model is to what they want
    correction_nll         the same, corrections only
    correction_accuracy    how often a held-out correction is likelier (per token) than each
                           other correction in the holdout, given the same prompt: right
                           answer to the right question, not just the right style
    preference_accuracy    held-out pairs where log p(chosen) > log p(rejected)
    preference_margin      mean log p(chosen) - log p(rejected) over those pairs
    rating_separation      mean per-token log p of 4-5 rated answers minus 1-2 rated ones
    general_nll            per-token NLL of the base's own answers to general probes: drift
    general_facts          general-knowledge multiple-choice probes whose right answer is the
                           likeliest option (of general_facts_total)
    sanity_*               generated answers to held-out prompts: non-empty, no template
                           tokens, not degenerate, finished within the length bound (the
                           base's only when there is no champion: nothing else shows them)
    ms_per_token           generation time per token (batched, same batches for each model)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from candidates import Registry, update_meta
from common.config import Settings
from common.entrypoint import add_settings_arguments, log_to_stderr, settings_from_args
from common.fs import atomic_write_text
from data import exports
from data.errors import NotFound
from data.exports import FeedbackItem
from data.splits import split_items
from data.store import Store
from production.model.device_pin import pin_device

from . import probes, training_data
from .gate import UNFINISHED, decide, general_drift, next_step

log = logging.getLogger("development.evaluate")

SANITY_MAX_NEW_TOKENS = 192
# Other held-out corrections each held-out correction is contrasted with (right_answers).
CONTRASTS = 8
EXAMPLES_SHOWN = 5
# Answers generated for the gate's sanity rule at least (held-out prompts, then general ones).
MIN_SANITY_PROMPTS = 3
# The report's "what you taught": the newest corrections the candidate trained on and its
# champion never had, each asked again of both (a short answer says whether it took).
TAUGHT_SHOWN = 6
TAUGHT_MAX_NEW_TOKENS = 48
# The metrics measure_general makes: the same for the same weights and general_probes_key.
GENERAL_METRICS = ("general_nll", "general_facts_missed", "general_facts_total", "general_facts")
# Chat-template tokens that must never reach the person's screen.
TEMPLATE_ARTIFACTS = re.compile(
    r"<\|(im_start|im_end|start|end|message|channel|return|call|endoftext)\|>"
)

METRIC_INFO: dict[str, dict[str, Any]] = {
    "holdout_nll": {"label": "Held-out target NLL (per token)", "better": "lower"},
    "correction_nll": {"label": "Held-out correction NLL (per token)", "better": "lower"},
    "correction_accuracy": {
        "label": "Held-out corrections preferred over the person's others (pairwise)",
        "better": "higher",
        "percent": True,
    },
    "preference_accuracy": {
        "label": "Held-out preference accuracy",
        "better": "higher",
        "percent": True,
    },
    "preference_margin": {"label": "Held-out preference margin (nats)", "better": "higher"},
    "rating_separation": {"label": "Good minus bad answers (log p/token)", "better": "higher"},
    "general_nll": {"label": "General-probe NLL (per token)", "better": "lower"},
    "general_facts": {"label": "General-knowledge probes right", "better": "higher"},
    "sanity_pass_rate": {"label": "Sanity checks passed", "better": "higher", "percent": True},
    "ms_per_token": {"label": "Generation ms per token", "better": "lower"},
}


def degenerate(text: str) -> str | None:
    """Why an answer looks degenerate (a loop), or None. Measured on words: a 4-word phrase
    taking up more than half the answer, or one line repeated 3+ times."""
    words = text.split()
    if len(words) >= 12:
        grams = Counter(tuple(words[i : i + 4]) for i in range(len(words) - 3))
        phrase, seen = grams.most_common(1)[0]
        if seen * 4 > len(words) / 2 and seen >= 3:
            return f"repeats {' '.join(phrase)!r} {seen} times"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines:
        line, seen = Counter(lines).most_common(1)[0]
        if seen >= 3 and len(lines) >= 3:
            return f"repeats the line {line[:40]!r} {seen} times"
    return None


def sanity_problem(text: str, finished: bool) -> str | None:
    if not text.strip():
        return "empty answer"
    artifact = TEMPLATE_ARTIFACTS.search(text)
    if artifact:
        return f"template token {artifact.group(0)} in the answer"
    loop = degenerate(text)
    if loop:
        return loop
    if not finished:
        return f"{UNFINISHED} {SANITY_MAX_NEW_TOKENS} tokens"
    return None


def _mean_nll(scores: Sequence[Any]) -> float | None:
    tokens = sum(s.tokens for s in scores)
    return None if tokens == 0 else -sum(s.logprob for s in scores) / tokens


def _last_user(item: FeedbackItem) -> str:
    return next(turn["content"] for turn in reversed(item.context) if turn["role"] == "user")


def says_it(answer: str, correction: str, question: str) -> bool:
    """Whether `answer` says what `correction` says: at least half of the correction's topic
    words that the question does not already hold ("Pixel" of "Your cat is called Pixel."
    asked as "What is my cat's name?")."""
    from development.variants import key_words

    wanted = key_words(correction) - key_words(question) or key_words(correction)
    if not wanted:
        return False
    said = key_words(answer)
    return 2 * len(wanted & said) >= len(wanted)


def _correction_accuracy(
    model: Any, tokenizer: Any, holdout: list[FeedbackItem], max_length: int
) -> tuple[float | None, int]:
    """How often a held-out correction is likelier (per token) than each *other* correction
    the person wrote in the holdout, given the same prompt: the mean pairwise win rate. NLL
    alone is blind to a model that learned the person's answer style but attaches the wrong
    answers to the questions (it scores a shuffled-target adapter as a big win); this
    contrast is not. Pairwise, not "beats every other": a person words a fact differently
    from day to day, and another wording of the same answer is a coin flip that, under
    "beats every other", failed the whole item (a simulated week, benchmarks.week, was
    refused with every fact learned). Returns (win rate, items contrasted); (None, 0) with
    fewer than 2 distinct texts."""
    from development.modeling import score_answers

    corrected = [item for item in holdout if item.correction]
    texts = sorted({item.correction for item in corrected})
    if len(texts) < 2:
        return None, 0
    # Each item against at most CONTRASTS others, drawn by its id: the same draws for base,
    # champion and candidate. Against all of them the cost grew with the square of the
    # holdout: 11 of a candidate's 27 s of measuring on a simulated week's day 7.
    contrasts = []
    for item in corrected:
        others = [text for text in texts if text != item.correction]
        random.Random(item.message_id).shuffle(others)
        contrasts.append([item.correction, *others[:CONTRASTS]])
    pairs = [
        (item.context, text) for item, row in zip(corrected, contrasts, strict=True) for text in row
    ]
    scores = iter(score_answers(model, tokenizer, pairs, max_length=max_length))
    wins = 0.0
    for row in contrasts:
        own, *others = [-next(scores).nll_per_token for _ in row]
        wins += sum(own > other for other in others) / len(others)
    return wins / len(corrected), len(corrected)


def knowledge_misses(model: Any, tokenizer: Any, max_length: int) -> list[str]:
    """The general-knowledge probes whose answer sentence with the right option is not the
    model's likeliest (total log p), as "question (picked: X)"."""
    from development.modeling import score_answers

    pairs = []
    for question, sentence, right, wrong in probes.FACT_PROBES:
        prompt = [{"role": "user", "content": question}]
        pairs += [(prompt, sentence.format(option)) for option in (right, *wrong)]
    scores = iter(score_answers(model, tokenizer, pairs, max_length=max_length))
    missed = []
    for question, _, right, wrong in probes.FACT_PROBES:
        options = (right, *wrong)
        picked = max((next(scores).logprob, option) for option in options)[1]
        if picked != right:
            missed.append(f"{question} (picked: {picked})")
    return missed


def general_probes_key(settings: Settings, regression: list[dict[str, str]], device: str) -> str:
    """What the general-probe metrics depend on besides the adapter's weights: the base
    model and how it is loaded, the probes, and the kind of device (CPU float32 and 4-bit
    CUDA scores differ). The same key and weights give the same metrics."""
    key = json.dumps(
        {
            "model": settings.model.model_dump(mode="json"),
            "regression": regression,
            "facts": probes.FACT_PROBES,
            "device": device.split(":")[0],
        },
        sort_keys=True,
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def measure_general(
    model: Any, tokenizer: Any, settings: Settings, regression: list[dict[str, str]]
) -> dict[str, Any]:
    """The general-probe metrics (GENERAL_METRICS): nothing of the person's feedback goes
    into them, so they change only with the weights."""
    from development.modeling import score_answers

    max_length = settings.model.max_seq_length
    general = score_answers(
        model,
        tokenizer,
        [([{"role": "user", "content": p["prompt"]}], p["answer"]) for p in regression],
        max_length=max_length,
    )
    missed = knowledge_misses(model, tokenizer, max_length)
    total = len(probes.FACT_PROBES)
    return {
        "general_nll": _mean_nll(general),
        "general_facts_missed": missed,
        "general_facts_total": total,
        "general_facts": total - len(missed),
    }


def base_general_file(settings: Settings, key: str) -> Path:
    return settings.paths.models_dir / "replay" / f"base-general-{key}.json"


def known_general(
    settings: Settings, registry: Registry, champion_id: str | None, key: str
) -> dict[str, dict[str, Any]]:
    """The general-probe metrics already measured under `key`: the base's (kept in the home
    by an earlier evaluation) and the champion's (from its own evaluation as a candidate).
    On a simulated week's night 7 (embedded model, 2 cores) measuring them again was 9 of the
    20 s each of the two took to measure. A file that does not read back is measured again."""
    known: dict[str, dict[str, Any]] = {}
    path = base_general_file(settings, key)
    try:
        if path.is_file():
            known["base"] = _general_metrics(json.loads(path.read_text()), key)
    except ValueError as exc:
        log.warning("base general-probe metrics %s are unreadable (%s); measuring", path, exc)
    if champion_id is not None:
        judged = registry.get(champion_id).meta.metrics.get("evaluation") or {}
        known["champion"] = _general_metrics((judged.get("metrics") or {}).get("candidate"), key)
    return {name: metrics for name, metrics in known.items() if metrics}


def _general_metrics(metrics: Any, key: str) -> dict[str, Any]:
    """GENERAL_METRICS of `metrics` when they were measured under `key`, else {}."""
    if not isinstance(metrics, dict) or metrics.get("general_probes_key") != key:
        return {}
    if not all(k in metrics for k in GENERAL_METRICS):
        return {}
    return {k: metrics[k] for k in (*GENERAL_METRICS, "general_probes_key")}


class Variant:
    """One of base / champion / candidate on the shared model: switches adapters on entry."""

    def __init__(self, model: Any, adapter: str | None) -> None:
        self.model, self.adapter = model, adapter
        self._disabled: Any = None

    def __enter__(self) -> Any:
        if self.adapter is None:
            if hasattr(self.model, "disable_adapter"):
                self._disabled = self.model.disable_adapter()
                self._disabled.__enter__()
        else:
            self.model.set_adapter(self.adapter)
        return self.model

    def __exit__(self, *exc: object) -> None:
        if self._disabled is not None:
            self._disabled.__exit__(None, None, None)
            self._disabled = None


def measure(
    model: Any,
    tokenizer: Any,
    settings: Settings,
    holdout: list[FeedbackItem],
    regression: list[dict[str, str]],
    sanity_prompts: list[list[dict[str, str]]],
    general: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """Every metric for the model as it is now (adapter chosen by the caller), and its
    answers to sanity_prompts. `general`: its general-probe metrics (GENERAL_METRICS) when
    they are known already, else they are measured."""
    from development.modeling import generate, score_answers

    max_length = settings.model.max_seq_length
    fmt = settings.model.chat_format
    metrics: dict[str, Any] = {}

    targets = [(item, training_data.sft_target(item)) for item in holdout]
    targets = [(item, target) for item, target in targets if target is not None]
    scores = score_answers(
        model,
        tokenizer,
        [(item.context, target) for item, target in targets],
        max_length=max_length,
    )
    metrics["holdout_items"] = len(targets)
    metrics["holdout_nll"] = _mean_nll(scores)
    metrics["correction_nll"] = _mean_nll(
        [s for (item, _), s in zip(targets, scores, strict=True) if item.correction is not None]
    )
    metrics["correction_accuracy"], metrics["correction_contrasts"] = _correction_accuracy(
        model, tokenizer, holdout, max_length
    )

    holdout_ids = {item.message_id for item in holdout}
    pairs = [row for row, ids in exports.dpo_rows_with_ids(holdout) if set(ids) <= holdout_ids]
    if pairs:
        chosen = score_answers(
            model,
            tokenizer,
            [(row["prompt"], row["chosen"][0]["content"]) for row in pairs],
            max_length=max_length,
        )
        rejected = score_answers(
            model,
            tokenizer,
            [(row["prompt"], row["rejected"][0]["content"]) for row in pairs],
            max_length=max_length,
        )
        margins = [c.logprob - r.logprob for c, r in zip(chosen, rejected, strict=True)]
        metrics["preference_pairs"] = len(pairs)
        metrics["preference_accuracy"] = sum(m > 0 for m in margins) / len(margins)
        metrics["preference_margin"] = sum(margins) / len(margins)
    else:
        metrics["preference_pairs"] = 0
        metrics["preference_accuracy"] = metrics["preference_margin"] = None

    rated = [i for i in holdout if i.rating is not None and i.rating != 3 and i.complete]
    good = [i for i in rated if i.rating >= 4]
    bad = [i for i in rated if i.rating <= 2]
    if good and bad:
        good_s = score_answers(
            model, tokenizer, [(i.context, i.answer) for i in good], max_length=max_length
        )
        bad_s = score_answers(
            model, tokenizer, [(i.context, i.answer) for i in bad], max_length=max_length
        )
        metrics["rating_separation"] = -_mean_nll(good_s) + _mean_nll(bad_s)
    else:
        metrics["rating_separation"] = None

    metrics |= general or measure_general(model, tokenizer, settings, regression)
    sanity_count = len(sanity_prompts)
    sanity = generate(
        model, tokenizer, sanity_prompts, max_new_tokens=SANITY_MAX_NEW_TOKENS, chat_format=fmt
    )

    failures = []
    for prompt, g in zip(sanity_prompts, sanity, strict=True):
        problem = sanity_problem(g.text, g.finished)
        if problem:
            failures.append(f"{prompt[-1]['content'][:50]!r}: {problem}")
    metrics["sanity_checked"] = sanity_count
    metrics["sanity_failures"] = failures
    metrics["sanity_pass_rate"] = (sanity_count - len(failures)) / sanity_count if sanity else None
    total_tokens = sum(g.tokens for g in sanity)
    seconds = sum(g.seconds for g in sanity)
    metrics["ms_per_token"] = 1000 * seconds / total_tokens if total_tokens else None
    return metrics, [g.text for g in sanity]


def evaluate_candidate(
    settings: Settings,
    store: Store,
    candidate_id: str,
    device: str,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Evaluate, decide, record (store + meta.json) and render the report. Returns the
    report dict (decision, rule, metrics, ...). `progress(what, done, total)` is told as each
    model is measured (minutes on a CPU: a bar at 100% said nothing meanwhile)."""
    from peft import PeftModel

    from development import modeling, report

    started = time.monotonic()
    registry = Registry(settings.paths.candidates_dir)
    meta = registry.validate(candidate_id, base_model=settings.model.base_model)
    champion_id = registry.current_id()
    if champion_id == candidate_id:
        champion_id = registry.previous_id()
    folder = registry.path(candidate_id)

    items = exports.feedback_items(store)
    split = split_items(
        items, settings.training.holdout_fraction, settings.training.validation_fraction
    )
    holdout = split.holdout
    base_answers = training_data.load_base_answers(settings, None)
    regression = base_answers.get("regression", [])
    champion_meta = registry.get(champion_id).meta if champion_id is not None else None
    taught = training_data.taught_in(
        items, meta.data, champion_meta.data if champion_meta is not None else None
    )
    taught = sorted(taught, key=lambda i: i.created_at)[-TAUGHT_SHOWN:]
    examples_from = sorted(holdout, key=lambda i: (i.correction is None, i.message_id))
    example_items = examples_from[:EXAMPLES_SHOWN]
    sanity_items = examples_from[:8]
    sanity_prompts = [item.context for item in sanity_items]
    # The rolling holdout leaves a night few held-out items, or none: the answers checked
    # for sanity are filled up with general prompts, or an empty holdout refuses every
    # candidate as if its answers broke.
    sanity_prompts += [
        [{"role": "user", "content": pair["prompt"]}]
        for pair in regression[: max(0, MIN_SANITY_PROMPTS - len(sanity_prompts))]
    ]

    from production.model.gpu_memory import StagePeaks

    peaks = StagePeaks(device)
    model, tokenizer = modeling.load_base(settings, device, for_training=False)
    model = PeftModel.from_pretrained(model, str(folder), adapter_name="candidate")
    if champion_id is not None:
        registry.validate(champion_id, base_model=settings.model.base_model)
        model.load_adapter(str(registry.path(champion_id)), adapter_name="champion")
    peaks.mark("load")

    key = general_probes_key(settings, regression, device)
    known = known_general(settings, registry, champion_id, key)
    results: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[str]] = {}
    measured = [("base", None), ("champion", "champion"), ("candidate", "candidate")]
    if champion_id is None:
        measured.remove(("champion", "champion"))
    # What the candidate is compared with on what was taught: the adapter serving now.
    reference = "base" if champion_id is None else "champion"
    taught_answers: dict[str, list[str]] = {}
    notes_checked: dict[str, int] = {}
    for done, (name, adapter) in enumerate(measured):
        if progress is not None:
            progress(f"evaluating: measuring the {name}", done, len(measured))
        # The base's generated answers are shown only when there is no champion to compare
        # with; otherwise generating them (the longest of the three) is time thrown away.
        generated = [] if name == "base" and champion_id is not None else sanity_prompts
        with Variant(model, adapter) as active:
            log.info("measuring %s%s", name, " (general probes known)" if name in known else "")
            results[name], answers[name] = measure(
                active, tokenizer, settings, holdout, regression, generated, known.get(name)
            )
            if name == "candidate":
                notes_checked = check_notes(
                    active, tokenizer, settings, store, candidate_id, champion_id
                )
            if taught and name in (reference, "candidate"):
                taught_answers[name] = [
                    g.text
                    for g in modeling.generate(
                        active,
                        tokenizer,
                        [item.context for item in taught],
                        max_new_tokens=TAUGHT_MAX_NEW_TOKENS,
                        chat_format=settings.model.chat_format,
                    )
                ]
        results[name]["general_probes_key"] = key
        peaks.mark(name)
    if "base" not in known:
        _keep_base_general(settings, results["base"], key)
    champion_metrics = results.get("champion", results["base"])
    verdict = decide(results["candidate"], champion_metrics, results["base"], settings.gate)
    log.info("decision %s (%s): %s", verdict.decision, verdict.rule, verdict.reason)

    champion_answers = answers.get("champion", answers["base"])
    examples = [
        {
            "prompt": _last_user(item),
            "champion": champion_answers[i],
            "candidate": answers["candidate"][i],
            "correction": item.correction,
        }
        for i, item in enumerate(example_items)
    ]
    taught_rows = [
        {
            "question": _last_user(item),
            "correction": item.correction,
            **{
                who: {
                    "answer": taught_answers[who][i],
                    "says_it": says_it(taught_answers[who][i], item.correction, _last_user(item)),
                }
                for who in ("candidate", reference)
            },
        }
        for i, item in enumerate(taught)
        if item.correction is not None
    ]
    training = meta.metrics.get("training", {})
    data_counts = dict(meta.data.get("counts", {}))
    report_dict: dict[str, Any] = {
        "candidate_id": candidate_id,
        "champion_id": champion_id,
        "base_model": settings.model.base_model,
        "created_at": datetime.now(UTC).isoformat(),
        **verdict.as_dict(),
        "next_step": next_step(verdict.rule, candidate_id),
        "metrics": {
            "candidate": results["candidate"],
            "champion": results.get("champion"),
            "base": results["base"],
        },
        "metric_info": METRIC_INFO,
        "data": {
            "counts": data_counts,
            "first_feedback_at": meta.data.get("first_feedback_at"),
            "last_feedback_at": meta.data.get("last_feedback_at"),
            "evaluated_on": {"holdout_items": len(holdout), "regression_probes": len(regression)},
        },
        "examples": examples,
        "taught": taught_rows,
        "training": {
            "profile": meta.config.get("profile"),
            "config": meta.config,
            "duration_s": meta.duration_s,
            "hardware": meta.hardware,
            "stages": training.get("stages", []),
            "loss_curve": training.get("loss_curve", {}),
            "monitor": training.get("monitor", {}),
        },
        "evaluation_seconds": round(time.monotonic() - started, 1),
        "evaluation_peak_gpu_gib": peaks.as_dict(),
        "memory_notes": notes_checked,
    }
    _md, html_path = report.render(report_dict, folder)
    evaluation = {
        key: report_dict[key]
        for key in (
            "champion_id",
            "decision",
            "rule",
            "reason",
            "next_step",
            "checks",
            "metrics",
            "created_at",
            "evaluation_seconds",
            "evaluation_peak_gpu_gib",
            "memory_notes",
        )
    }
    update_meta(
        folder,
        metrics={**meta.metrics, "evaluation": evaluation},
        status="passed" if verdict.decision == "promote" else "rejected",
    )
    store.record_evaluation(
        candidate_id,
        decision=verdict.decision,
        rule=verdict.rule,
        metrics={
            "reason": verdict.reason,
            "next_step": report_dict["next_step"],
            "checks": report_dict["checks"],
            **{name: values for name, values in report_dict["metrics"].items() if values},
        },
        champion_id=champion_id,
        report_path=str(html_path),
        # The rolling holdout (data/splits.py): what this gate judged on, and what the
        # candidate's run held out for its early stopping, are trained on from now on.
        judged_message_ids=[item.message_id for item in holdout]
        + list(meta.data.get("message_ids", {}).get("validation", [])),
    )
    try:
        store.update_candidate(
            candidate_id, status="passed" if verdict.decision == "promote" else "rejected"
        )
    except NotFound:  # a candidate copied in by hand has no store record; meta.json has it
        log.info("candidate %s has no store record", candidate_id)
    log.info("evaluated %s in %.1f s", candidate_id, report_dict["evaluation_seconds"])
    return report_dict


def check_notes(
    model: Any,
    tokenizer: Any,
    settings: Settings,
    store: Store,
    candidate_id: str,
    champion_id: str | None,
) -> dict[str, int]:
    """While the memory is on: ask `model` (the candidate, no notes in its prompt) the
    questions of up to memory.check_max notes and record which it answers right
    (Store.record_note_checks); once it serves, those are learned and no longer given to the
    model (issue 37). Returns {"checked": n, "answered_right": m}."""
    from development import modeling

    if not settings.memory.enabled or settings.memory.check_max == 0:
        return {}
    notes = store.notes_to_check(champion_id, settings.memory.check_max)
    if not notes:
        return {"checked": 0, "answered_right": 0}
    answers = modeling.generate(
        model,
        tokenizer,
        [[{"role": "user", "content": note.question}] for note in notes],
        max_new_tokens=TAUGHT_MAX_NEW_TOKENS,
        chat_format=settings.model.chat_format,
    )
    verdicts = {
        note.id: says_it(answer.text, note.text, note.question or "")
        for note, answer in zip(notes, answers, strict=True)
    }
    store.record_note_checks(candidate_id, verdicts)
    log.info(
        "memory: %d of %d notes answered right without them", sum(verdicts.values()), len(notes)
    )
    return {"checked": len(notes), "answered_right": sum(verdicts.values())}


def _keep_base_general(settings: Settings, metrics: dict[str, Any], key: str) -> None:
    path = base_general_file(settings, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {k: metrics[k] for k in (*GENERAL_METRICS, "general_probes_key")}
    atomic_write_text(path, json.dumps(body, indent=1, ensure_ascii=False) + "\n")


def score_trial(settings: Settings, store: Store, candidate_id: str, device: str) -> dict[str, Any]:
    """A recipe trial's score (orchestrator.experiments): the candidate and the base measured
    on the *validation* split (the holdout stays the gate's alone) and the general probes.
    Written to the candidate's meta.json as metrics.trial; the candidate's status becomes
    "trial" (never promoted). Returns the score."""
    from peft import PeftModel

    from development import modeling

    started = time.monotonic()
    registry = Registry(settings.paths.candidates_dir)
    meta = registry.validate(candidate_id, base_model=settings.model.base_model)
    split = split_items(
        exports.feedback_items(store),
        settings.training.holdout_fraction,
        settings.training.validation_fraction,
    )
    regression = training_data.load_base_answers(settings, None).get("regression", [])
    model, tokenizer = modeling.load_base(settings, device, for_training=False)
    model = PeftModel.from_pretrained(model, str(registry.path(candidate_id)), adapter_name="trial")
    key = general_probes_key(settings, regression, device)
    known = known_general(settings, registry, None, key)
    measured = {}
    for name, adapter in (("base", None), ("candidate", "trial")):
        with Variant(model, adapter) as active:
            measured[name], _ = measure(
                active, tokenizer, settings, split.validation, regression, [], known.get(name)
            )
        measured[name]["general_probes_key"] = key
    if "base" not in known:
        _keep_base_general(settings, measured["base"], key)
    base, cand = measured["base"], measured["candidate"]
    if cand["holdout_nll"] is None:
        raise ValueError("the validation split has no corrections or well-rated answers to score")
    gate = settings.gate
    lost = len(set(cand["general_facts_missed"]) - set(base["general_facts_missed"]))
    # <= 0 each: within the gate's bounds (Optuna's constraint convention).
    constraints = {"general_facts_lost": float(lost - gate.max_general_facts_lost)}
    # None: no general answers to measure (the base model finished none of them).
    drift = general_drift(cand, base)
    if drift is not None:
        constraints["general_nll_drift"] = drift - gate.max_general_nll_increase
    if base["correction_accuracy"] is not None and cand["correction_accuracy"] is not None:
        drop = base["correction_accuracy"] - cand["correction_accuracy"]
        constraints["right_answers_drop"] = drop - gate.max_right_answers_drop
    score = {
        "validation_items": len(split.validation),
        # The measure() names say holdout; here they were measured on the validation split.
        "validation_nll": cand["holdout_nll"],
        "base_validation_nll": base["holdout_nll"],
        "correction_accuracy": cand["correction_accuracy"],
        "general_nll_drift": drift,
        "general_facts_lost": lost,
        "constraints": constraints,
        "fits_gate": all(c <= 0 for c in constraints.values()),
        "seconds": round(time.monotonic() - started, 1),
    }
    update_meta(
        registry.path(candidate_id), metrics={**meta.metrics, "trial": score}, status="trial"
    )
    try:
        store.update_candidate(candidate_id, status="trial")
    except NotFound:
        log.info("candidate %s has no store record", candidate_id)
    log.info("trial score of %s: %s", candidate_id, score)
    return score


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_settings_arguments(parser)
    parser.add_argument("--candidate", required=True, help="candidate id to evaluate")
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    log_to_stderr(settings)
    device = pin_device(settings, "development")
    from candidates import RegistryError

    store = Store(settings.db_url)
    try:
        result = evaluate_candidate(settings, store, args.candidate, device)
    except (RegistryError, FileNotFoundError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    finally:
        store.close()
    sys.stdout.write(f"{result['decision']} ({result['rule']}): {result['reason']}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
