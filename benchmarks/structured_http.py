"""Structured output and the end of a stream, through the real HTTP server as a client sees it.

    python -m benchmarks.structured_http --gpt-oss 20b [--runs 4] [--model-dir DIR]  # CUDA
    python -m benchmarks.structured_http [--runs 4]                  # a tiny GPT-OSS on the CPU

Starts `python -m production.server` in a throwaway home on a random-weight GPT-OSS (`20b`: the
person's shape in 4 bits, benchmarks.gpt_oss_checkpoint; default: tests.tiny_models) and asks
through the openai SDK, temperature 1, seeds 0..runs-1:

- json_schema, strict (an object with a string, an integer and a boolean; once plain, once
  with the string's maxLength): answers that parse with a strict json.loads and validate;
- a required tool call: calls whose arguments parse and validate;
- a plain answer of 256 tokens, streamed: the time from the last chunk carrying text (content
  or reasoning) to the end of the stream, in seconds and in tokens (the stream's own time per
  token).

Random weights at temperature 1 leave only the grammar to keep the JSON valid, and write stray
harmony control tokens mid-answer. Writes benchmarks/results/structured-http-<device>-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.serving import Server, device_name

log = logging.getLogger("benchmarks.structured_http")
REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "count": {"type": "integer"},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "count", "ok"],
    "additionalProperties": False,
}
SHORT = SCHEMA | {
    "properties": SCHEMA["properties"] | {"name": {"type": "string", "maxLength": 12}}
}
TOOL = {
    "type": "function",
    "function": {
        "name": "record",
        "parameters": SHORT
        | {"properties": SHORT["properties"] | {"day": {"format": "date", "type": "string"}}},
    },
}


def strict_json(text: str) -> Any:
    """json.loads without NaN/Infinity (raw control characters in strings fail by default)."""

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=no_constant)


def _valid(text: str, schema: dict[str, Any]) -> str | None:
    """None if `text` parses strictly and validates, else why not."""
    import jsonschema

    try:
        jsonschema.validate(strict_json(text), schema, format_checker=jsonschema.FormatChecker())
    except (ValueError, jsonschema.ValidationError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return None


def home_for(root: Path, gpt_oss: str | None, model_dir: Path | None) -> Path:
    home = root / "home"
    if gpt_oss == "20b":
        from benchmarks.gpt_oss_checkpoint import build

        model_dir = model_dir or root / "gpt-oss-20b-bnb-4bit"
        if not (model_dir / "config.json").exists():
            started = time.perf_counter()
            build(model_dir, "20b", "cuda")
            log.info("20B checkpoint built in %.0f s", time.perf_counter() - started)
        home.mkdir()
        (home / "config.toml").write_text(
            f'[model]\npreset = "gpt-oss-20b"\nbase_model = "{model_dir}"\n'
        )
        return home
    from tests.tiny_models import model_home, tiny_gpt_oss

    return model_home(home, tiny_gpt_oss(root / "gpt-oss-tiny"), chat_format="harmony")


def measure(client: Any, runs: int) -> dict[str, Any]:
    ask = {"model": "whetstone", "temperature": 1.0}
    out: dict[str, Any] = {}
    for name, schema in (("json_schema", SCHEMA), ("json_schema_maxLength", SHORT)):
        rows = []
        for seed in range(runs):
            answer = client.chat.completions.create(
                **ask,
                seed=seed,
                max_tokens=256,
                messages=[{"role": "user", "content": "Describe a cat as JSON."}],
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "cat", "schema": schema, "strict": True},
                },
            )
            choice = answer.choices[0]
            problem = (
                _valid(choice.message.content, schema) if choice.finish_reason == "stop" else None
            )
            rows.append(
                {
                    "finish": choice.finish_reason,
                    "problem": problem,
                    "text": choice.message.content[:200],
                }
            )
        out[name] = rows
    rows = []
    for seed in range(runs):
        answer = client.chat.completions.create(
            **ask,
            seed=seed,
            max_tokens=256,
            messages=[{"role": "user", "content": "Record a cat."}],
            tools=[TOOL],
            tool_choice="required",
        )
        choice = answer.choices[0]
        calls = choice.message.tool_calls or []
        problems = [_valid(c.function.arguments, TOOL["function"]["parameters"]) for c in calls]
        rows.append({"finish": choice.finish_reason, "calls": len(calls), "problems": problems})
    out["tool_call"] = rows
    rows = []
    for seed in range(runs):
        started = time.perf_counter()
        last_text, usage, chunks = None, None, 0
        for chunk in client.chat.completions.create(
            **ask,
            seed=seed,
            max_tokens=256,
            messages=[{"role": "user", "content": "Tell me a long story."}],
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"include_reasoning": True},
        ):
            usage = chunk.usage or usage
            if chunk.choices:
                delta = chunk.choices[0].delta
                if delta.content or (delta.model_extra or {}).get("reasoning_content"):
                    last_text, chunks = time.perf_counter(), chunks + 1
        ended = time.perf_counter()
        per_token = (ended - started) / max(1, usage.completion_tokens)
        tail = ended - (last_text or started)
        rows.append(
            {
                "tokens": usage.completion_tokens,
                "text_chunks": chunks,
                "tail_s": round(tail, 4),
                "tail_tokens": round(tail / per_token, 1),
            }
        )
    out["stream_end"] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpt-oss", choices=["20b"], default=None)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="20b: the checkpoint here (built if missing)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import openai
    import torch

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        home = home_for(Path(tmp), args.gpt_oss, args.model_dir)
        server = Server(home, "server.log")
        try:
            started = time.perf_counter()
            server.wait_ready(timeout=600)
            log.info("server ready in %.0f s", time.perf_counter() - started)
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
            results = measure(client, args.runs)
        finally:
            server.stop()
    for name in ("json_schema", "json_schema_maxLength"):
        rows = results[name]
        done = [r for r in rows if r["finish"] == "stop"]
        bad = [r for r in done if r["problem"]]
        print(f"{name}: {len(done)}/{len(rows)} finished, {len(bad)} not valid JSON for the schema")
        for r in bad:
            print(f"  {r['problem']}: {r['text']!r}")
    calls = results["tool_call"]
    made = sum(r["calls"] for r in calls)
    bad_calls = sum(1 for r in calls for p in r["problems"] if p)
    print(f"tool_call: {made} calls in {len(calls)} answers, {bad_calls} not valid")
    for r in results["stream_end"]:
        print(
            f"stream: {r['tokens']} tokens, last text {r['tail_s'] * 1000:.0f} ms "
            f"({r['tail_tokens']} tokens' time) before the end"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    kind = args.gpt_oss or "tiny"
    path = RESULTS / f"structured-http-{kind}-{device.split(':')[0]}-{stamp}.json"
    path.write_text(
        json.dumps({"device": device_name(device), "shape": kind, "results": results}, indent=2)
        + "\n"
    )
    print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
