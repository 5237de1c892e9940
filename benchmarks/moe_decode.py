"""Batch-1 chat decode of GPT-OSS on the static decoder's expert kernels
(production.decode.moe_decode) against transformers' generate(), bf16 and 4-bit, with an
adapter active, in one call.

    python -m benchmarks.moe_decode [--shape 20b] [--parts bf16,nf4] [--new-tokens 128]
        [--limit-gb 24] [--sweep] [--kernels]

--kernels (with --parts "" alone): each NF4 GEMV kernel variant x tile on the shape's expert
projections (nf4_kernels): us a call, GB/s, against the baseline kernel, max |diff| from the
reference; a few minutes on an H100, no model built.

- bound: at batch 1 a token reads every weight it uses once: attention, router, embedding row,
  lm_head and the top-k experts of every layer. tokens/s <= HBM bandwidth / those bytes;
  bandwidth is measured here (a device-to-device copy, read + write).
- bf16: a random GPT-OSS of `--shape` built on the GPU (transformers' fused experts), plain
  generate() on it (greedy, no adapter: its best case), then the same model prepared for the
  static decoder: compile + capture time, tokens/s and TTFT with a random LoRA adapter
  (r=8, attention and every expert, Unsloth's split expert names) merged, a hot swap to a second
  adapter (time, compiles after it, tokens/s after it).
- nf4: the person's checkpoint layout (benchmarks.gpt_oss_checkpoint, NF4 experts, double
  quant) loaded by the product's Engine under a `--limit-gb` cap: decode "generate" (PEFT over
  bitsandbytes, transformers' expert loop) against decode "static" (experts dequantized inside
  the kernel, the adapter unmerged on the experts, merged on attention), same measurements,
  plus decode after prompts of 256, 4,096, 16,384 tokens and one that fills the serving
  window (`--contexts`: tok/s, TTFT, fraction of the bound and of the shortest context's
  speed), and the worker's GPU memory at start-up (load,
  expert stacks, compile and capture) and steady (decoding with the adapter, hot swap, the
  window-filling prompt): torch's peaks (allocated, reserved) and the card's per nvidia-smi
  (the whole process, CUDA context included).
- agreement, base weights: the static path's greedy tokens against generate()'s (how many
  agree before the first difference), and teacher-forced on generate()'s tokens the largest
  logit difference and whether every argmax difference falls on a near-tie of generate()'s
  own logits (random weights give flat distributions: gaps of 0.01 are common).

Writes benchmarks/results/moe-decode-<device>-<time>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from pathlib import Path
from typing import Any

from benchmarks.card_memory import CardMemory

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
PROMPT = "Write a very long story about a dragon and a knight."
RANK = 8
GIB = 2**30


def bytes_per_token(config: Any, expert_bytes_per_weight: float) -> float:
    """Weight bytes one decode token reads: attention, router, sinks, norms, one embedding row
    and lm_head in bf16; top-k experts at `expert_bytes_per_weight`."""
    h, layers = config.hidden_size, config.num_hidden_layers
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    attention = h * q * 2 + h * kv * 2 * 2 + (q + 2 * kv + h) * 2
    router = (h * config.num_local_experts + config.num_local_experts) * 2
    inter = config.intermediate_size
    expert = (h * 2 * inter + inter * h) * expert_bytes_per_weight + (2 * inter + h) * 2
    per_layer = attention + router + config.num_experts_per_tok * expert
    return layers * per_layer + (config.vocab_size * h + h) * 2


def random_adapter(out: Path, config: Any, seed: int, rank: int = RANK) -> Path:
    """A PEFT LoRA folder on attention and every expert (Unsloth's split names), random B so
    it changes the answers."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    h, inter = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
    tensors = {}

    def add(module: str, fan_in: int, fan_out: int) -> None:
        key = f"base_model.model.{module}"
        a = torch.randn(rank, fan_in, generator=generator) / fan_in**0.5
        b = torch.randn(fan_out, rank, generator=generator) * 0.02
        tensors[f"{key}.lora_A.weight"] = a.to(torch.bfloat16)
        tensors[f"{key}.lora_B.weight"] = b.to(torch.bfloat16)

    for layer in range(config.num_hidden_layers):
        for name, (fan_in, fan_out) in shapes.items():
            add(f"model.layers.{layer}.self_attn.{name}", fan_in, fan_out)
        for i in range(config.num_local_experts):
            add(f"model.layers.{layer}.mlp.experts.gate_up_projs.{i}", h, 2 * inter)
            add(f"model.layers.{layer}.mlp.experts.down_projs.{i}", inter, h)
    out.mkdir(parents=True, exist_ok=True)
    experts = range(config.num_local_experts)  # PEFT cannot target the ModuleList itself
    targets = [
        *shapes,
        *(f"gate_up_projs.{i}" for i in experts),
        *(f"down_projs.{i}" for i in experts),
    ]
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets).save_pretrained(out)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def _compiles() -> int:
    import torch._dynamo.utils as dynamo_utils

    return int(dynamo_utils.counters["stats"]["unique_graphs"])


