"""The GPU path, run on the lent device (CI has no GPU; these skip without CUDA):

    pytest -m gpu tests/test_gpu.py

The product's own training job (`python -m development.train`) with Unsloth QLoRA (4-bit
base, gradient checkpointing "unsloth", 8-bit AdamW) on a tiny random Llama, then the
adapter it saved served by both engines: Unsloth (`for_inference`) and transformers + PEFT
on the same 4-bit base. A taught sentence must come back the same from both.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.tiny_models import TAUGHT_QUESTIONS, model_home, teach, teach_profile, tiny_llama

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

REPO = Path(__file__).resolve().parent.parent


def _greedy(
    home: Path, backend: str, adapter: Path, prompts: tuple[str, ...], decode: str = "generate"
) -> list[str]:
    """Answers of the product's serving engine with `adapter` active (greedy, 16 tokens). With
    decode "static" also: the base model's answers after swapping the adapter out, the
    adapter's after swapping it back in, and how many graphs were compiled after warm-up."""
    # The kept prompt cache off: the engines are compared token for token (see
    # _small_gpt_oss_engine); the cache has its own test.
    server = {"decode": decode, "prompt_cache": False}
    overrides = {"model": {"backend": backend}, "server": server}
    code = f"""
import json, sys
from pathlib import Path
from typing import Any
from production.model.device_pin import pin_device
from common.config import load_settings
settings = load_settings(Path({str(home)!r}), {overrides!r})
device = pin_device(settings, "production")  # as the API worker does
from production.engine import Engine, Sampling
engine = Engine(settings, device)
import torch._dynamo.utils as dynamo_utils
compiled = dynamo_utils.counters["stats"]["unique_graphs"]
def answers():
    out = []
    for q in {list(prompts)!r}:
        ids = engine.prompt_ids([{{"role": "user", "content": q}}], None)
        greedy = Sampling(temperature=0, max_tokens=16)
        out.append(engine.stream(ids, greedy, lambda d: None, lambda: False).text)
    return out
engine.load_adapter("taught", Path({str(adapter)!r}))
engine.activate("taught")
result = {{"backend": engine.backend, "decode": engine.decode, "answers": answers()}}
engine.activate(None)
result["base"] = answers()
engine.activate("taught")
result["again"] = answers()
result["compiled_after_warm_up"] = dynamo_utils.counters["stats"]["unique_graphs"] - compiled
print("ANSWERS " + json.dumps(result))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("ANSWERS "))
    result = json.loads(line.removeprefix("ANSWERS "))
    assert (result["backend"], result["decode"]) == (backend, decode)
    assert result["again"] == result["answers"], "swapping out and back in changed the answers"
    if decode == "static":
        assert result["compiled_after_warm_up"] == 0, "a swap recompiled the decode step"
        assert result["base"] != result["answers"], "the swap to the base model did nothing"
    return result["answers"]


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="needs unsloth (.[gpu])")
def test_unsloth_qlora_job_and_both_serving_engines_agree(tmp_path: Path) -> None:
    from candidates import Registry

    model_dir = tiny_llama(tmp_path / "tiny-llama", hidden=512, layers=4, heads=8, kv_heads=4)
    home = model_home(
        tmp_path / "home-unsloth",
        model_dir,
        backend="unsloth",
        load_in_4bit=True,
        more=teach_profile(120),
    )
    teach(home)
    job = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "train",
            "--home",
            str(home),
            "--wait",
            "--force",
            "--no-promote",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=1200,
    )
    logs = sorted((home / "logs").glob("*.log"))
    log_text = logs[-1].read_text() if logs else ""
    assert "trained candidate" in job.stdout, job.stdout + job.stderr + log_text[-6000:]

    print(job.stdout)
    print("\n".join(line for line in log_text.splitlines() if "Unsloth" in line or "sft" in line))
    registry = Registry(home / "candidates")
    (candidate,) = [c for c in registry.list() if c.error is None]
    meta = candidate.meta
    assert meta.config["backend"] == "unsloth"
    assert meta.config["model"]["load_in_4bit"] is True
    assert meta.config["optimizer"] == "adamw_8bit"

    unsloth = _greedy(home, "unsloth", candidate.path, TAUGHT_QUESTIONS)
    peft = _greedy(home, "transformers", candidate.path, TAUGHT_QUESTIONS)
    print("unsloth:", unsloth)
    print("transformers+peft:", peft)
    assert sum("Biscuit" in a for a in unsloth) >= 3, unsloth  # it learned the fact
    assert unsloth == peft


def test_static_cuda_graph_engine_serves_a_trained_adapter_as_peft_does(tmp_path: Path) -> None:
    """The product job trains a 16-bit LoRA; the static engine (StaticCache, adapter merged,
    CUDA-graph step) answers with it as generate() over PEFT does, and swaps it out and back
    in without recompiling."""
    from candidates import Registry

    model_dir = tiny_llama(tmp_path / "tiny-llama", hidden=512, layers=4, heads=8, kv_heads=4)
    home = model_home(
        tmp_path / "home-16bit", model_dir, backend="transformers", more=teach_profile(120)
    )
    teach(home)
    train = ["train", "--home", str(home), "--wait", "--force", "--no-promote"]
    job = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *train],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=1200,
    )
    assert "trained candidate" in job.stdout, job.stdout + job.stderr
    (candidate,) = [c for c in Registry(home / "candidates").list() if c.error is None]

    static = _greedy(home, "transformers", candidate.path, TAUGHT_QUESTIONS, decode="static")
    peft = _greedy(home, "transformers", candidate.path, TAUGHT_QUESTIONS, decode="generate")
    print("static (CUDA graph):", static)
    print("generate (PEFT):", peft)
    assert sum("Biscuit" in a for a in static) >= 3, static
    assert static == peft


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="needs unsloth (.[gpu])")
def test_gpt_oss_trains_with_unsloth_and_serves_harmony_on_the_gpu(tmp_path: Path) -> None:
    """tests/test_gpt_oss.py's round trip on CUDA with backend "auto": the job trains through
    Unsloth's GPT-OSS path (LoRA on the experts too), and the worker serves the adapter on
    the static decoder's expert kernels (production.decode.moe_decode)."""
    from tests.test_gpt_oss import harmony_round_trip

    ran = harmony_round_trip(tmp_path, backend="auto")
    print("GPT-OSS:", ran["served"], "trained with", ran["trained"]["backend"])
    assert ran["trained"]["backend"] == "unsloth"
    assert ran["served"] == {"backend": "transformers", "decode": "static", "device": "cuda:0"}


