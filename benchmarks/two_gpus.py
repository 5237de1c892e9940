"""Two GPUs: does `whetstone up` serve on GPU 0 and train on GPU 1, and does chat keep its
speed while a training job runs?

    python -m benchmarks.two_gpus [--requests 20] [--max-tokens 256] [--train-steps 400]
                                  [--tokenizer DIR] [--promotions 10]

A throwaway home on a random-initialised 1.07 B Llama (bf16, see gpu_suite) with 64
corrections in its store. The real daemon (`python -m orchestrator.cli up`) starts; chat is
measured through the HTTP API (streamed, greedy): TTFT and decode tokens/s, p50 over
`--requests` after one warm-up. Then a training run is requested over HTTP (POST /v1/train)
and, once its steps are counting, the placement is read from the GPUs themselves
(nvidia-smi's per-process memory on each GPU, for the worker's and the job's pids) and chat
is measured again. Last, promotion under load: while the job still trains, `--clients`
threads stream chat requests back to back and two LoRA candidates are promoted in turn
(POST /v1/candidates/ID/promote, forced: they hold no evaluation) `--promotions` times;
every request must complete (HTTP 200, no error event, a finish reason), and the adapter
that answered is counted. Writes benchmarks/results/two-gpus-<device>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from benchmarks.gpu_suite import PROMPT, SHAPE, write_results

REPO = Path(__file__).resolve().parent.parent


def _home(root: Path, model_dir: Path, port: int, steps: int) -> Path:
    from tests.scripted_person import store_corrections
    from tests.tiny_models import model_home

    home = model_home(
        root / "home",
        model_dir,
        max_seq_length=1024,
        more=f"""
[server]
port = {port}

[schedule]
every_n_feedback = 0  # the seeded corrections must not start a run before "idle" is measured

[training]
default_profile = "bench"
write_worse_candidates = true  # random weights: the held-out loss is noise

