"""The serving worker's GPU memory stage by stage, as the person's card would see it: the
product's Engine on a GPT-OSS checkpoint (preset gpt-oss-20b, the API worker's allocator
settings), then answers through Engine.stream with a random adapter active.

    python -m benchmarks.gpt_oss_checkpoint /tmp/ck --shape 20b --device cuda
    python benchmarks/worker_memory.py --model-dir /tmp/ck --workdir /tmp/wm --out OUT.json

Stages: the CUDA context, loading the checkpoint, stacking the experts, compile + warm-up of
the decode step, ready, the adapter, a short answer, a long answer (a prompt of up to
`--prompt-tokens`, 1,900 by default: with its 128 new tokens it nearly fills the preset's
2,048-token window), the short answer again, 2 s idle. Per stage: torch's allocated
and reserved memory (now and peak) and nvidia-smi's for this process (peak and now; the CUDA
context, kernels and cached blocks included). Answers are greedy; their hashes show whether
a change moved a token.

Run as a file (not `-m`), it imports only `production`/`common`/`benchmarks.moe_decode` from
the repository on PYTHONPATH, so the same script measures an older checkout: that is how the
figures before issue 35's fix were taken (commit 0db30d0).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # card_memory, in any checkout
from card_memory import CardMemory

GIB = 2**30
SHORT = "Write a very long story about a dragon and a knight."
LONG = "the dragon and the knight rode over seven hills to find a castle of glass"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cuda:0", help="cpu: a dry run of the script")
    parser.add_argument(
        "--prompt-tokens", type=int, default=1900, help="the long prompt's length, at most"
    )
    parser.add_argument(
        "--prefill-chunk", type=int, default=None, help="server.prefill_chunk (default: its own)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        from production.model.device_pin import use_serving_allocator
    except ImportError:  # a checkout from before the worker set its allocator
        pass
    else:
        use_serving_allocator()
    import torch

    cuda = args.device.startswith("cuda")
    card = CardMemory().__enter__()
    torch.zeros(1, device=args.device)  # the CUDA context, alone
    started = time.perf_counter()
    stages: dict[str, dict[str, Any]] = {}

    def mark(stage: str) -> None:
        row: dict[str, Any] = {"t_s": round(time.perf_counter() - started, 1)}
        if cuda:
            torch.cuda.synchronize()
            row |= {
                "allocated_gib": round(torch.cuda.memory_allocated() / GIB, 2),
                "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
                "reserved_gib": round(torch.cuda.memory_reserved() / GIB, 2),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2),
            }
            torch.cuda.reset_peak_memory_stats()
        stages[stage] = row | card.mark(stage)
        print("STAGE", json.dumps({stage: stages[stage]}), flush=True)

    mark("cuda context")
    from benchmarks.moe_decode import random_adapter
    from common.config import load_settings
    from production import engine as engine_module
    from production.decode import moe_decode
    from production.engine import Engine, Sampling

    # The Engine's own steps, wrapped to close a stage each: the module attributes it calls.
    load_model, prepare, warm_up = engine_module.load_model, moe_decode.prepare, Engine._warm_up

    def loading(*a: Any, **k: Any) -> Any:
        out = load_model(*a, **k)
        mark("load checkpoint")
        return out

    def stacking(*a: Any, **k: Any) -> Any:
        out = prepare(*a, **k)
        mark("stack experts")
        return out

    def warming(self: Any) -> None:
        mark("static decoder built")
        warm_up(self)
        mark("compile + warm-up")

    engine_module.load_model, moe_decode.prepare, Engine._warm_up = loading, stacking, warming
    home = args.workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    chunk = args.prefill_chunk
    server = "" if chunk is None else f"\n[server]\nprefill_chunk = {chunk}\n"
    (home / "config.toml").write_text(
        f'[model]\npreset = "gpt-oss-20b"\nbase_model = "{args.model_dir}"\n' + server
    )
    engine = Engine(load_settings(home), args.device)
    mark("engine ready")
    engine.load_adapter("a", random_adapter(args.workdir / "adapter-a", engine.model.config, 1))
    engine.activate("a")
    mark("adapter active")
    answers: dict[str, dict[str, Any]] = {}

    def ask(stage: str, text: str) -> None:
        prompt = engine.prompt_ids([{"role": "user", "content": text}], None)
        sampling = Sampling(max_tokens=args.new_tokens, temperature=0.0)
        began = time.perf_counter()
        out = engine.stream(prompt, sampling, lambda delta: None, lambda: False)
        decoding_s = time.perf_counter() - began - (out.ttft_s or 0)
        answers[stage] = {
            "prompt_tokens": len(prompt),
            "completion_tokens": out.completion_tokens,
            "ttft_s": round(out.ttft_s or 0, 3),
            "tok_s": round(out.completion_tokens / max(decoding_s, 1e-9), 1),
            "sha": hashlib.sha256(f"{out.reasoning}|{out.text}".encode()).hexdigest()[:16],
        }
        mark(stage)

    def words_prompt(repeats: int) -> str:
        return " ".join([LONG] * repeats)

    def tokens(repeats: int) -> int:
        return len(engine.prompt_ids([{"role": "user", "content": words_prompt(repeats)}], None))

    if args.prompt_tokens + args.new_tokens > engine.context_window:
        raise SystemExit(
            f"--prompt-tokens + --new-tokens exceed the window {engine.context_window}"
        )
    repeats = 1
    while tokens(repeats + 1) <= args.prompt_tokens:
        repeats += 1
    ask("short answer", SHORT)
    ask("long answer", words_prompt(repeats))
    ask("short answer again", SHORT)
    time.sleep(2)
    mark("idle 2 s")
    card.__exit__()
    result = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "window": engine.context_window,
        "stages": stages,
        "answers": answers,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("ANSWERS", json.dumps(answers), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