def gpt_oss_home(home: Path, model_dir: Path, *, limit_gb: float, profile: str) -> Path:
    """A home on the person's preset (gpt-oss-20b: Unsloth, 4-bit, harmony, r=8/alpha=16)
    whose base model is the local real-layout checkpoint `model_dir`, each worker capped at
    `limit_gb` of GPU memory (a 3090's 24 GB on a bigger card)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[model]\npreset = "gpt-oss-20b"\nbase_model = "{model_dir}"\n\n'
        f"[devices]\nmemory_limit_gb = {limit_gb}\n\n{profile}"
    )
    return home


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="needs unsloth (.[gpu])")
def test_gpt_oss_in_the_real_4bit_layout_runs_the_whole_loop_under_a_cap(tmp_path: Path) -> None:
    """A small GPT-OSS saved as Unsloth's bnb-4bit checkpoint (every expert its own NF4
    Linear) on the person's preset, capped at 24 GB: the job loads it through Unsloth
    without quantizing anything, puts LoRA on attention and every expert, trains SFT then
    DPO on corrections, evaluates candidate vs champion vs base and gates; the worker serves
    the taught answer on the final channel and hot-swaps to the next champion."""
    import httpx

    from benchmarks.gpt_oss_checkpoint import SHAPES, build
    from candidates import Registry
    from tests.conftest import ServerProcess

    shape = SHAPES["small"]
    model_dir = build(tmp_path / "gpt-oss-small-bnb-4bit", "small", "cuda")
    profile = teach_profile(100).replace("preference_steps = 0", "preference_steps = 10")
    home = gpt_oss_home(tmp_path / "home", model_dir, limit_gb=24, profile=profile)
    teach(home)

    def train(*extra: str) -> str:
        # Without evaluation: the job module that `whetstone train` starts, with --no-evaluate.
        args = ["orchestrator.cli", "train", "--wait", "--no-promote"]
        args = ["development.train", *extra] if extra else args
        job = subprocess.run(
            [sys.executable, "-m", *args, "--home", str(home), "--force"],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=1200,
        )
        log_text = "\n".join(p.read_text() for p in sorted((home / "logs").glob("*.log")))
        assert job.returncode == 0, job.stdout + job.stderr[-6000:] + log_text[-6000:]
        assert "stores fused experts" not in log_text  # Unsloth took the split 4-bit layout
        made = [c.id for c in Registry(home / "candidates").list() if c.id not in seen]
        assert len(made) == 1, job.stdout + log_text[-6000:]
        seen.add(made[0])
        return made[0]

    seen: set[str] = set()

    first = train("--no-evaluate")
    registry = Registry(home / "candidates")
    meta = registry.get(first).meta
    training = meta.metrics["training"]
    print("first:", training["adapter_tensors"], training["peak_gpu_gib"])
    assert meta.config["backend"] == "unsloth"
    assert [s["name"] for s in training["stages"]] == ["sft", "dpo"]
    layers, experts = shape["layers"], shape["experts"]
    assert training["adapter_tensors"] == {
        **{f"attention.{p}_proj": 2 * layers for p in "qkvo"},
        "experts.down": 2 * layers * experts,
        "experts.gate_up": 2 * layers * experts,
    }
    assert max(training["peak_gpu_gib"].values()) < 24

    def promote(candidate_id: str) -> None:
        args = ["promote", candidate_id, "--force", "--home", str(home)]
        done = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stdout + done.stderr

    promote(first)
    teach(home, repeats=1)  # the next day's feedback: the night continues the champion

    second = train()
    evaluation = registry.get(second).meta.metrics["evaluation"]
    print("second:", evaluation["decision"], evaluation["evaluation_peak_gpu_gib"])
    assert evaluation["champion_id"] == first
    assert registry.get(second).meta.config["started_from"] == first
    # The champion (Unsloth's training model) scored the rows to pick the least known.
    assert registry.get(second).meta.data["counts"]["scored_by_champion"] > 0
    assert {"base", "champion", "candidate"} <= set(evaluation["metrics"])
    assert evaluation["metrics"]["candidate"]["general_facts_total"] > 0
    assert evaluation["decision"] in {"promote", "reject"}
    assert max(evaluation["evaluation_peak_gpu_gib"].values()) < 24

    server = ServerProcess(home).wait_ready(timeout=600)
    try:
        body = {
            "messages": [{"role": "user", "content": TAUGHT_QUESTIONS[1]}],
            "stream": True,
            "temperature": 0,
            "max_tokens": 40,
        }

        def ask() -> str:
            parts = []
            with httpx.stream(
                "POST", f"{server.url}/v1/chat/completions", json=body, timeout=300
            ) as response:
                assert response.status_code == 200, response.read()
                for line in response.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        event = json.loads(line[6:])
                        assert "error" not in event, event  # not an empty answer
                        for choice in event.get("choices", []):
                            parts.append(choice["delta"].get("content") or "")
            return "".join(parts)

        answer = ask()
        status = httpx.get(f"{server.url}/v1/status", timeout=30).json()
        print("served:", answer, status["gpu_memory"])
        # Unsloth trained it; the worker serves it on the static decoder's expert kernels.
        assert status["adapter_id"] == first
        assert (status["backend"], status["decode"]) == ("transformers", "static")
        assert "Biscuit" in answer and "<|" not in answer
        assert status["gpu_memory"]["peak_gib"] < 24
        promote(second)  # the CLI asks the running worker to reload
        swapped = httpx.post(f"{server.url}/admin/reload", timeout=300).json()
        print("swap:", swapped)
        assert httpx.get(f"{server.url}/v1/status", timeout=30).json()["adapter_id"] == second
        assert "Biscuit" in ask()
    finally:
        server.stop()


def test_moe_static_decode_on_bf16_gpt_oss_is_generate_up_to_numerics(tmp_path: Path) -> None:
    """The static decoder's expert kernels on a small bf16 GPT-OSS against generate(), both
    teacher-forced on generate()'s greedy tokens and refereed by an fp32 run of the same
    weights: the kernels' logits are no further from the exact math than generate()'s own
    are (a layout or indexing mistake is off by whole logits), a hot swap between two
    adapters with expert LoRA recompiles nothing."""
    from benchmarks.moe_decode import part_bf16

    result = part_bf16("small", tmp_path, 48, bandwidth=4000.0)
    agreement, static = result["agreement_base"], result["static"]
    print("bf16 small:", json.dumps(result))
    assert static["compile_s"] > 0
    # Typical steps: as close to fp32 as generate() is (the max can differ at a router
    # near-tie, where either path's rounding picks another expert for one token).
    assert agreement["fp32_median_step_error_static"] <= (
        2 * agreement["fp32_median_step_error_generate"] + 0.01
    ), agreement
    assert agreement["fp32_mean_logit_error_static"] <= (
        2 * agreement["fp32_mean_logit_error_generate"] + 0.005
    ), agreement
    assert agreement["fp32_argmax_agreement_static"] >= (
        agreement["fp32_argmax_agreement_generate"] - 0.1
    ), agreement
    assert static["hot_swap"]["new_compiles"] == 0


def _small_gpt_oss_engine(tmp_path: Path, prompt_cache: bool = False) -> Any:
    """The product's Engine on the small GPT-OSS in the person's 4-bit layout, under the
    gpt-oss-20b preset (static CUDA-graph decode with the expert kernels).

    The kept prompt cache is off unless asked for: these tests compare repeated answers
    token for token, and in bf16 a prompt prefilled in two parts differs from one prefilled
    whole by rounding (random weights have near-ties everywhere)."""
    from benchmarks.gpt_oss_checkpoint import build
    from common.config import load_settings
    from production.engine import Engine

    model_dir = build(tmp_path / "gpt-oss-small-bnb-4bit", "small", "cuda")
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[model]\npreset = "gpt-oss-20b"\nbase_model = "{model_dir}"\n\n'
        f"[server]\nprompt_cache = {str(prompt_cache).lower()}\n"
    )
    return Engine(load_settings(home), "cuda:0")


def test_kept_conversation_cache_on_the_cuda_graph_decoder_matches_a_fresh_prefill(
    tmp_path: Path,
) -> None:
    """A harmony conversation on the person's layout with the cache kept: each turn reads the
    earlier turns from the cache (the sliding layers' rings restart from their copy of the
    last prompt's end), and the first answer token's distribution is a fresh prefill's up to
    bf16 rounding."""
    from production.decode.steering import SteeringSpec
    from production.engine import Sampling

    engine = _small_gpt_oss_engine(tmp_path, prompt_cache=True)
    assert engine.static is not None and engine.static.rings
    probe = Sampling(temperature=0, max_tokens=48, steering=SteeringSpec(logprobs=5))
    messages: list[dict] = []
    last: list[int] = []
    for turn, text in enumerate(["Tell me a story.", "Make it longer.", "Now a poem."]):
        messages.append({"role": "user", "content": text * (40 * (turn + 1))})
        prompt = engine.prompt_ids(messages, None)
        kept = engine.stream(prompt, probe, lambda d: None, lambda: False)
        engine.forget_prompts()
        fresh = engine.stream(prompt, probe, lambda d: None, lambda: False)
        if turn:
            assert len(last) - 2 <= kept.cached_tokens < len(prompt)
        top_kept = dict(kept.logprobs[0].top)
        top_fresh = dict(fresh.logprobs[0].top)
        shared = top_kept.keys() & top_fresh.keys()
        assert len(shared) >= 4, (top_kept, top_fresh)
        assert max(abs(top_kept[t] - top_fresh[t]) for t in shared) < 0.1
        messages.append({"role": "assistant", "content": kept.text})
        last = prompt
    assert engine.prompt_cache.hits >= 2


def test_moe_static_decode_serves_4bit_gpt_oss_adapters_and_swaps_under_load(
    tmp_path: Path,
) -> None:
    """The person's layout (NF4 experts) through the product's Engine with decode "static":
    the worker keeps generating while a swap waits its turn: the request in flight finishes
    on the adapter it started with, the next one runs on the new adapter and answers exactly
    what that adapter answers alone, and nothing recompiles."""
    import asyncio

    from benchmarks.moe_decode import _compiles, random_adapter
    from production.engine import Sampling
    from production.worker import GenerationWorker

    engine = _small_gpt_oss_engine(tmp_path)
    assert (engine.backend, engine.decode) == ("transformers", "static")
    config = engine.model.config
    engine.load_adapter("a", random_adapter(tmp_path / "a", config, 1))
    engine.load_adapter("b", random_adapter(tmp_path / "b", config, 2))
    prompt = engine.prompt_ids([{"role": "user", "content": "Tell me a story."}], None)
    greedy = Sampling(temperature=0, max_tokens=64)

    def alone(adapter: str) -> str:
        engine.activate(adapter)
        return engine.stream(prompt, greedy, lambda d: None, lambda: False).text

    expected = {name: alone(name) for name in ("a", "b", "a")}
    assert expected["a"] != expected["b"]
    assert alone("a") == expected["a"]  # b's factors were overwritten exactly
    compiles = _compiles()

    async def under_load() -> list[tuple[str, str, int]]:
        worker = GenerationWorker(engine, max_queue=8)

        async def collect(job) -> tuple[str, str, int]:
            adapter = None
            while True:
                kind, payload = await job.events.get()
                if kind == "start":
                    adapter = payload
                elif kind == "done":
                    return adapter, payload.text, payload.completion_tokens
                elif kind == "error":
                    raise payload

        first = worker.submit(prompt, greedy)
        await asyncio.to_thread(first.started.wait, 120)
        swap = worker.call(lambda e: e.activate("b"))
        second = worker.submit(prompt, greedy)
        out = [await collect(first), await collect(second)]
        await asyncio.wrap_future(swap)
        worker.stop()
        return out

    first, second = asyncio.run(under_load())
    assert first == ("a", expected["a"], 64)
    assert second == ("b", expected["b"], 64)
    assert _compiles() == compiles


def test_nf4_prompt_path_dequantizes_as_bitsandbytes_and_agrees_with_the_decode_kernels() -> None:
    """A long prompt on 4-bit experts dequantizes each hit expert with one kernel: bitsandbytes'
    values exactly; and the prompt loop and the per-token kernels give the same layer output."""
    import time

    import bitsandbytes.functional as bnb_functional

    from production.decode import moe_decode

    torch.manual_seed(0)
    hidden, experts = 2880, 8  # the 20B shape's experts, fewer of them
    layers = []
    for shape in ((2 * hidden, hidden), (hidden, hidden)):
        linears = []
        for _ in range(experts):
            weight = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 0.02
            data, state = bnb_functional.quantize_4bit(
                weight, quant_type="nf4", blocksize=64, compress_statistics=True
            )
            linears.append(type("L", (), {"weight": data})())
            linears[-1].weight.quant_state = state
        layers.append(linears)
    gate_up, down = (moe_decode.Nf4Stack.from_linears(ls) for ls in layers)
    for i in (0, experts - 1):
        w = layers[0][i].weight
        assert torch.equal(
            gate_up.dequantize(i, torch.bfloat16), bnb_functional.dequantize_4bit(w, w.quant_state)
        )
    torch.cuda.synchronize()
    started = time.perf_counter()
    for i in range(experts):
        gate_up.dequantize(i, torch.bfloat16)
    torch.cuda.synchronize()
    print(f"dequantize: {(time.perf_counter() - started) / experts * 1e3:.2f} ms an expert")
    module = moe_decode.DecodeExperts(
        alpha=1.702,
        limit=7.0,
        num_experts=experts,
        gate_up_bias=torch.zeros(experts, 2 * hidden, device="cuda", dtype=torch.bfloat16),
        down_bias=torch.zeros(experts, hidden, device="cuda", dtype=torch.bfloat16),
        gate_up_nf4=gate_up,
        down_nf4=down,
    )
    tokens = 300  # 600 token-slots: past ROUTED_PREFILL_MAX, so the loop runs
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    indices = torch.randint(0, experts, (tokens, 2), device="cuda")
    weights = torch.softmax(torch.randn(tokens, 2, device="cuda"), -1).to(torch.bfloat16)
    looped = module(x, indices, weights).float()
    routed = module._routed(x, indices, weights).float()
    assert (looped - routed).abs().max() < 0.02 * looped.abs().max(), (looped - routed).abs().max()


def test_static_moe_decoder_honours_every_logits_parameter_without_recompiling(
    tmp_path: Path,
) -> None:
    """The person's layout on the CUDA-graph decoder: a grammar (a tool call, a JSON answer),
    log-probs, penalties and a logit bias and stop strings all act on the captured step's
    logits, and none of them compiles a new graph."""
    from benchmarks.moe_decode import _compiles
    from production.decode import answer_grammar
    from production.decode.steering import SteeringSpec
    from production.engine import Sampling

    engine = _small_gpt_oss_engine(tmp_path)
    assert engine.decode == "static"
    compiles = _compiles()
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                "required": ["city"],
            },
        },
    }
    messages, tools = engine.format.template_messages(
        [{"role": "user", "content": "Weather in Paris?"}], [tool]
    )
    prompt = engine.prompt_ids(messages, "low", tools)

    def run(**sampling: object):
        full = {"temperature": 0, "max_tokens": 160} | sampling
        return engine.stream(prompt, Sampling(**full), lambda d: None, lambda: False)

    plain = run()
    shape = engine.format.answer_shape
    grammar = answer_grammar.tool_calls(shape, [tool], "required", False, 40)
    called = run(steering=SteeringSpec(grammar=grammar), tools=True)
    (call,) = called.tool_calls
    assert called.finish_reason == "tool_calls" and call.name == "get_weather"
    assert json.loads(call.arguments)["city"] in ("Paris", "Rome")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    answered = run(
        steering=SteeringSpec(grammar=answer_grammar.json_answer(shape, schema, True, 40))
    )
    assert isinstance(json.loads(answered.text)["n"], int)
    probed = run(steering=SteeringSpec(logprobs=3), max_tokens=16)
    assert len(probed.logprobs) == probed.completion_tokens
    assert all(e.token == e.top[0][0] for e in probed.logprobs)  # greedy: the top token
    assert probed.text == run(max_tokens=16).text  # reading back changes no token
    first = probed.logprobs[0].token
    banned = SteeringSpec(logit_bias=((first, -100.0),), logprobs=0)
    assert run(steering=banned, max_tokens=4).logprobs[0].token != first
    repeats = run(steering=SteeringSpec(logprobs=0, frequency_penalty=2.0), max_tokens=32)
    counts = [e.token for e in repeats.logprobs]
    plain_counts = [e.token for e in run(steering=SteeringSpec(logprobs=0), max_tokens=32).logprobs]
    assert max(map(counts.count, counts)) <= max(map(plain_counts.count, plain_counts))
    raw = run(raw=True, max_tokens=24).text  # a completion: all of it is content
    stop = raw[6:9]
    assert run(raw=True, max_tokens=24, stop=(stop,)).text == raw[: raw.index(stop)]
    assert plain.completion_tokens
    assert _compiles() == compiles, "a logits parameter compiled a new graph"


def test_structured_answers_on_the_static_moe_decoder_parse_strictly(tmp_path: Path) -> None:
    """The person's layout (NF4 experts) on the CUDA-graph decoder, sampled at temperature 1
    with varied seeds through the grammars the API builds: json_schema answers and tool-call
    arguments parse with a strict parser and validate, or the answer says "length"."""
    from tests.test_structured_output import answer, strict_loads, validate

    engine = _small_gpt_oss_engine(tmp_path)
    assert engine.decode == "static"
    schemas = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 12},
                "count": {"type": "integer", "minimum": 0, "maximum": 99},
                "ok": {"type": "boolean"},
            },
            "required": ["name", "count", "ok"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {
                "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
                "when": {"type": "string", "format": "date"},
                "either": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            },
            "required": ["tags", "when", "either"],
        },
    ]
    finished = 0
    for schema in schemas:
        for seed in range(6):
            outcome = answer(engine, seed, 200, schema=schema)
            if outcome.finish_reason == "length":
                assert outcome.completion_tokens == 200
                continue
            assert outcome.finish_reason == "stop", outcome
            validate(strict_loads(outcome.text), schema)
            finished += 1
    calls = 0
    tool = {"type": "function", "function": {"name": "record", "parameters": schemas[0]}}
    for seed in range(6):
        outcome = answer(engine, seed, 200, tools=[tool])
        for call in outcome.tool_calls:
            validate(strict_loads(call.arguments), schemas[0])
            calls += 1
    print(f"structured: {finished}/12 answers finished, {calls}/6 calls made, all valid")
    assert finished >= 4 and calls >= 2