[training.profiles.bench]
max_steps = {steps}
batch_size = 8
learning_rate = 2e-4
lora_r = 16
preference_steps = 0
eval_every = {steps}
""",
    )
    pairs = [
        (
            f"Tell me about the dragon number {i}.",
            f"Dragon {i} sleeps under the castle by the river.",
        )
        for i in range(64)
    ]
    store_corrections(home, pairs, answer="No.")
    return home


def _chat_once(url: str, max_tokens: int) -> dict[str, Any]:
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    started = time.perf_counter()
    first = last = None
    tokens = 0
    finish = adapter = None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"error event: {chunk['error']}")
            now = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk.get("choices"):
                choice = chunk["choices"][0]
                if choice["delta"].get("content"):
                    first = first or now
                finish = choice.get("finish_reason") or finish
                adapter = chunk.get("adapter_id") or adapter
            last = now
    if finish is None:
        raise RuntimeError("the stream ended without a finish reason")
    first = first or last
    return {
        "ttft_s": first - started,
        "decode_tok_s": (tokens - 1) / (last - first) if last > first else float("nan"),
        "tokens": tokens,
        "adapter_id": adapter,
    }


def _chat(url: str, requests: int, max_tokens: int) -> dict[str, Any]:
    _chat_once(url, max_tokens)
    runs = [_chat_once(url, max_tokens) for _ in range(requests)]
    return {
        "ttft_s_p50": round(statistics.median(r["ttft_s"] for r in runs), 4),
        "decode_tok_s_p50": round(statistics.median(r["decode_tok_s"] for r in runs), 1),
        "tokens": [r["tokens"] for r in runs],
    }


def _promotions_under_load(
    url: str, candidates: list[str], promotions: int, clients: int, max_tokens: int
) -> dict[str, Any]:
    """Chat without pause from `clients` threads while the candidates are promoted in turn."""
    stop = threading.Event()
    done: list[dict[str, Any]] = []
    failed: list[str] = []

    def client() -> None:
        while not stop.is_set():
            try:
                done.append(_chat_once(url, max_tokens))
            except Exception as exc:  # every failure is the finding, not a crash of the bench
                failed.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    swaps = []
    for i in range(promotions):
        time.sleep(0.5)
        target = candidates[i % len(candidates)]
        started = time.perf_counter()
        reply = httpx.post(
            f"{url}/v1/candidates/{target}/promote", json={"force": True}, timeout=120
        )
        swaps.append(
            {
                "target": target,
                "status": reply.status_code,
                "s": round(time.perf_counter() - started, 3),
            }
        )
    time.sleep(1)
    stop.set()
    for thread in threads:
        thread.join(timeout=300)
    served: dict[str, int] = {}
    for row in done:
        served[str(row["adapter_id"])] = served.get(str(row["adapter_id"]), 0) + 1
    return {
        "clients": clients,
        "requests_completed": len(done),
        "requests_failed": len(failed),
        "failures": failed[:5],
        "promotions": swaps,
        "answered_by": served,
        "decode_tok_s_p50": round(statistics.median(r["decode_tok_s"] for r in done), 1)
        if done
        else None,
    }


def _placement(pids: dict[str, int | None]) -> dict[str, Any]:
    """Which GPU holds memory for each of our processes, as nvidia-smi sees it."""
    gpus = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,uuid,memory.used", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
    ).stdout
    index = {}
    used = {}
    for row in gpus.strip().splitlines():
        i, uuid, mem = (x.strip() for x in row.split(","))
        index[uuid] = int(i)
        used[int(i)] = int(mem)
    apps = subprocess.run(
        [
            "nvidia-smi",
            "--query-compute-apps=pid,gpu_uuid,used_memory",
            "--format=csv,noheader,nounits",
        ],
        capture_output=True,
        text=True,
    ).stdout
    by_pid: dict[int, list[tuple[int, int]]] = {}
    for row in apps.strip().splitlines():
        pid, uuid, mem = (x.strip() for x in row.split(","))
        by_pid.setdefault(int(pid), []).append((index.get(uuid, -1), int(mem)))
    return {
        "gpu_memory_used_mib": used,
        "processes": {
            name: {"pid": pid, "gpus_mib": by_pid.get(pid or -1, [])} for name, pid in pids.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--tokenizer", type=Path, default=None, help="e.g. SmolLM2's folder")
    parser.add_argument("--promotions", type=int, default=10)
    parser.add_argument("--clients", type=int, default=3)
    opts = parser.parse_args(argv)
    import torch

    from tests.tiny_models import tiny_llama

    if torch.cuda.device_count() < 2:
        sys.stderr.write("two_gpus needs two CUDA GPUs\n")
        return 2
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": SHAPE | {"intermediate": 8192, "dtype": "bfloat16"},
    }
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        root = Path(tmp)
        model_dir = tiny_llama(
            root / "model", intermediate=8192, tokenizer_dir=opts.tokenizer, **SHAPE
        )
        home = _home(root, model_dir, port, opts.train_steps)
        from benchmarks.serving import make_lora
        from candidates import Registry

        candidates = ["lora-a", "lora-b"]
        registry = Registry(home / "candidates")
        for seed, name in enumerate(candidates):
            make_lora(registry, name, model_dir, seed, str(model_dir))
        url = f"http://127.0.0.1:{port}"
        log = (root / "daemon.log").open("w")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "up", "--home", str(home)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((root / "daemon.log").read_text()[-4000:])
                time.sleep(1)
            status = httpx.get(f"{url}/v1/status", timeout=10).json()
            result["devices"] = (status.get("daemon") or {}).get("devices")
            worker_pid = (status.get("daemon") or {}).get("worker", {}).get("pid")
            result["idle"] = _chat(url, opts.requests, opts.max_tokens)
            result["idle_placement"] = _placement({"worker": worker_pid})

            run = httpx.post(f"{url}/v1/train", json={"force": True}, timeout=30).json()
            result["run"] = run
            deadline = time.monotonic() + 400
            while True:
                status = httpx.get(f"{url}/v1/status", timeout=10).json()
                running = status.get("running_run") or {}
                progress = running.get("progress") or {}
                ours = running.get("id") == run["run_id"]
                if ours and progress.get("stage") == "sft" and (progress.get("step") or 0) >= 5:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"training did not start: {status}")
                time.sleep(1)
            job_pid = ((status.get("daemon") or {}).get("training") or {}).get("pid")
            result["busy_placement"] = _placement({"worker": worker_pid, "training": job_pid})
            result["busy"] = _chat(url, opts.requests, opts.max_tokens)
            status = httpx.get(f"{url}/v1/status", timeout=10).json()
            progress = (status.get("running_run") or {}).get("progress") or {}
            # The busy figures count only if the job was still in SFT when they were taken.
            result["training_after"] = {k: progress.get(k) for k in ("stage", "step", "max_steps")}
            result["promotion_under_load"] = _promotions_under_load(
                url, candidates, opts.promotions, opts.clients, opts.max_tokens
            )
            status = httpx.get(f"{url}/v1/status", timeout=10).json()
            progress = (status.get("running_run") or {}).get("progress") or {}
            result["training_after_promotions"] = {
                k: progress.get(k) for k in ("stage", "step", "max_steps")
            }
            result["busy_vs_idle"] = {
                "ttft": round(result["busy"]["ttft_s_p50"] / result["idle"]["ttft_s_p50"], 3),
                "decode": round(
                    result["busy"]["decode_tok_s_p50"] / result["idle"]["decode_tok_s_p50"], 3
                ),
            }
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=120)
            except subprocess.TimeoutExpired:
                daemon.kill()
            log.close()
            result["daemon_exit"] = daemon.returncode
            result["daemon_log_tail"] = (root / "daemon.log").read_text()[-1500:]
    write_results("two-gpus", result)
    print(json.dumps({k: v for k, v in result.items() if k != "daemon_log_tail"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
