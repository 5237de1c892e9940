"""How long the API worker takes from launch to /health, and to its first answer, cold (the
home's compile cache empty) and warm (started again on the same home: torch.compile's and
Triton's artifacts kept in <home>/cache/compile), on a local model folder.

    python -m benchmarks.gpt_oss_checkpoint /tmp/ck --shape 20b --device cuda
    python -m benchmarks.worker_start --model-dir /tmp/ck [--starts 2] [--out OUT.json]

Each start is a real `python -m production.server` (benchmarks.serving.Server) under the
gpt-oss-20b preset; the worker's own log lines give where the time went (model loaded, decode
step ready).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.serving import RESULTS_DIR, Server

STAGES = {
    "engine_loaded_s": re.compile(r"loaded .* on \S+ in ([\d.]+) s"),
    "decode_step_ready_s": re.compile(r"decode step ready in ([\d.]+) s"),
}


def folder_mib(folder: Path) -> float:
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []
    return round(sum(p.stat().st_size for p in files) / 2**20, 1)


def one_start(home: Path, number: int) -> dict[str, Any]:
    server = Server(home, f"start-{number}.log")
    try:
        launched = time.perf_counter()
        server.wait_ready(timeout=900)
        health_s = time.perf_counter() - launched
        asked = time.perf_counter()
        answer = server.client.post(
            "/v1/chat/completions",
            json={
                "model": "whetstone",
                "messages": [{"role": "user", "content": "Say hello."}],
                "max_tokens": 16,
                "temperature": 0,
            },
        )
        answer.raise_for_status()
        first_answer_s = time.perf_counter() - asked
        log = server.output(tail=200_000)
    finally:
        server.stop()
    row: dict[str, Any] = {
        "start": number,
        "to_health_s": round(health_s, 1),
        "first_answer_s": round(first_answer_s, 2),
        "compile_cache_mib": folder_mib(home / "cache" / "compile"),
    }
    for name, pattern in STAGES.items():
        found = pattern.findall(log)
        row[name] = float(found[-1]) if found else None
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--starts", type=int, default=2, help="the first is cold")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--preset", default="gpt-oss-20b", help="custom: a CPU dry run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="whetstone-start-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        (home / "config.toml").write_text(
            f'[model]\npreset = "{args.preset}"\nbase_model = "{args.model_dir}"\n'
            + ("min_vram_gb = 0.1\n" if args.preset == "custom" else "")
        )
        shutil.rmtree(home / "cache", ignore_errors=True)
        rows = []
        for number in range(1, args.starts + 1):
            rows.append(one_start(home, number))
            print(json.dumps(rows[-1]), flush=True)
    result = {"model_dir": str(args.model_dir), "starts": rows}
    if len(rows) > 1:
        result["warm_of_cold"] = round(rows[-1]["to_health_s"] / rows[0]["to_health_s"], 2)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or RESULTS_DIR / f"worker-start-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