def greedy_generate(model: Any, prompt: list[int], new_tokens: int) -> dict[str, Any]:
    """transformers' generate(), greedy: tokens, raw logits per step, TTFT and tokens/s."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps: list[float] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    ids = torch.tensor([prompt], device="cuda")
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    out = model.generate(
        ids,
        **kwargs,
        stopping_criteria=StoppingCriteriaList([Stamp()]),
        return_dict_in_generate=True,
        output_logits=True,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logits = torch.cat([step.float() for step in out.logits]).cpu()
    return {"tokens": tokens, "logits": logits, **_speed(started, stamps)}


def _speed(started: float, stamps: list[float]) -> dict[str, Any]:
    return {
        "ttft_s": round(stamps[0] - started, 4),
        "decode_tok_s": round((len(stamps) - 1) / (stamps[-1] - stamps[0]), 1),
    }


def static_run(
    decoder: Any, prompt: list[int], new_tokens: int, *, kept: bool = False
) -> dict[str, Any]:
    """Greedy tokens, TTFT and tokens/s of the static decoder; the prompt prefilled whole
    unless `kept` (then from where the last run's kept cache allows)."""
    import torch

    if not kept:
        decoder.forget()

    stamps: list[float] = []
    tokens: list[int] = []

    def emit(token: int) -> bool:
        stamps.append(time.perf_counter())
        tokens.append(token)
        return True

    torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.inference_mode():
        cached = decoder.run(prompt, new_tokens, lambda logits: logits.argmax(-1), emit)
    return {"tokens": tokens, "cached_tokens": cached, **_speed(started, stamps)}


def agreement(decoder: Any, prompt: list[int], reference: dict[str, Any]) -> dict[str, Any]:
    """The static path against generate()'s greedy run: free-running tokens, then teacher-forced
    on generate()'s tokens the logit difference per step."""
    import torch

    free = static_run(decoder, prompt, len(reference["tokens"]))["tokens"]
    same = next(
        (i for i, (a, b) in enumerate(zip(free, reference["tokens"], strict=False)) if a != b), None
    )
    seen: list[torch.Tensor] = []
    forced = iter(reference["tokens"])

    def pick(logits: torch.Tensor) -> torch.Tensor:
        seen.append(logits.float().cpu())
        return torch.tensor([next(forced)], device=logits.device)

    decoder.forget()
    with torch.inference_mode():
        decoder.run(prompt, len(reference["tokens"]), pick, lambda token: True)
    mine = torch.cat(seen)
    ref = reference["logits"][: len(mine)]
    diff = (mine - ref).abs().amax(-1)
    top2 = ref.topk(2, dim=-1).values
    gap = top2[:, 0] - top2[:, 1]
    flips = (mine.argmax(-1) != ref.argmax(-1)).nonzero().flatten().tolist()
    referee = {}
    if "exact" in reference:  # how far each bf16 path is from the fp32 math, same tokens
        exact = reference["exact"][: len(mine)]
        # Per step, the largest logit error; a rare large one is a router near-tie that
        # rounding tipped to another expert (a discrete choice, in either bf16 path).
        ref_step = (ref - exact).abs().amax(-1)
        mine_step = (mine - exact).abs().amax(-1)
        referee = {
            "fp32_max_logit_error_generate": round(float(ref_step.max()), 4),
            "fp32_max_logit_error_static": round(float(mine_step.max()), 4),
            "fp32_median_step_error_generate": round(float(ref_step.median()), 5),
            "fp32_median_step_error_static": round(float(mine_step.median()), 5),
            "fp32_mean_logit_error_generate": round(float((ref - exact).abs().mean()), 5),
            "fp32_mean_logit_error_static": round(float((mine - exact).abs().mean()), 5),
            "fp32_argmax_agreement_generate": float(
                (ref.argmax(-1) == exact.argmax(-1)).float().mean()
            ),
            "fp32_argmax_agreement_static": float(
                (mine.argmax(-1) == exact.argmax(-1)).float().mean()
            ),
        }
    return referee | {
        "tokens_compared": len(free),
        "greedy_tokens_equal_before_first_difference": len(free) if same is None else same,
        "teacher_forced_max_logit_diff": round(float(diff.max()), 4),
        "teacher_forced_argmax_flips": len(flips),
        "flips_at_near_ties": all(float(gap[i]) <= 2 * float(diff[i]) for i in flips),
        "reference_median_top2_gap": round(float(gap.median()), 4),
    }


def hot_swap(merged: Any, decoder: Any, prompt: list[int], adapter_b: Path, n: int) -> dict:
    import torch

    compiles = _compiles()
    torch.cuda.synchronize()
    started = time.perf_counter()
    merged.load("b", adapter_b)
    merged.activate("b")
    merged.unload("a")
    torch.cuda.synchronize()
    swap_s = time.perf_counter() - started
    after = static_run(decoder, prompt, n)
    return {
        "swap_s": round(swap_s, 3),
        "decode_tok_s_after": after["decode_tok_s"],
        "new_compiles": _compiles() - compiles,
    }


def sweep(shape: str) -> list[dict[str, Any]]:
    """Each kernel's achieved bandwidth on one layer's expert shapes, 4 slots on 4 experts,
    for a few tile sizes (the chosen ones are production.decode.moe_decode.KN_TILE / NF4_TILE)."""
    import bitsandbytes.functional as bnb_functional
    import torch

    from benchmarks.gpt_oss_checkpoint import SHAPES
    from production.decode import moe_decode

    s = SHAPES[shape]
    h, e = s["hidden"], s["experts"]
    ids = torch.arange(4, device="cuda")
    rows = []

    def timed(fn: Any, nbytes: float) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        return nbytes * 50 / (time.perf_counter() - started) / 1e9

    for name, k, n in (("gate_up", h, 2 * h), ("down", h, h)):
        weight = torch.randn(e, k, n, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(4 if name == "down" else 1, k, device="cuda", dtype=torch.bfloat16)
        nbytes = 4 * k * n * 2
        rows.append(
            {
                "kernel": "cublas bf16 (one matmul per slot)",
                "proj": name,
                "gbs": round(
                    timed(
                        lambda w=weight, x=x: [x[min(i, x.shape[0] - 1)] @ w[i] for i in range(4)],
                        nbytes,
                    ),
                    1,
                ),
            }
        )
        for bn in (32, 64, 128):
            for bk in (32, 64):
                for warps in (4,):
                    tile = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps}
                    gbs = timed(
                        lambda t=tile, w=weight, x=x: moe_decode.expert_gemv_kn(x, w, ids, t),
                        nbytes,
                    )
                    rows.append({"kernel": "kn", "proj": name, **tile, "gbs": round(gbs, 1)})
        linears = []
        for i in range(e):
            q, state = bnb_functional.quantize_4bit(
                weight[i].t().contiguous(), quant_type="nf4", compress_statistics=True, blocksize=64
            )
            linears.append(_Bnb(q, state))
        stack = moe_decode.Nf4Stack.from_linears(linears)
        nbytes = 4 * k * n * (0.5 + 1 / 64)
        for bn in (8, 16, 32):
            for bk in (128, 256):
                for warps in (4, 8):
                    tile = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps}
                    gbs = timed(
                        lambda t=tile, x=x, q=stack: moe_decode.expert_gemv_nf4(x, q, ids, t),
                        nbytes,
                    )
                    rows.append({"kernel": "nf4", "proj": name, **tile, "gbs": round(gbs, 1)})
        del weight, stack, linears
    return rows


