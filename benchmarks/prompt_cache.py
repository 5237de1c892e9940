"""The kept conversation cache on the embedded model (the CPU default): a scripted chat whose
every turn pastes a few hundred tokens, answered twice per turn in one process: with the cache
the last turn left, and prefilled whole. TTFT of each, their ratio, whether the answers match.

    python -m benchmarks.prompt_cache [--home H] [--turns 8] [--turn-tokens 200] [--decode generate]

Ratios compare runs in the same process, a few seconds apart (machines are noisy). The
GPT-OSS-20B figures come from `python -m benchmarks.moe_decode --turns 10` on a GPU.
Writes benchmarks/results/prompt-cache-<host>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from pathlib import Path

from benchmarks.moe_decode import conversation

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path.home() / ".cache" / "whetstone-bench")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--turn-tokens", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--decode", default="generate", choices=["generate", "static"])
    args = parser.parse_args(argv)

    from common.config import load_settings
    from common.home import Home
    from production.engine import Engine
    from production.model.base_model import prepare_embedded

    prepare_embedded(Home(args.home), show_progress=False)
    settings = load_settings(args.home, {"server": {"decode": args.decode}})
    engine = Engine(settings, "cpu")
    result = {
        "host": socket.gethostname(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": settings.model.base_model,
        "dtype": settings.model.dtype,
        "decode": engine.decode,
        "window": engine.context_window,
        "conversation": conversation(engine, args.turns, args.turn_tokens, args.new_tokens),
    }
    rows = result["conversation"]["turns"]
    header = ("turn", "prompt", "cached", "TTFT kept", "fresh", "fresh/kept")
    print("{:>4} {:>6} {:>6} {:>9} {:>7} {:>10}".format(*header))
    for row in rows:
        ratio = row["ttft_fresh_s"] / row["ttft_kept_s"]
        print(
            f"{row['turn']:>4} {row['prompt_tokens']:>6} {row['cached_tokens']:>6} "
            f"{row['ttft_kept_s']:>9.3f} {row['ttft_fresh_s']:>7.3f} {ratio:>10.2f}"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"prompt-cache-{socket.gethostname()[:12]}-{args.decode}-{stamp}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
