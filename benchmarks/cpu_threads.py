"""Two torch processes on the CPU's cores: how OpenMP's wait policy and thread count share them.

    python -m benchmarks.cpu_threads [--home H] [--model-dir DIR]

On the embedded default the API worker and a training job share the machine's (two) cores:
a person chats while a run trains, and the test suite runs two workers. torch's CPU kernels
run on OpenMP (libgomp), whose threads spin while they wait for the others of a parallel
region; a spinning thread holds a core another process needs. Each case below starts fresh
processes (the policy is read when torch loads) on the embedded SmolLM2-135M-Instruct:

- train: LoRA (r=16 on every projection, AdamW) on 4 rows of 160 tokens (a batch padded to a
  replayed base answer); "train short": 4 rows of 40 (a person's questions and answers only);
  seconds per step over 6 steps after one warm-up.
- chat: greedy decode of 96 tokens for one prompt, batch 1; tokens/s after a short warm-up.
- answers: the daemon's background job beside the first chats (base answers, nice 19): 16
  prompts decoded together.

Cases: training and chat alone, then two processes at once, under each policy: torch's
default threads (one per core) and libgomp's default wait policy; OMP_WAIT_POLICY=PASSIVE; one
thread per process; the defaults with training at nice 10 (`--policies` picks; the first is
the baseline). Figures are printed as ratios to the same kind of process alone under the
baseline, measured in this call; the JSON goes to
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

# (environment, niceness of a training process): a policy of the whole machine.
POLICIES: dict[str, tuple[dict[str, str], int]] = {
    "default": ({}, 0),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, 0),
    # libgomp spins 300,000 times by default before a waiting thread sleeps; these spin a
    # thirtieth and a three-hundredth of that (1,000 is what libgomp itself falls back to
    # when a process has more threads than cores).
    "short spin": ({"GOMP_SPINCOUNT": "10000"}, 0),
    "shorter spin": ({"GOMP_SPINCOUNT": "1000"}, 0),
    "one thread": ({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, 0),
    # As a GPU training job yields the CPU to the API worker (production/model/device_pin.py).
    "train nice 10": ({}, 10),
}
# Processes run at once. "answers" is the daemon's background job beside the first chats
# (development.base_answers --background: nice 19, a batch of prompts).
PAIRS = (
    ("train",),
    ("train short",),
    ("chat",),
    ("train", "chat"),
    ("train short", "chat"),
    ("train", "train"),
    ("chat", "chat"),
    ("chat", "answers"),
)
# Rows per training step and their length in tokens: a batch padded to a replayed base
# answer, and one of a person's short questions and answers only.
TRAIN_ROWS = {"train": (4, 160), "train short": (4, 40)}
TRAIN_STEPS = 6
CHAT_TOKENS = 96
ANSWER_ROWS = 16


def _work(model_dir: str, kind: str) -> dict[str, Any]:
    """One process's measurement (run in a child: the wait policy is read when torch loads)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "answers":
        os.nice(19)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    result: dict[str, Any] = {"kind": kind, "threads": torch.get_num_threads()}
    if kind in TRAIN_ROWS:
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=1e-4)
        ids = torch.randint(100, 20_000, TRAIN_ROWS[kind])
        for step in range(TRAIN_STEPS + 1):
            if step == 1:
                began = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        result["s_per_step"] = (time.perf_counter() - began) / TRAIN_STEPS
        return result
    messages = [{"role": "user", "content": "Tell me about the ocean in detail."}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    rows = ANSWER_ROWS if kind == "answers" else 1
    prompt = {key: value.repeat(rows, 1) for key, value in prompt.items()}
    model.generate(**prompt, max_new_tokens=8, do_sample=False)
    began = time.perf_counter()
    model.generate(
        **prompt, max_new_tokens=CHAT_TOKENS, min_new_tokens=CHAT_TOKENS, do_sample=False
    )
    result["tok_s"] = rows * CHAT_TOKENS / (time.perf_counter() - began)
    return result


def _together(
    model_dir: Path, kinds: tuple[str, ...], env: dict[str, str], train_nice: int
) -> list[dict]:
    def niced(kind: str) -> Any:
        return (lambda: os.nice(train_nice)) if kind in TRAIN_ROWS and train_nice else None

    children = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.cpu_threads", "--child", kind, str(model_dir)],
            env={**os.environ, **env},
            preexec_fn=niced(kind),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for kind in kinds
    ]
    return [json.loads(child.communicate()[0].strip().splitlines()[-1]) for child in children]


def _figure(result: dict[str, Any]) -> float:
    return result["s_per_step"] if result["kind"] in TRAIN_ROWS else result["tok_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=None, help="whetstone home (its model)")
    parser.add_argument("--model-dir", type=Path, default=None, help="a prepared model folder")
    parser.add_argument(
        "--policies",
        nargs="+",
        choices=list(POLICIES),
        default=list(POLICIES),
        help="the policies to measure (default all; the first is the baseline)",
    )
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
    for policy in args.policies:
        env, train_nice = POLICIES[policy]
        for kinds in PAIRS:
            results = _together(model_dir, kinds, env, train_nice)
            rows.append({"policy": policy, "together": list(kinds), "results": results})
            print(
                f"{policy:>13} | {' + '.join(kinds):<19} | "
                + ", ".join(f"{r['kind']} {_figure(r):.2f}" for r in results),
                flush=True,
            )
    alone = {
        row["together"][0]: _figure(row["results"][0])
        for row in rows
        if row["policy"] == args.policies[0] and len(row["together"]) == 1
    }
    print(f"\nspeed against the same process alone under {args.policies[0]} (higher is faster):")
    for row in rows:
        speeds = []
        for result in row["results"]:
            kind, figure = result["kind"], _figure(result)
            if kind not in alone:
                continue  # the background answers: measured, not compared
            # seconds per step: lower is faster; tokens/s: higher is faster
            ratio = alone[kind] / figure if kind in TRAIN_ROWS else figure / alone[kind]
            result["speed_vs_alone"] = round(ratio, 2)
            speeds.append(f"{kind} {ratio:.2f}x")
        print(f"{row['policy']:>13} | {' + '.join(row['together']):<19} | {', '.join(speeds)}")
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
                "train_rows": TRAIN_ROWS,
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
