"""The simulated week across seeds: how large each effect is, and how much it varies.

    python -m benchmarks.week_seeds benchmarks/results/week-vm-seed0-*.json ... [--plot OUT.png]

Reads the JSONs `python -m benchmarks.week` wrote (one per seed: the seed reorders the facts,
the chat prompts and the rating noise) and prints a Markdown table, a row per seed and a row
of mean +- standard deviation across seeds: recall on day 7, general questions lost, the taste
score on the base, on day 7 and over the week's days, words per answer, promotions, and the
growth of a cycle's wall time. `--plot` draws recall and taste by day, a line per seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.week import full_cycles


def per_seed(result: dict[str, Any]) -> dict[str, Any]:
    """One week's figures. `taste_gain_week` is the mean taste score over days 1..N minus the
    base's: a single day's adapter can swing (a day's 10 prompts move 0.1 per answer), the week's
    mean says whether ratings moved the model at all."""
    timeline = result["timeline"]
    base, days = timeline[0], timeline[1:]
    scores = [d["taste"]["score"] for d in days]
    walls = full_cycles([d["run"] for d in days if d.get("run")])
    return {
        "seed": result["seed"],
        "days": len(days),
        "recall_last_day": days[-1]["recall"]["share"],
        "knowledge_lost": base["knowledge"]["right"] - days[-1]["knowledge"]["right"],
        "taste_base": base["taste"]["score"],
        "taste_last_day": days[-1]["taste"]["score"],
        "taste_gain_last_day": round(days[-1]["taste"]["score"] - base["taste"]["score"], 2),
        "taste_gain_week": round(statistics.fmean(scores) - base["taste"]["score"], 2),
        "words_base": base["taste"]["words"],
        "words_last_day": days[-1]["taste"]["words"],
        "promotions": sum(1 for d in days if (d.get("run") or {}).get("decision") == "promote"),
        "first_cycle_s": walls[0] if walls else None,
        "last_over_first_cycle": round(walls[-1] / walls[0], 2) if len(walls) > 1 else None,
    }


def across(rows: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """Mean and sample standard deviation of each numeric figure (sd 0 for one seed)."""
    out: dict[str, tuple[float, float]] = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        if key == "seed" or any(not isinstance(v, int | float) for v in values):
            continue
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        out[key] = (statistics.fmean(values), sd)
    return out


COLUMNS = (
    ("seed", "seed"),
    ("recall_last_day", "recall, last day"),
    ("knowledge_lost", "general Qs lost"),
    ("taste_base", "taste, base"),
    ("taste_last_day", "taste, last day"),
    ("taste_gain_last_day", "gain, last day"),
    ("taste_gain_week", "gain, week mean"),
    ("words_base", "words, base"),
    ("words_last_day", "words, last day"),
    ("promotions", "promotions"),
    ("first_cycle_s", "first cycle s"),
    ("last_over_first_cycle", "last/first cycle"),
)


def table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: a row per seed, then mean +- sd across them."""
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[key]) for key, _ in COLUMNS) + " |")
    spread = across(rows)
    cells = ["mean +- sd"] + [
        f"{spread[key][0]:.2f} +- {spread[key][1]:.2f}" if key in spread else "-"
        for key, _ in COLUMNS[1:]
    ]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def plot(results: list[dict[str, Any]], out: Path) -> None:
    """Recall and taste score by day, a line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (recall, taste) = plt.subplots(1, 2, figsize=(10, 3.8))
    for result in results:
        days = [d["day"] for d in result["timeline"]]
        label = f"seed {result['seed']}"
        shares = [d["recall"]["share"] or 0 for d in result["timeline"]]
        recall.plot(days, shares, "o-", label=label)
        taste.plot(days, [d["taste"]["score"] for d in result["timeline"]], "o-", label=label)
    recall.set(title="facts recalled (unseen paraphrases)", xlabel="day", ylim=(0, 1.05))
    taste.set(title="taste score on unrated prompts (1-5)", xlabel="day", ylim=(1, 5))
    for axis in (recall, taste):
        axis.legend(loc="lower right")
    fig.suptitle("whetstone, a simulated week, across seeds")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="week JSONs, one per seed")
    parser.add_argument("--plot", type=Path, default=None, help="write the per-seed plot here")
    args = parser.parse_args(argv)
    results = []
    for path in args.results:
        try:
            result = json.loads(path.read_text())
            result["timeline"][1], result["seed"]
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            parser.error(f"{path}: not a week result with at least one day ({exc})")
        results.append(result)
    seeds = [r["seed"] for r in results]
    if len(set(seeds)) != len(seeds):
        parser.error(f"one result per seed, got seeds {seeds}")
    rows = sorted((per_seed(r) for r in results), key=lambda row: row["seed"])
    sys.stdout.write(table(rows) + "\n")
    if args.plot:
        plot(sorted(results, key=lambda r: r["seed"]), args.plot)
        sys.stdout.write(f"written {args.plot}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
