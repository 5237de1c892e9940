"""The gate: may this candidate replace the champion? A pure function of the metrics.

In the spirit of TFX's model blessing, every rule is checked and reported; the decision is
"promote" only when all pass, and the first failing rule (in the order below) is named as
the one that decided. Thresholds come from `[gate]` in the config.

    holdout_size        enough of the person's held-out feedback to show a win; with fewer
                        (gate.few_held_out = "no_regression", the default) the candidate
                        is judged on regressing nothing instead
    holdout_win         lower NLL on the person's held-out targets than the champion by the
                        margin, and no worse preference accuracy on held-out pairs; with too
                        few items, reported only
    right_answers       held-out corrections preferred over the person's other corrections
                        about as often as the champion does (not just their style)
    general_regression  NLL on general probes (the base's own answers) within the bound
    general_facts       no more general-knowledge probes lost than allowed
    sanity              generated answers are non-empty, clean, not degenerate, and fewer
                        than half of them (or no more than the champion's) run past the
                        length bound; an answer is excused where the champion's to the
                        same prompt broke too
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from common.config import Gate

Metrics = dict[str, Any]
# How evaluate.sanity_problem names an answer cut at the length bound.
UNFINISHED = "did not finish within"


@dataclass(frozen=True)
class Check:
    rule: str
    passed: bool
    detail: str
    # False where the rule failed for want of a measurement, not on one: a retry at a lower
    # learning rate (development.train.retry_run) cannot change that.
    measured: bool = True


# What the person can do after a refusal, by the rule that refused ({id}: the candidate).
NEXT_STEPS = {
    "holdout_size": "keep rating and correcting answers: the gate needs more held-out feedback "
    '(or set gate.few_held_out = "no_regression")',
    "holdout_win": "keep teaching and train again (`whetstone train`); to serve this one "
    "anyway: `whetstone promote {id} --force`",
    "right_answers": "its answers went to the wrong questions: correct a few more answers, then "
    "`whetstone train`; `whetstone report {id}` shows the examples",
    "general_regression": "it lost general knowledge: train again with more replay "
    "(`whetstone train --set training.replay_fraction=0.5`) or a gentler profile "
    "(`--profile full`); `whetstone report {id}` shows what changed",
    "general_facts": "it forgot general facts: train again with more replay "
    "(`whetstone train --set training.replay_fraction=0.5`); `whetstone report {id}` lists them",
    "sanity": "its answers broke (`whetstone report {id}` shows them): train again with a lower "
    "learning rate or more replay",
}


def next_step(rule: str, candidate_id: str) -> str | None:
    """What to do after the gate refused by `rule` (None when it promoted)."""
    step = NEXT_STEPS.get(rule)
    return None if step is None else step.format(id=candidate_id)


@dataclass(frozen=True)
class Verdict:
    decision: str  # promote | reject
    rule: str  # the deciding rule: the first failing one, or "all_passed"
    reason: str
    checks: list[Check]

    def as_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "rule": self.rule,
            "reason": self.reason,
            "checks": [asdict(check) for check in self.checks],
        }


def _pct(value: float) -> str:
    return f"{value * 100:+.1f}%"


def general_drift(candidate: Metrics, base: Metrics) -> float | None:
    """How far the candidate's general-probe NLL rose over the base's (+0.05 = 5% higher),
    or None when either was not scored."""
    mine, theirs = candidate.get("general_nll"), base.get("general_nll")
    if not isinstance(mine, int | float) or not isinstance(theirs, int | float) or theirs <= 0:
        return None
    return (mine - theirs) / theirs


_QUOTED_PROMPT = re.compile(r"""^('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"): """)


def _prompt_of(failure: str) -> str:
    """The prompt a sanity failure names (evaluate writes "<repr of the prompt>: <problem>")."""
    quoted = _QUOTED_PROMPT.match(failure)
    return quoted.group(1) if quoted else failure


def decide(candidate: Metrics, champion: Metrics, base: Metrics, gate: Gate) -> Verdict:
    """Judge `candidate` against `champion` (the base model's metrics when no adapter is
    current) and `base`. Metric keys are those evaluate.py writes."""
    checks: list[Check] = []

    items = candidate.get("holdout_items") or 0
    few = items < gate.min_holdout_items
    no_regression = few and gate.few_held_out == "no_regression"
    size = (
        f"{items} held-out feedback item(s) with a target; {gate.min_holdout_items} needed to "
        "show a win (gate.min_holdout_items)"
    )
    if no_regression:
        size += "; fewer: promoted if nothing regresses (gate.few_held_out)"
    checks.append(Check("holdout_size", not few or no_regression, size))

    cand_nll, champ_nll = candidate.get("holdout_nll"), champion.get("holdout_nll")
    if no_regression:
        # Too few items to show a win (the first days, a night with little new feedback),
        # and too few to show a loss: a newcomer's first night held out one correction and
        # one liked answer the base itself had written, whose NLL any training raises (+5.8%
        # there). The general rules below judge instead, and after a promotion the person's
        # ratings do (the watch rolls back an adapter rated worse).
        if cand_nll is None or champ_nll is None or champ_nll <= 0:
            detail = "no held-out targets to compare on"
        else:
            rise = (cand_nll - champ_nll) / champ_nll
            detail = (
                f"held-out target NLL {cand_nll:.4f} vs champion {champ_nll:.4f} "
                f"({_pct(rise)}); too few items to judge by, reported only"
            )
        checks.append(Check("holdout_win", True, detail))
    elif cand_nll is None or champ_nll is None or champ_nll <= 0:
        checks.append(Check("holdout_win", False, "no held-out targets to compare on"))
    else:
        gain = (champ_nll - cand_nll) / champ_nll
        won = gain >= gate.min_win_margin
        detail = (
            f"held-out target NLL {cand_nll:.4f} vs champion {champ_nll:.4f}: "
            f"{gain * 100:.1f}% better, {gate.min_win_margin * 100:.1f}% needed "
            "(gate.min_win_margin)"
        )
        cand_acc, champ_acc = (
            candidate.get("preference_accuracy"),
            champion.get("preference_accuracy"),
        )
        if won and cand_acc is not None and champ_acc is not None and cand_acc < champ_acc:
            won = False
            detail += (
                f"; but held-out preference accuracy fell to {cand_acc:.0%} "
                f"from the champion's {champ_acc:.0%}"
            )
        checks.append(Check("holdout_win", won, detail))

    cand_right, champ_right = (
        candidate.get("correction_accuracy"),
        champion.get("correction_accuracy"),
    )
    if cand_right is not None and champ_right is not None:
        checks.append(
            Check(
                "right_answers",
                cand_right >= champ_right - gate.max_right_answers_drop,
                f"{candidate.get('correction_contrasts')} held-out corrections preferred "
                f"over the person's other corrections in {cand_right:.0%} of pairs vs the "
                f"champion's {champ_right:.0%}; at most {gate.max_right_answers_drop:.0%} "
                "lower allowed "
                "(gate.max_right_answers_drop): answers must stay with their questions",
            )
        )

    drift = general_drift(candidate, base)
    if drift is None:
        checks.append(
            Check("general_regression", False, "no general probes were scored", measured=False)
        )
    else:
        cand_gen, base_gen = candidate["general_nll"], base["general_nll"]
        checks.append(
            Check(
                "general_regression",
                drift <= gate.max_general_nll_increase,
                f"general-probe NLL {cand_gen:.4f} vs base {base_gen:.4f} ({_pct(drift)}); "
                f"bound {_pct(gate.max_general_nll_increase)} (gate.max_general_nll_increase)",
            )
        )

    cand_facts, base_facts = candidate.get("general_facts"), base.get("general_facts")
    total = candidate.get("general_facts_total")
    if cand_facts is None or base_facts is None:
        checks.append(
            Check("general_facts", False, "general-knowledge probes were not run", measured=False)
        )
    else:
        lost = base_facts - cand_facts
        checks.append(
            Check(
                "general_facts",
                lost <= gate.max_general_facts_lost,
                f"{cand_facts}/{total} general-knowledge probes right vs the base's "
                f"{base_facts}/{total}; {gate.max_general_facts_lost} may be lost "
                "(gate.max_general_facts_lost)",
            )
        )

    failures = candidate.get("sanity_failures") or []
    checked = candidate.get("sanity_checked") or 0
    # Running past the length bound is excused as often as the reference did on the same
    # prompts: the champion's answers, or the base's where no adapter is current (the base's
    # are not generated when a champion is). A prompt that invites an essay gets one from
    # either, and which of two long answers ends inside the bound is a coin toss; a candidate
    # that runs long more often than its reference, or brings any other defect, is refused.
    #
    # Any answer that broke where the reference's answer to the same prompt broke too is
    # excused as well: the candidate did not bring that defect. A 135 M model decoding
    # greedily loops on some prompts, and a small change of weights moves which ones: in the
    # week taught once (seed 0, 2026-12-06) four of seven nights were refused for one or two
    # broken answers among three (one a loop on a held-out question about a fact not yet
    # taught), and without the champion's answers to the same prompts no one could tell a
    # regression from a prompt that breaks this model anyway.
    reference = champion if champion.get("sanity_checked") else base
    reference_failures = reference.get("sanity_failures") or []
    broke_there_too = {_prompt_of(f) for f in reference_failures}
    same = [f for f in failures if _prompt_of(f) in broke_there_too]
    failures = [f for f in failures if f not in same]
    reference_long = sum(
        1
        for f in reference_failures
        if UNFINISHED in f and _prompt_of(f) not in {_prompt_of(x) for x in same}
    )
    # An adapter that lost the end of an answer runs past the bound on most prompts; one long
    # answer among a few is a prompt that invites an essay (the same week's night 5 was
    # refused for "What is a prime number?" alone). Fewer than half of the answers checked
    # may run long, or as many as the reference's did.
    long_allowed = max(reference_long, (checked - 1) // 2)
    excused = [f for f in failures if UNFINISHED in f][:long_allowed]
    failures = [f for f in failures if f not in excused]
    if gate.require_sanity:
        detail = f"{checked - len(failures)}/{checked} generated answers passed"
        # evaluate passes the base's metrics as the champion's when none is current.
        whose = "base" if reference is base or champion is base else "champion"
        if same:
            detail += f" ({len(same)} excused: the {whose}'s answers to them broke too)"
        if excused:
            detail += (
                f" ({len(excused)} unfinished excused: the {whose}'s answers ran long "
                f"{reference_long} time(s); fewer than half may)"
            )
        if failures:
            detail += ": " + "; ".join(failures[:3])
        checks.append(Check("sanity", checked > 0 and not failures, detail))

    failed = next((check for check in checks if not check.passed), None)
    if failed is None:
        return Verdict("promote", "all_passed", "every gate rule passed", checks)
    return Verdict("reject", failed.rule, failed.detail, checks)
