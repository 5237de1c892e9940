"""What the OpenAI parameters that act on the logits cost per generated token, against the same
engine's plain greedy decode in the same process.

    python -m benchmarks.constrained [--home ~/.cache/whetstone-bench] [--new-tokens 64]
    python -m benchmarks.constrained --gpt-oss 20b [--limit-gb 24]     # on a CUDA machine

- CPU (default): the embedded SmolLM2-135M (49k vocabulary, the hermes tool format) on the
  transformers generate() path, the default there.
- `--gpt-oss 20b`: the person's model shape, 4-bit, on the static CUDA-graph decoder with the
  expert kernels (production.decode.moe_decode), the default for it on CUDA. Its random weights
  come with the tests' small harmony tokenizer (2k tokens; the real one has 200k), so the
  grammar's per-token host work is the small-vocabulary figure; `mask_fill_ms` below is
  measured on a synthetic 200k vocabulary to say what the real tokenizer adds.

Cases, each an ordinary request through `Engine.stream` (best of `--repeats`, round robin):
plain greedy; logprobs with top 5 (the static decoder then reads each token back before the
next step); presence + frequency penalties and a logit bias; a JSON schema (a free string
field, so the answer runs to max_tokens); a required tool call.
Per-token time excludes the first token (prefill). Prints each case as a ratio to plain.

Writes benchmarks/results/constrained-<device>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
STORY = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "story": {"type": "string"}},
    "required": ["title", "story"],
    "additionalProperties": False,
}
TOOL = {
    "type": "function",
    "function": {
        "name": "write_story",
        "description": "Save a story",
        "parameters": STORY,
    },
}
PROMPT = "Write a very long story about a dragon and a knight, as JSON."


def cases(engine: Any, new_tokens: int) -> dict[str, Any]:
    from production.decode import answer_grammar
    from production.decode.steering import SteeringSpec
    from production.engine import Sampling

    shape = engine.format.answer_shape
    json_grammar = answer_grammar.json_answer(shape, STORY, True, new_tokens // 2)
    tools = answer_grammar.tool_calls(shape, [TOOL], "required", False, new_tokens // 2)
    greedy = {"temperature": 0, "max_tokens": new_tokens}
    return {
        "plain": Sampling(**greedy),
        "logprobs_top5": Sampling(**greedy, steering=SteeringSpec(logprobs=5)),
        "penalties_and_bias": Sampling(
            **greedy,
            steering=SteeringSpec(
                presence_penalty=0.5, frequency_penalty=0.5, logit_bias=((300, -5.0), (301, 5.0))
            ),
        ),
        "json_schema": Sampling(**greedy, steering=SteeringSpec(grammar=json_grammar)),
        "tool_required": Sampling(**greedy, steering=SteeringSpec(grammar=tools), tools=True),
    }


def measure(engine: Any, prompt: list[int], sampling: Any) -> dict[str, Any] | None:
    """One request: ms per token after the first (None: fewer than two tokens)."""
    started = time.perf_counter()
    outcome = engine.stream(prompt, sampling, lambda delta: None, lambda: False)
    tokens = outcome.completion_tokens
    if tokens < 2 or outcome.ttft_s is None:
        return None
    per_token = (outcome.seconds - outcome.ttft_s) / (tokens - 1)
    return {
        "tokens": tokens,
        "ms_per_token": round(per_token * 1000, 3),
        "ttft_s": round(outcome.ttft_s, 4),
        "finish_reason": outcome.finish_reason,
        "tool_calls": len(outcome.tool_calls),
        "wall_s": round(time.perf_counter() - started, 3),
    }


def mask_fill_ms(vocab: int = 200_000, steps: int = 64) -> dict[str, Any]:
    """xgrammar's host-side mask for a JSON schema over a synthetic byte-level vocabulary of
    `vocab` tokens (the alphabet plus random 2-8 letter pieces): ms per token."""
    import random

    import xgrammar

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789{}\":,.'"
    pieces = {chr(c) for c in range(32, 127)}
    while len(pieces) < vocab:
        pieces.add("".join(rng.choice(letters) for _ in range(rng.randint(2, 8))))
    encoded = [*sorted(pieces), "</s>"]
    started = time.perf_counter()
    info = xgrammar.TokenizerInfo(
        encoded, vocab_type=xgrammar.VocabType.RAW, stop_token_ids=[len(encoded) - 1]
    )
    compiler = xgrammar.GrammarCompiler(info, max_threads=2)
    compiled = compiler.compile_json_schema(json.dumps(STORY), any_whitespace=False)
    setup_s = time.perf_counter() - started
    matcher = xgrammar.GrammarMatcher(compiled)
    bitmask = xgrammar.allocate_token_bitmask(1, len(encoded))
    text = '{"title": "The Knight", "story": "Once upon a time a dragon met a knight and'
    index = {piece: i for i, piece in enumerate(encoded)}
    ids = [index[ch] for ch in text]
    started = time.perf_counter()
    done = 0
    for token in ids[:steps]:
        matcher.fill_next_token_bitmask(bitmask)
        assert matcher.accept_token(token), f"the text leaves the grammar at {text[: done + 1]!r}"
        done += 1
    elapsed = time.perf_counter() - started
    return {
        "vocab": len(encoded),
        "setup_s": round(setup_s, 2),
        "tokens": done,
        "ms": round(elapsed / done * 1000, 3),
    }


def engine_for(args: argparse.Namespace, workdir: Path) -> Any:
    from common.config import load_settings
    from production.engine import Engine

    if args.gpt_oss:
        from benchmarks.gpt_oss_checkpoint import build
        from production.model.gpu_memory import apply_limit

        model_dir = build(workdir / f"gpt-oss-{args.gpt_oss}-bnb-4bit", args.gpt_oss, "cuda")
        apply_limit(args.limit_gb, "cuda:0")
        home = workdir / "home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[model]\npreset = "gpt-oss-20b"\nbase_model = "{model_dir}"\n'
            'backend = "transformers"\n\n[server]\ndecode = "static"\n'
        )
        return Engine(load_settings(home), "cuda:0")
    from common.home import Home
    from production.model.base_model import prepare_embedded

    home = args.home.expanduser().resolve()
    prepare_embedded(Home(home), show_progress=False)
    return Engine(load_settings(home), "cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path("~/.cache/whetstone-bench"))
    parser.add_argument("--gpt-oss", choices=["20b", "tiny"], default=None)
    parser.add_argument("--limit-gb", type=float, default=24.0)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        engine = engine_for(args, Path(tmp))
        ready_s = time.perf_counter() - started
        messages = [{"role": "user", "content": PROMPT}]
        prompt = engine.prompt_ids(messages, "low")
        started = time.perf_counter()
        engine.grammars.compiler  # noqa: B018 - built once per engine, timed here
        compiler_s = time.perf_counter() - started
        results: dict[str, Any] = {}
        # Round robin, best of `repeats` each: a machine that speeds up or slows down over
        # the run affects every case alike.
        for _ in range(args.repeats):
            for name, sampling in cases(engine, args.new_tokens).items():
                run = measure(engine, prompt, sampling)
                if run and (
                    name not in results or run["ms_per_token"] < results[name]["ms_per_token"]
                ):
                    results[name] = run
    plain = results["plain"]["ms_per_token"]
    for run in results.values():
        run["ratio_to_plain"] = round(run["ms_per_token"] / plain, 3)
    device = torch.cuda.get_device_name(0) if args.gpt_oss else "cpu"
    report = {
        "device": device,
        "model": f"gpt-oss-{args.gpt_oss} 4-bit (random weights)"
        if args.gpt_oss
        else "SmolLM2-135M",
        "decode": engine.decode,
        "vocab_size": engine.vocab_size,
        "tokenizer_size": len(engine.tokenizer),
        "engine_ready_s": round(ready_s, 1),
        "grammar_compiler_s": round(compiler_s, 2),
        "new_tokens": args.new_tokens,
        "cases": results,
        "mask_fill_200k_vocab": mask_fill_ms(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if args.gpt_oss:
        report["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(f"{report['model']} on {device}, {engine.decode} decode, {args.new_tokens} tokens")
    for name, run in results.items():
        print(
            f"  {name:20s} {run['ms_per_token']:8.2f} ms/token  x{run['ratio_to_plain']:.2f}"
            f"  ({run['tokens']} tokens, {run['finish_reason']})"
        )
    fill = report["mask_fill_200k_vocab"]
    print(f"  grammar mask, {fill['vocab']}-token vocabulary: {fill['ms']} ms/token on the host")
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if not args.gpt_oss else device.split()[-1].lower()
    out = RESULTS / f"constrained-{tag}-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
