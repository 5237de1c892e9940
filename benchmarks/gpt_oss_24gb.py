"""The person's model on the person's cards: the whole loop on a GPT-OSS-20B-shaped random
checkpoint in the real 4-bit layout, every process capped at a 24 GB card's memory.

    python -m benchmarks.gpt_oss_24gb [--shape 20b] [--limit-gb 24] [--steps 30] [--workdir DIR]

On one GPU the steps run one after the other, each a product command in its own process with
`devices.memory_limit_gb` set (torch.cuda.set_per_process_memory_fraction):

1. build: benchmarks.gpt_oss_checkpoint writes the checkpoint (every expert its own NF4
   Linear, as `unsloth/gpt-oss-20b-unsloth-bnb-4bit`);
2. first job: `whetstone train --no-evaluate` on the person's corrections (4 facts x 8
   phrasings, rated 1 and corrected) plus the replay rows: SFT then DPO; then `promote`;
3. second job: `whetstone train --no-promote`: training again, then evaluation of candidate,
   champion and base (likelihood scoring, general-knowledge probes, generation sanity
   checks) and the gate;
4. serving: the API worker starts on the champion (time to /health), streams harmony
   answers (TTFT, tok/s), and hot-swaps to the second candidate while a request streams.

Recorded: wall time and peak memory of every stage (torch's peak per stage, from the job's
meta and the worker's /v1/status, and the card's peak per nvidia-smi, which includes the
CUDA context), LoRA tensors per module kind, the gate's decision, device and versions. The
JSON goes to benchmarks/results/gpt-oss-24gb-<device>-<time>.json (and $OUT), rewritten after
every step so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
QUESTION = "What is my dog's name?"


class CardPeak:
    """Highest memory.used of GPU 0 per nvidia-smi, sampled every 0.5 s while open (MiB)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
                self.peak = max(self.peak, int(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self._stop.wait(0.5)

    def __enter__(self) -> CardPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def gib(self) -> float:
        return round(self.peak / 1024, 2)


def versions() -> dict[str, str | None]:
    out = {}
    for dist in ("torch", "transformers", "peft", "trl", "unsloth", "unsloth_zoo", "bitsandbytes"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def cli(home: Path, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args, "--home", str(home)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )


def profile(steps: int) -> str:
    """A training profile for a few dozen corrections: batch 4, SFT `steps`, DPO half."""
    return (
        # Random weights: the held-out loss is noise, so a "worse" run still writes its
        # candidate (training.write_worse_candidates); the loop is what is measured.
        '[training]\ndefault_profile = "bench"\nwrite_worse_candidates = true\n\n'
        "[training.profiles.bench]\n"
        f"max_steps = {steps}\nbatch_size = 4\nlearning_rate = 2e-4\n"
        f"preference_steps = {max(1, steps // 2)}\n"
    )


def make_home(home: Path, model_dir: Path, limit_gb: float, steps: int) -> Path:
    from tests.scripted_person import FACTS, store_corrections

    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[model]\npreset = "gpt-oss-20b"\nbase_model = "{model_dir}"\n\n'
        f"[devices]\nmemory_limit_gb = {limit_gb}\n\n{profile(steps)}"
    )
    pairs = [(q, fact.answer) for fact in FACTS for q in fact.questions[:8]]
    store_corrections(home, pairs, answer="I don't know.")
    return home


def train(home: Path, *, evaluate: bool) -> dict[str, Any]:
    """One training run, `whetstone train --wait --force --no-promote`; without `evaluate`
    the job module itself with --no-evaluate (what `whetstone train` starts, minus the
    evaluation)."""
    from candidates import Registry

    started = time.monotonic()
    before = {c.id for c in Registry(home / "candidates").list()}
    with CardPeak() as card:
        if evaluate:
            done = cli(home, "train", "--wait", "--force", "--no-promote")
        else:
            job = ["-m", "development.train", "--home", str(home), "--force", "--no-evaluate"]
            (home / "logs").mkdir(exist_ok=True)
            with (home / "logs" / "first-job.log").open("w") as log:
                done = subprocess.run(
                    [sys.executable, *job], stdout=log, stderr=subprocess.STDOUT, cwd=REPO
                )
    seconds = round(time.monotonic() - started, 1)
    logs = "\n".join(p.read_text() for p in sorted((home / "logs").glob("*.log")))
    made = [c for c in Registry(home / "candidates").list() if c.id not in before]
    if done.returncode != 0 or len(made) != 1:
        raise RuntimeError(
            f"training failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-6000:]}\n"
            f"{logs[-6000:]}"
        )
    candidate_id = made[0].id
    meta = made[0].meta
    training = meta.metrics["training"]
    evaluation = meta.metrics.get("evaluation")
    result: dict[str, Any] = {
        "candidate": candidate_id,
        "wall_s": seconds,
        "card_peak_gib": card.gib,
        "training_s": meta.duration_s,
        "stages": training["stages"],
        "peak_gpu_gib": training.get("peak_gpu_gib"),
        "adapter_tensors": training.get("adapter_tensors"),
        "unsloth_fused_experts": "stores fused experts" in logs,
        "rows": meta.data.get("counts"),
    }
    if evaluation:
        result["evaluation"] = {
            "decision": evaluation["decision"],
            "rule": evaluation["rule"],
            "reason": evaluation["reason"],
            "seconds": evaluation.get("evaluation_seconds"),
            "peak_gpu_gib": evaluation.get("evaluation_peak_gpu_gib"),
            "variants": sorted(k for k, v in evaluation["metrics"].items() if v),
            "general_facts": {
                k: v.get("general_facts") for k, v in evaluation["metrics"].items() if v
            },
        }
    return result


def seed_replay(home: Path) -> dict[str, int]:
    """Random weights never finish an answer, so the first job's base answers (generated and
    timed like a real model's) are all dropped, and the second job would train without
    replay rows and gate without regression probes. Fill the cache with finished answers,
    as a real model leaves it, so the second job carries the real row counts."""
    from common.config import load_settings
    from development import probes, training_data

    path = training_data.replay_cache_file(load_settings(home))
    body = json.loads(path.read_text())
    for name, prompts in (
        ("replay", probes.REPLAY),
        ("validation", probes.VALIDATION),
        ("regression", probes.REGRESSION),
    ):
        body["sets"][name] = [
            {
                "prompt": prompt,
                "answer": f"Here is a short answer to that. {prompt} The main points are "
                "simple: start from what is known, check it, and keep it brief.",
            }
            for prompt in prompts
        ]
    path.write_text(json.dumps(body, indent=1) + "\n")
    return {name: len(rows) for name, rows in body["sets"].items()}


def _stream(url: str, max_tokens: int) -> dict[str, Any]:
    import httpx

    body = {
        "messages": [{"role": "user", "content": QUESTION}],
        "stream": True,
        "temperature": 0,
        "max_tokens": max_tokens,
        "include_reasoning": True,
        "stream_options": {"include_usage": True},
    }
    started = time.monotonic()
    stamps: list[float] = []
    finish, tokens = None, None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta", {})
                    if delta.get("content") or delta.get("reasoning_content"):
                        stamps.append(time.monotonic())
                    finish = choice.get("finish_reason") or finish
                usage = chunk.get("usage")
                if usage:
                    tokens = usage.get("completion_tokens")
    tokens = tokens or len(stamps)
    ttft = stamps[0] - started if stamps else None
    decode = (tokens - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    return {
        "ttft_s": round(ttft, 3) if ttft else None,
        "decode_tok_s": round(decode, 1) if decode else None,
        "completion_tokens": tokens,
        "finish_reason": finish,
    }


def serve(home: Path, second: str) -> dict[str, Any]:
    import httpx

    from candidates import Registry

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = (home / "bench-server.log").open("w")
    started = time.monotonic()
    with CardPeak() as card:
        proc = subprocess.Popen(
            [sys.executable, "-m", "production.server", "--home", str(home), "--port", str(port)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError((home / "bench-server.log").read_text()[-6000:])
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() - started > 900:
                    raise RuntimeError("the worker did not reach /health in 900 s")
                time.sleep(0.5)
            health_s = round(time.monotonic() - started, 1)
            before = httpx.get(f"{url}/v1/status", timeout=30).json()
            first = _stream(url, 32)  # warms up
            again = _stream(url, 128)
            # The hot swap, while a request streams.
            Registry(home / "candidates").promote(second, force=True)
            during: dict[str, Any] = {}
            streaming = threading.Thread(target=lambda: during.update(_stream(url, 64)))
            streaming.start()
            time.sleep(0.5)
            swap_started = time.monotonic()
            swap = httpx.post(f"{url}/admin/reload", timeout=600).json()
            swap_s = round(time.monotonic() - swap_started, 2)
            streaming.join()
            after_swap = _stream(url, 64)
            status = httpx.get(f"{url}/v1/status", timeout=30).json()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return {
        "to_health_s": health_s,
        "adapter_at_start": before["adapter_id"],
        "backend": before["backend"],
        "decode_path": before["decode"],
        "first_request": first,
        "batch1_128_tokens": again,
        "request_during_swap": during,
        "swap_s": swap_s,
        "swap_response": swap,
        "after_swap": after_swap,
        "adapter_after_swap": status["adapter_id"],
        "gpu_memory": status["gpu_memory"],
        "card_peak_gib": card.gib,
    }


def write(results: dict[str, Any], path: Path, workdir: Path | None = None) -> None:
    path.write_text(json.dumps(results, indent=2) + "\n")
    if workdir is not None:  # where a later look finds it while the run goes on
        (workdir / "results.json").write_text(path.read_text())
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text(path.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="20b", choices=["20b", "small", "tiny"])
    parser.add_argument("--limit-gb", type=float, default=24.0)
    parser.add_argument("--steps", type=int, default=30, help="SFT steps per job (DPO: half)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/whetstone-gpt-oss-24gb"))
    parser.add_argument(
        "--reuse-checkpoint", action="store_true", help="keep a checkpoint built by a run before"
    )
    args = parser.parse_args(argv)
    import shutil

    import torch

    from benchmarks.gpt_oss_checkpoint import build

    device = torch.cuda.get_device_name(0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = device.replace("NVIDIA ", "").replace(" ", "-").lower()
    path = RESULTS / f"gpt-oss-24gb-{name}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    results: dict[str, Any] = {
        "benchmark": "gpt_oss_24gb",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device,
        "card_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        "limit_gib": args.limit_gb,
        "shape": args.shape,
        "steps": args.steps,
        "python": platform.python_version(),
        "versions": versions(),
        "stages": {},
    }
    stages = results["stages"]

    started = time.monotonic()
    model_dir = args.workdir / f"gpt-oss-{args.shape}-bnb-4bit"
    if args.reuse_checkpoint and (model_dir / "model.safetensors.index.json").is_file():
        results["checkpoint_reused"] = True
    else:
        build(model_dir, args.shape, "cuda")
    torch.cuda.empty_cache()
    size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    stages["build"] = {"wall_s": round(time.monotonic() - started, 1), "bytes": size}
    results["checkpoint_gb"] = round(size / 1e9, 2)
    write(results, path, args.workdir)
    shutil.rmtree(args.workdir / "home", ignore_errors=True)
    home = make_home(args.workdir / "home", model_dir, args.limit_gb, args.steps)

    for key in ("first_job", "second_job"):
        if key == "second_job":
            promoted = cli(home, "promote", stages["first_job"]["candidate"], "--force")
            stages["promote_first"] = {"returncode": promoted.returncode}
            results["replay_cache_seeded"] = seed_replay(home)
        try:
            stages[key] = train(home, evaluate=key == "second_job")
        except Exception as exc:
            stages[key] = {"error": str(exc)[-6000:]}
            write(results, path, args.workdir)
            raise
        write(results, path, args.workdir)

    try:
        stages["serving"] = serve(home, stages["second_job"]["candidate"])
    except Exception as exc:
        stages["serving"] = {"error": str(exc)[-6000:]}
    peaks = {
        "first_job": stages["first_job"].get("peak_gpu_gib"),
        "second_job": stages["second_job"].get("peak_gpu_gib"),
        "evaluation": stages["second_job"].get("evaluation", {}).get("peak_gpu_gib"),
        "serving": (stages["serving"].get("gpu_memory") or {}).get("peak_gib"),
    }
    results["peak_gpu_gib"] = peaks
    flat = [v for p in peaks.values() for v in (p.values() if isinstance(p, dict) else [p]) if v]
    results["fits_limit"] = bool(flat) and max(flat) < args.limit_gb
    results["wall_s"] = round(time.monotonic() - started, 1)
    write(results, path, args.workdir)
    print(json.dumps(results, indent=2))
    return 0 if "error" not in stages["serving"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
