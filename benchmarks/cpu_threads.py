"""Two torch processes on the CPU's cores: how OpenMP's wait policy and thread count share them.

    python -m benchmarks.cpu_threads [--home H] [--model-dir DIR]

On the embedded default the API worker and a training job share the machine's (two) cores:
a person chats while a run trains, and the test suite runs two workers. torch's CPU kernels
run on OpenMP (libgomp), whose threads spin while they wait for the others of a parallel
region; a spinning thread holds a core another process needs. Each case below starts fresh
processes (the policy is read when torch loads) on the embedded SmolLM2-135M-Instruct:

- train: LoRA (r=16 on every projection, AdamW) on 4 rows of 160 tokens; seconds per step
  over 6 steps after one warm-up.
- chat: greedy decode of 96 tokens for one prompt, batch 1; tokens/s after a short warm-up.

Cases: each alone, then two at once (train + chat, train + train, chat + chat), with torch's
default threads (one per core) and libgomp's default wait policy, with OMP_WAIT_POLICY=PASSIVE,
and with one thread per process. Figures are printed as ratios to the same kind of process
alone with the defaults, measured in this call; the JSON goes to
benchmarks/results/cpu-threads-<hostname>-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("results")

POLICIES: dict[str, dict[str, str]] = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "one thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
}
PAIRS = (("train",), ("chat",), ("train", "chat"), ("train", "train"), ("chat", "chat"))
TRAIN_STEPS = 6
CHAT_TOKENS = 96


def _work(model_dir: str, kind: str) -> dict[str, Any]:
    """One process's measurement (run in a child: the wait policy is read when torch loads)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    result: dict[str, Any] = {"kind": kind, "threads": torch.get_num_threads()}
    if kind == "train":
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=1e-4)
        ids = torch.randint(100, 20_000, (4, 160))
        for step in range(TRAIN_STEPS + 1):
            if step == 1:
                began = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        result["s_per_step"] = (time.perf_counter() - began) / TRAIN_STEPS
    else:
        messages = [{"role": "user", "content": "Tell me about the ocean in detail."}]
        prompt = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        model.generate(**prompt, max_new_tokens=8, do_sample=False)
        began = time.perf_counter()
        model.generate(
            **prompt, max_new_tokens=CHAT_TOKENS, min_new_tokens=CHAT_TOKENS, do_sample=False
        )
        result["tok_s"] = CHAT_TOKENS / (time.perf_counter() - began)
    return result


def _together(model_dir: Path, kinds: tuple[str, ...], env: dict[str, str]) -> list[dict]:
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.cpu_threads", "--child", kind, str(model_dir)],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for kind in kinds
    ]
    return [json.loads(child.communicate()[0].strip().splitlines()[-1]) for child in children]


def _figure(result: dict[str, Any]) -> float:
    return result["s_per_step"] if result["kind"] == "train" else result["tok_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=None, help="whetstone home (its model)")
    parser.add_argument("--model-dir", type=Path, default=None, help="a prepared model folder")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        sys.stdout.write(json.dumps(_work(args.child[1], args.child[0])) + "\n")
        return 0
    model_dir = args.model_dir
    if model_dir is None:
        from common.home import Home
        from production.model.base_model import prepare_embedded

        model_dir = prepare_embedded(Home(args.home), show_progress=False)

    rows = []
    for policy, env in POLICIES.items():
        for kinds in PAIRS:
            results = _together(model_dir, kinds, env)
            rows.append({"policy": policy, "together": list(kinds), "results": results})
            print(
                f"{policy:>10} | {' + '.join(kinds):<13} | "
                + ", ".join(f"{r['kind']} {_figure(r):.2f}" for r in results),
                flush=True,
            )
    alone = {
        row["together"][0]: _figure(row["results"][0])
        for row in rows
        if row["policy"] == "default" and len(row["together"]) == 1
    }
    print("\nspeed against the same process alone with the defaults (higher is faster):")
    for row in rows:
        speeds = []
        for result in row["results"]:
            figure = _figure(result)
            # seconds per step: lower is faster; tokens/s: higher is faster
            ratio = alone["train"] / figure if result["kind"] == "train" else figure / alone["chat"]
            result["speed_vs_default_alone"] = round(ratio, 2)
            speeds.append(f"{result['kind']} {ratio:.2f}x")
        print(f"{row['policy']:>10} | {' + '.join(row['together']):<13} | {', '.join(speeds)}")
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"cpu-threads-{socket.gethostname()}-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "host": socket.gethostname(),
                "date": stamp,
                "cpu_count": os.cpu_count(),
                "model_dir": str(model_dir),
                "train_steps": TRAIN_STEPS,
                "chat_tokens": CHAT_TOKENS,
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"\n{out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