def random_nf4_stack(experts: int, n: int, k: int, device: str = "cuda") -> Any:
    """An Nf4Stack of `experts` random [n, k] NF4 weights with double quant, as Unsloth's
    checkpoints store them (uint8 absmax codes, a nested fp32 scale per 256 blocks, an
    offset), built from random bytes: no bf16 weights to quantize first. bitsandbytes'
    own code tables (NF4 and the nested dynamic map) come from quantizing one small tensor."""
    import bitsandbytes.functional as bnb_functional
    import torch

    from production.decode import moe_decode

    _, state = bnb_functional.quantize_4bit(
        torch.randn(64, 64, device=device, dtype=torch.bfloat16),
        quant_type="nf4",
        compress_statistics=True,
        blocksize=64,
    )
    blocks = n * k // moe_decode.NF4_BLOCK
    generator = torch.Generator(device=device).manual_seed(0)

    def uint8(*shape: int) -> torch.Tensor:
        return torch.randint(0, 256, shape, dtype=torch.uint8, device=device, generator=generator)

    return moe_decode.Nf4Stack(
        uint8(experts, n * k // 2),
        uint8(experts, blocks),
        0.01 + 0.02 * torch.rand(experts, -(-blocks // 256), device=device, generator=generator),
        0.03 + 0.01 * torch.rand(experts, device=device, generator=generator),
        state.code.float(),
        state.state2.code.float(),
        n,
        k,
    )


def rows_tiles(n: int) -> list[dict[str, Any]]:
    """The rows kernel's tiles --kernels compares for N output rows: 2, 4 and 8 rows a thread
    at 1, 2 and 4 warps, each with the default K split and with it added by atomics; the
    default tile (production.decode.moe_decode.rows_tile) at every even split of 45 blocks; the
    default tile decoding codes by a load from global memory (the baseline's way)."""
    from production.decode import moe_decode

    shapes = [(32, 1), (64, 1), (128, 1), (128, 2), (256, 2), (256, 4), (512, 4)]
    tiles: list[dict[str, Any]] = []
    for block_n, warps in shapes:
        tile = {"BLOCK_N": block_n, "num_warps": warps}
        tiles += [tile, tile | {"ATOMIC": True}]
    default = moe_decode.rows_tile(n)
    tiles += [default | {"SPLIT": split} for split in (1, 3, 5, 9, 15, 45)]
    tiles.append(default | {"DECODE": "global"})
    return tiles


def nf4_kernels(shape: str, bandwidth: float) -> list[dict[str, Any]]:
    """Every NF4 kernel variant x tile (production.decode.moe_decode.NF4_VARIANTS) on one layer's
    expert shapes, 4 slots, double quant, bf16 activations: median us a call, GB/s of the
    packed weights and absmax codes read, the baseline kernel's us over this one's, and the
    largest difference from reference_gemv_nf4 on the GPU.

    Timed as the decode step runs them: 24 calls captured in one CUDA graph, each on the
    next 4 of the layer's experts, so the L2 cache (50 MB on an H100) never holds a call's
    weights from an earlier one (a layer's experts are read once a token); the host
    wrapper's allocations and partial-sum kernel are inside the timing."""
    import statistics

    import torch

    from benchmarks.gpt_oss_checkpoint import SHAPES
    from production.decode import moe_decode

    s = SHAPES[shape]
    h, e, slots, calls = s["hidden"], s["experts"], 4, 24
    ids = [
        torch.tensor([(slots * c + i) % e for i in range(slots)], device="cuda")
        for c in range(calls)
    ]
    rows = []
    for name, k, n in (("gate_up", h, 2 * h), ("down", h, h)):
        stack = random_nf4_stack(e, n, k)
        x = torch.randn(slots if name == "down" else 1, k, device="cuda", dtype=torch.bfloat16)
        reference = moe_decode.reference_gemv_nf4(x, stack, ids[0])
        nbytes = slots * (n * k // 2 + n * k // moe_decode.NF4_BLOCK)
        configs = [("baseline", dict(moe_decode.NF4_TILE))]
        configs += [("rows", tile) for tile in rows_tiles(n)]
        baseline_us = None
        for variant, tile in configs:
            row: dict[str, Any] = {"proj": name, "variant": variant, "tile": tile}
            if variant == "rows":
                plan = moe_decode.rows_plan(n, k, slots, tile, x.device)
                row["split"] = plan["split"]
            try:
                got = moe_decode.expert_gemv_nf4(x, stack, ids[0], tile, variant)
                row["max_abs_diff"] = float((got - reference).abs().max())
                us = _graph_us(
                    lambda c, t=tile, v=variant, x=x, q=stack: moe_decode.expert_gemv_nf4(
                        x, q, ids[c], t, v
                    ),
                    calls,
                )
            except Exception as exc:  # a tile that fails to compile or launch: reported
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            baseline_us = baseline_us or us
            row |= {
                "us": round(us, 2),
                "gbs": round(nbytes / us / 1e3, 1),
                "of_bandwidth": round(nbytes / us / 1e3 / bandwidth, 3),
                "vs_baseline": round(baseline_us / us, 2),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        timed = [r for r in rows if r["proj"] == name and "us" in r]
        best = min(timed, key=lambda r: r["us"])
        print(
            json.dumps(
                {
                    "best": name,
                    "variant": best["variant"],
                    "tile": best["tile"],
                    "us": best["us"],
                    "vs_baseline": best["vs_baseline"],
                    "bound_us": round(nbytes / bandwidth / 1e3, 2),
                    "reference_max_abs": float(reference.abs().max()),
                    "median_rows_us": statistics.median(
                        r["us"] for r in timed if r["variant"] == "rows"
                    ),
                }
            ),
            flush=True,
        )
        del stack
        torch.cuda.empty_cache()
    return rows


def _graph_us(call: Any, calls: int, replays: int = 20) -> float:
    """Median us per call of call(0..calls-1) captured in one CUDA graph."""
    import statistics

    import torch

    for c in range(calls):  # compiles, and warms the allocator outside the capture
        call(c)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in range(calls):
            call(c)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return statistics.median(times)


class _Bnb:
    """Stands in for a Linear4bit: what Nf4Stack.from_linears reads."""

    def __init__(self, data: Any, state: Any) -> None:
        self.weight = data
        self.weight.quant_state = state


def profile_step(decoder: Any, prompt: list[int], steps: int = 5) -> list[dict[str, Any]]:
    """Where one decode step's GPU time goes: the top kernels of `steps` replayed steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        decoder.run(prompt, 4, lambda logits: logits.argmax(-1), lambda token: True)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            decoder.run(prompt, steps + 1, lambda logits: logits.argmax(-1), lambda token: True)
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
        if device_us and event.count:
            rows.append(
                {"name": event.key[:90], "count": event.count, "device_us": round(device_us, 1)}
            )
    rows.sort(key=lambda r: -r["device_us"])
    return rows[:25]


def fp32_referee(model: Any, prompt: list[int], tokens: list[int]) -> Any:
    """Teacher-forced logits of an fp32 copy of `model` (transformers' own forward): the
    referee for which of two bf16 paths is further from the exact math."""
    import copy

    import torch

    exact = copy.deepcopy(model).float()
    ids = torch.tensor([prompt + tokens[:-1]], device="cuda")
    with torch.inference_mode():
        logits = exact(input_ids=ids).logits[0, len(prompt) - 1 :].float().cpu()
    del exact
    torch.cuda.empty_cache()
    return logits


def part_bf16(
    shape: str, workdir: Path, new_tokens: int, bandwidth: float, profile: bool = False
) -> dict[str, Any]:
    import torch
    from transformers import GptOssForCausalLM

    from benchmarks.gpt_oss_checkpoint import VOCAB_20B, gpt_oss_config
    from production.decode import moe_decode
    from production.decode.static_decode import MergedAdapters, StaticDecoder
    from tests.tiny_models import tiny_tokenizer

    tokenizer = tiny_tokenizer(harmony=True)
    config = gpt_oss_config(shape, VOCAB_20B if shape == "20b" else len(tokenizer), tokenizer)
    del config.quantization_config
    started = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GptOssForCausalLM(config).to(torch.bfloat16).eval()
    model.requires_grad_(False)
    built_s = time.perf_counter() - started
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    bound = bandwidth * 1e9 / bytes_per_token(config, 2)
    result: dict[str, Any] = {
        "parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 2),
        "built_s": round(built_s, 1),
        "bound_tok_s": round(bound, 1),
    }
    with torch.inference_mode():
        reference = greedy_generate(model, prompt, new_tokens)
    result["generate"] = {k: reference[k] for k in ("ttft_s", "decode_tok_s")}
    free, _ = torch.cuda.mem_get_info()
    if free > 2.5 * sum(p.numel() for p in model.parameters()) * 4:
        reference["exact"] = fp32_referee(model, prompt, reference["tokens"])

    prepared = moe_decode.prepare(model, RANK)
    merged = MergedAdapters(model)
    decoder = StaticDecoder(model, 2048, "cuda", graphs=True)
    started = time.perf_counter()
    static_run(decoder, prompt, 8)
    result["static"] = {"prepared": prepared, "compile_s": round(time.perf_counter() - started, 1)}
    result["agreement_base"] = agreement(decoder, prompt, reference)
    result["static"]["no_adapter"] = _public(static_run(decoder, prompt, new_tokens))
    adapter_a = random_adapter(workdir / "adapter-a", config, 1)
    adapter_b = random_adapter(workdir / "adapter-b", config, 2)
    started = time.perf_counter()
    merged.load("a", adapter_a)
    merged.activate("a")
    result["static"]["first_merge_s"] = round(time.perf_counter() - started, 2)
    with_adapter = static_run(decoder, prompt, new_tokens)
    result["static"]["adapter"] = _public(with_adapter)
    result["static"]["fraction_of_bound"] = round(with_adapter["decode_tok_s"] / bound, 3)
    result["static"]["hot_swap"] = hot_swap(merged, decoder, prompt, adapter_b, new_tokens)
    if profile:
        result["static"]["profile"] = profile_step(decoder, prompt)
    del model, merged, decoder
    gc.collect()
    torch.cuda.empty_cache()
    return result


def memory_stage(card: CardMemory, stage: str) -> dict[str, Any]:
    """torch's peaks since the last stage (allocated, reserved) and the card's (nvidia-smi:
    the whole process, CUDA context included), then a new stage starts."""
    import torch

    torch.cuda.synchronize()
    row = {
        "torch_peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
        "torch_peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2),
        "torch_allocated_gib": round(torch.cuda.memory_allocated() / GIB, 2),
        "torch_reserved_gib": round(torch.cuda.memory_reserved() / GIB, 2),
    } | card.mark(stage)
    torch.cuda.reset_peak_memory_stats()
    return row


def long_prompt(engine: Any, tokens: int) -> list[int]:
    """A chat prompt of at most `tokens` tokens, as close to it as whole repeats of PROMPT
    allow."""

    def ids(repeats: int) -> list[int]:
        return engine.prompt_ids([{"role": "user", "content": " ".join([PROMPT] * repeats)}], None)

    high = 1
    while len(ids(high)) <= tokens:
        high *= 2
    low = high // 2  # the most repeats that fit lie in [low, high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if len(ids(middle)) <= tokens else (low, middle)
    return ids(low)


def by_context(
    engine: Any, contexts: list[int], new_tokens: int, bound: float
) -> list[dict[str, Any]]:
    """Greedy decode after prompts of about each of `contexts` tokens (the last one clamped
    to fill the window but for the answer): TTFT, tok/s, its fraction of the bound and of the
    shortest context's speed."""
    window = engine.context_window - new_tokens
    wanted = sorted({min(c, window) for c in contexts} | {window})
    rows = []
    for tokens in wanted:
        prompt = long_prompt(engine, tokens)
        run = _public(static_run(engine.static, prompt, new_tokens))
        row = {"context": len(prompt)} | run
        row["fraction_of_bound"] = round(run["decode_tok_s"] / bound, 3)
        row["of_shortest"] = round(run["decode_tok_s"] / (rows or [row])[0]["decode_tok_s"], 3)
        rows.append(row)
        print(json.dumps({"by_context": row}), flush=True)
    return rows


def conversation(engine: Any, turns: int, turn_tokens: int, new_tokens: int) -> dict[str, Any]:
    """A scripted chat through the Engine (the worker's path: chat template, output parsing):
    each turn the person pastes about `turn_tokens` tokens of new text; the answer is greedy,
    at most `new_tokens`. Each turn is answered twice: with the cache the last turn left, then
    prefilled whole (the cache forgotten). TTFT of each, the tokens the cache gave, and
    whether the two answers are the same."""
    from production.engine import Sampling

    greedy = Sampling(temperature=0, max_tokens=new_tokens)
    repeats = max(1, turn_tokens // max(1, engine.count(PROMPT + " ")))
    messages: list[dict[str, Any]] = []
    rows = []
    for turn in range(1, turns + 1):
        text = f"Part {turn} of my notes. " + " ".join([PROMPT] * repeats)
        messages.append({"role": "user", "content": text})
        prompt = engine.prompt_ids(messages, None)
        if len(prompt) + new_tokens > engine.context_window:
            break
        kept = engine.stream(prompt, greedy, lambda d: None, lambda: False)
        engine.forget_prompts()
        fresh = engine.stream(prompt, greedy, lambda d: None, lambda: False)
        row = {
            "turn": turn,
            "prompt_tokens": len(prompt),
            "cached_tokens": kept.cached_tokens,
            "ttft_kept_s": round(kept.ttft_s, 4),
            "ttft_fresh_s": round(fresh.ttft_s, 4),
            "same_answer": (kept.text, kept.reasoning) == (fresh.text, fresh.reasoning),
        }
        rows.append(row)
        print(json.dumps({"conversation": row}), flush=True)
        messages.append({"role": "assistant", "content": kept.text})
    first = rows[0]["ttft_kept_s"]
    return {
        "turns": rows,
        "worst_kept_of_first": round(max(r["ttft_kept_s"] for r in rows) / first, 2),
        "last_fresh_of_kept": round(rows[-1]["ttft_fresh_s"] / rows[-1]["ttft_kept_s"], 2),
        "all_same": all(r["same_answer"] for r in rows),
    }


def part_nf4(
    shape: str,
    workdir: Path,
    new_tokens: int,
    limit_gb: float,
    bandwidth: float,
    profile: bool,
    contexts: list[int],
    turns: int = 0,
    turn_tokens: int = 800,
) -> dict[str, Any]:
    import torch

    from benchmarks.gpt_oss_checkpoint import build
    from common.config import load_settings
    from production.engine import Engine
    from production.model.gpu_memory import apply_limit

    started = time.perf_counter()
    model_dir = build(workdir / f"gpt-oss-{shape}-bnb-4bit", shape, "cuda")
    torch.cuda.empty_cache()  # the checkpoint's random tensors: not the worker's memory
    result: dict[str, Any] = {"checkpoint_s": round(time.perf_counter() - started, 1)}
    apply_limit(limit_gb, "cuda:0")
    home = workdir / "home-nf4"
    home.mkdir(parents=True, exist_ok=True)

    def engine(decode: str) -> Engine:
        (home / "config.toml").write_text(
            f'[model]\npreset = "gpt-oss-20b"\nbase_model = "{model_dir}"\n'
            f'backend = "transformers"\n\n[server]\ndecode = "{decode}"\n'
        )
        torch.cuda.reset_peak_memory_stats()
        return Engine(load_settings(home), "cuda:0")

    started = time.perf_counter()
    slow = engine("generate")
    config = slow.model.config
    prompt = slow.prompt_ids([{"role": "user", "content": PROMPT}], None)
    result["generate"] = {"engine_ready_s": round(time.perf_counter() - started, 1)}
    with torch.inference_mode():
        reference = greedy_generate(slow.model, prompt, min(new_tokens, 64))
    result["generate"] |= {k: reference[k] for k in ("ttft_s", "decode_tok_s")}
    del slow
    gc.collect()
    torch.cuda.empty_cache()
    result["gib_after_generate_engine_freed"] = round(torch.cuda.memory_allocated() / 2**30, 2)

    compiles = _compiles()
    # The worker's memory: what the generate() engine left is freed above; what remains on
    # the card in this process is the CUDA context and the kernels it loaded.
    with CardMemory() as card:
        memory = {"before_start_up": memory_stage(card, "before start-up")}
        started = time.perf_counter()
        fast = engine("static")
        result["static"] = {
            "decode": fast.decode,
            "engine_ready_s": round(time.perf_counter() - started, 1),
            "compiles_at_start": _compiles() - compiles,
        }
        memory["start_up"] = memory_stage(card, "start-up")
        bound = bandwidth * 1e9 / bytes_per_token(config, 0.5 + 1 / 64)
        result["bound_tok_s"] = round(bound, 1)
        result["agreement_base"] = agreement(fast.static, prompt, reference)
        adapter_a = random_adapter(workdir / "adapter-a", config, 1)
        adapter_b = random_adapter(workdir / "adapter-b", config, 2)
        fast.load_adapter("a", adapter_a)
        fast.activate("a")
        with_adapter = static_run(fast.static, prompt, new_tokens)
        result["static"]["adapter"] = _public(with_adapter)
        result["static"]["fraction_of_bound"] = round(with_adapter["decode_tok_s"] / bound, 3)
        result["static"]["hot_swap"] = hot_swap(
            fast.merged, fast.static, prompt, adapter_b, new_tokens
        )
        # Decode as the conversation grows, up to a prompt that fills the window but for the
        # answer (the largest prefill it serves): a step should cost what the tokens present
        # cost, not the window reserved.
        rows = by_context(fast, contexts, new_tokens, bound)
        result["static"]["by_context"] = rows
        result["static"]["window_prompt"] = rows[-1]
        if turns:
            result["static"]["conversation"] = conversation(fast, turns, turn_tokens, new_tokens)
        memory["steady"] = memory_stage(card, "steady")
        if profile:
            result["static"]["profile"] = profile_step(fast.static, prompt)
    result["static"]["memory"] = memory
    result["limit_gb"] = limit_gb
    return result


def _public(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "tokens"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="20b", choices=["20b", "small", "tiny"])
    parser.add_argument("--parts", default="bf16,nf4", help="bf16 first: nf4 caps memory")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--limit-gb", type=float, default=24.0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/moe-decode"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--profile", action="store_true", help="top kernels of a decode step")
    parser.add_argument("--sweep", action="store_true", help="kernel tile sizes' bandwidth")
    parser.add_argument(
        "--kernels",
        action="store_true",
        help="NF4 kernel variants x tiles: us a call, GB/s, against the baseline kernel",
    )
    parser.add_argument(
        "--contexts",
        default="256,4096,16384,32768",
        help="nf4: prompt lengths to decode after (clamped to the serving window)",
    )
    parser.add_argument(
        "--turns", type=int, default=10, help="nf4: a scripted chat's turns (0: none)"
    )
    parser.add_argument("--turn-tokens", type=int, default=800, help="new text per turn")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from production.model.device_pin import use_serving_allocator

    use_serving_allocator()  # the API worker's, before CUDA starts
    import torch
    import transformers

    from benchmarks.gpu_suite import bandwidth_gbs

    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "shape": args.shape,
        "new_tokens": args.new_tokens,
        "bandwidth_gbs": round(bandwidth_gbs(), 1),  # benchmarks.gpu_suite's copy
    }
    print(json.dumps(results), flush=True)
    if args.sweep:
        results["sweep"] = sweep(args.shape)
        for row in sorted(results["sweep"], key=lambda r: (r["kernel"], r["proj"], -r["gbs"])):
            print(json.dumps(row), flush=True)
    if args.kernels:
        results["nf4_kernels"] = nf4_kernels(args.shape, results["bandwidth_gbs"])
    for part in filter(None, args.parts.split(",")):
        started = time.perf_counter()
        if part == "bf16":
            row = part_bf16(
                args.shape, args.workdir / part, args.new_tokens, results["bandwidth_gbs"]
            )
        elif part == "nf4":
            row = part_nf4(
                args.shape,
                args.workdir / part,
                args.new_tokens,
                args.limit_gb,
                results["bandwidth_gbs"],
                args.profile,
                [int(c) for c in args.contexts.split(",") if c],
                args.turns,
                args.turn_tokens,
            )
        else:
            raise SystemExit(f"unknown part {part!r}: bf16 or nf4")
        results[part] = row | {"part_s": round(time.perf_counter() - started, 1)}
        print(json.dumps({part: results[part]}), flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    device = results["device"].split()[-1].lower()
    out = args.out or RESULTS / f"moe-decode-{device}-{args.shape}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
