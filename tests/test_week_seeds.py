"""benchmarks.week_seeds: the week's effects across seeds, from the JSONs the week writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import week_seeds


def week(seed: int, taste: list[float], recall_last: float, walls: list[float]) -> dict:
    """A week result in the shape benchmarks.week writes (only the fields read here)."""
    timeline = []
    for day, score in enumerate(taste):
        timeline.append(
            {
                "day": day,
                "recall": {"share": recall_last if day == len(taste) - 1 else 0.5},
                "knowledge": {"right": 6 if day == 0 else 5, "of": 12},
                "taste": {"score": score, "words": 80.0 - 10 * day},
                "run": None
                if day == 0
                else {
                    "wall_s": walls[day - 1],
                    "candidate": f"c{day}",
                    "decision": "promote" if day % 2 else "reject",
                },
            }
        )
    return {"seed": seed, "host": "vm", "timeline": timeline}


def test_the_table_gives_each_seed_and_the_spread_of_the_taste_gain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = []
    for result in (
        week(1, [2.0, 3.0, 4.0], 0.9, [100, 180]),
        week(0, [2.0, 2.5, 3.0], 1.0, [100, 150]),
    ):
        path = tmp_path / f"seed{result['seed']}.json"
        path.write_text(json.dumps(result))
        paths.append(str(path))
    plot = tmp_path / "seeds.png"

    assert week_seeds.main([*paths, "--plot", str(plot)]) == 0

    lines = capsys.readouterr().out.splitlines()
    seed0, seed1, spread = lines[2], lines[3], lines[4]
    assert seed0.startswith("| 0 | 1.00 | 1 | 2.00 | 3.00 | 1.00 | 0.75 |")
    assert seed1.startswith("| 1 | 0.90 | 1 | 2.00 | 4.00 | 2.00 | 1.50 |")
    # Gains on the last day of 1.0 and 2.0: mean 1.5, sample sd 0.71; cycles 1.5x and 1.8x.
    assert "| 1.50 +- 0.71 |" in spread
    assert spread.endswith("| 1.65 +- 0.21 |")
    assert plot.stat().st_size > 0


def test_two_results_of_one_seed_are_refused_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(week(3, [2.0, 3.0], 1.0, [100])))
        paths.append(str(path))
    broken = tmp_path / "broken.json"
    broken.write_text('{"seed": 4}')

    with pytest.raises(SystemExit):
        week_seeds.main(paths)
    assert "one result per seed, got seeds [3, 3]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        week_seeds.main([str(broken)])
    assert f"{broken}: not a week result" in capsys.readouterr().err
