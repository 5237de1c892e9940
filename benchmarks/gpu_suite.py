"""GPU measurements in one call: serving decode speed against the memory-bandwidth bound, and
training throughput of the product's path against plain TRL.

    python -m benchmarks.gpu_suite [--parts serving,training] [--new-tokens 256] [--steps 30]
        [--llama plain,plain_liger,product,product16,product16_padding_free,product16_packed]
        [--moe plain,product16]

On a random-initialised 1.07 B Llama-shaped bf16 model (hidden 2048, 16 layers, 32 heads,
8 KV heads, vocab 49152; no download) with a LoRA adapter (r=16, all 7 projections, random
B so it changes the output):

- bound: decode at batch 1 reads every weight once per token, so tokens/s <= HBM bandwidth /
  weight bytes. Bandwidth is measured here (a 4 GiB device-to-device copy, read + write).
- serving, greedy, batch 1, `--new-tokens` tokens, after one warm-up, each in its own process
  (Unsloth patches transformers on import, so the plain baseline must never see it):
  plain `generate()` over PEFT; the product's Engine with decode "generate" (transformers +
  PEFT), with decode "static" (StaticCache, adapter merged, CUDA-graph step; also a hot swap
  to a second adapter: its time, compiles after it, the weights restored exactly) and with
  the Unsloth backend (`for_inference`). TTFT and decode tokens/s (tokens after the first /
  time after the first).
- training, same synthetic SFT rows (prompt/completion, 64-448 tokens), seed, batch 8, LR and
  steps (`--steps` timed after 5 untimed warm-up steps): plain TRL SFTTrainer + PEFT in bf16;
  the same with Liger kernels (`use_liger_kernel`); the product's path (the loader the job
  uses: Unsloth, its get_peft_model with gradient checkpointing "unsloth", the job's
  TrainingArguments incl. 8-bit AdamW and `training.padding_free`) on a 4-bit and on a
  16-bit preset, and those with padding-free batches forced on or with packing on. Non-padding
  tokens/s and peak CUDA memory. `--moe` runs chosen variants on a
  GPT-OSS-shaped mixture of experts too.

Writes benchmarks/results/gpu-<device>-<time>.json with the device, versions and figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
SHAPE = {"hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "vocab_size": 49152}
PROMPT = "Write a very long story about a dragon and a knight."
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------ the pieces


def build(workdir: Path, tokenizer_dir: Path | None = None) -> tuple[Path, Path]:
    """The model folder and a LoRA adapter folder for it (a second one, `adapter-b` beside
    it, is what the static engine hot-swaps to)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import tiny_llama

    model_dir = tiny_llama(
        workdir / "model", intermediate=8192, tokenizer_dir=tokenizer_dir, **SHAPE
    )
    for seed, name in ((1, "adapter"), (2, "adapter-b")):
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        torch.manual_seed(seed)
        config = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
        get_peft_model(base, config).save_pretrained(workdir / name)
    return model_dir, workdir / "adapter"


def bandwidth_gbs() -> float:
    import torch

    n = 4 * 1024**3 // 2
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    started = time.perf_counter()
    reps = 20
    for _ in range(reps):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / reps
    return 2 * src.numel() * 2 / seconds / 1e9  # read + write


def _home(workdir: Path, model_dir: Path, backend: str, load_in_4bit: bool, decode: str = "auto"):
    from tests.tiny_models import model_home

    home = workdir / f"home-{backend}-{int(load_in_4bit)}-{decode}"
    return model_home(
        home,
        model_dir,
        backend=backend,
        load_in_4bit=load_in_4bit,
        max_seq_length=2048,
        more=f'[server]\ndecode = "{decode}"\n',
    )


def serve_plain(model_dir: Path, adapter: Path, new_tokens: int) -> dict[str, Any]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to("cuda")
    model = PeftModel.from_pretrained(base, adapter).eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = (ids["input_ids"] if hasattr(ids, "keys") else ids).to("cuda")

    def once() -> dict[str, Any]:
        from transformers.generation.streamers import BaseStreamer

        stamps: list[float] = []

        class Stamp(BaseStreamer):
            def put(self, value: Any) -> None:
                stamps.append(time.perf_counter())

            def end(self) -> None:
                pass

        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                streamer=Stamp(),
                pad_token_id=tokenizer.pad_token_id,
            )
        tokens = stamps[1:]  # the first put() is the prompt
        return _speed(started, tokens)

    once()
    return once() | {"peak_gb": torch.cuda.max_memory_allocated() / 1e9}


ENGINES = {  # name: (model.backend, server.decode)
    "generate": ("transformers", "generate"),
    "static": ("transformers", "static"),
    "unsloth": ("unsloth", "generate"),
}


def serve_engine(workdir: Path, model_dir: Path, adapter: Path, name: str, new_tokens: int):
    """The product's Engine; for the static one also the hot swap: adapter A, swap to B (time,
    the first request after it, compiles), back to A (same answer as before)."""
    backend, decode = ENGINES[name]
    home = _home(workdir, model_dir, backend, False, decode)
    from common.config import load_settings
    from production.model.device_pin import pin_device

    settings = load_settings(home)
    device = pin_device(settings, "production")
    import torch

    from production.engine import Engine, Sampling

    started = time.perf_counter()
    engine = Engine(settings, device)
    ready_s = time.perf_counter() - started
    prompt = engine.prompt_ids([{"role": "user", "content": PROMPT}], None)

    def once() -> dict[str, Any]:
        # From the engine's own Outcome: with random weights many ids decode to no text, so
        # counting text deltas would undercount; the token count and TTFT are exact.
        out = engine.stream(
            prompt, Sampling(temperature=0, max_tokens=new_tokens), lambda d: None, lambda: False
        )
        decode_s = out.seconds - (out.ttft_s or 0)
        return {
            "tokens": out.completion_tokens,
            "ttft_s": None if out.ttft_s is None else round(out.ttft_s, 4),
            "decode_tok_s": round((out.completion_tokens - 1) / decode_s, 1) if decode_s else None,
            "finish": out.finish_reason,
            "text": out.text,
        }

    result: dict[str, Any] = {"backend": engine.backend, "decode": engine.decode}
    result["engine_ready_s"] = round(ready_s, 1)
    if name == "static":
        once()
        result["no_adapter"] = _drop_text(once())
    engine.load_adapter("a", adapter)
    engine.activate("a")
    once()
    first = once()
    result |= _drop_text(first) | {"text_head": first["text"][:200]}
    if name == "static":
        result["hot_swap"] = _hot_swap(engine, adapter.parent / "adapter-b", once, first["text"])
    return result | {"peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)}


def _drop_text(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "text"}


def _hot_swap(engine: Any, adapter_b: Path, once: Any, text_a: str) -> dict[str, Any]:
    import torch
    import torch._dynamo.utils as dynamo_utils

    def weights() -> float:
        layers = engine.merged.layers
        return sum(float(layers[name].weight.double().sum()) for name in engine.merged.original)

    merged_a = weights()
    graphs_before = dynamo_utils.counters["stats"]["unique_graphs"]
    torch.cuda.synchronize()
    started = time.perf_counter()
    engine.load_adapter("b", adapter_b)
    engine.activate("b")
    engine.unload_adapter("a")
    torch.cuda.synchronize()
    swap_s = time.perf_counter() - started
    after = once()
    engine.load_adapter("a", adapter_b.parent / "adapter")
    engine.activate("a")
    back = once()
    # Not the greedy text: on this random model (top-2 logit gap 0.1) even eager decoding on
    # the GPU is not repeatable past a few dozen tokens, so A's weights are compared instead.
    return {
        "swap_s": round(swap_s, 3),
        "first_after_swap": _drop_text(after),
        "answer_changed": after["text"] != text_a,
        "back_to_a_weights_identical": weights() == merged_a,
        "back_to_a": _drop_text(back),
        "new_compiles": dynamo_utils.counters["stats"]["unique_graphs"] - graphs_before,
    }


def _speed(started: float, stamps: list[float]) -> dict[str, Any]:
    if len(stamps) < 2:
        return {"tokens": len(stamps), "ttft_s": None, "decode_tok_s": None}
    return {
        "tokens": len(stamps),
        "ttft_s": round(stamps[0] - started, 4),
        "decode_tok_s": round((len(stamps) - 1) / (stamps[-1] - stamps[0]), 1),
    }


def _rows(tokenizer: Any, count: int = 256) -> list[dict[str, str]]:
    import random

    rng = random.Random(0)
    words = [
        "the",
        "a",
        "knight",
        "dragon",
        "castle",
        "river",
        "gold",
        "night",
        "sword",
        "ran",
        "over",
        "under",
        "bright",
        "dark",
    ]
    rows = []
    for _ in range(count):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(16, 96)))
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(48, 352)))
        rows.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "completion": [{"role": "assistant", "content": answer}],
            }
        )
    return rows


class _Tokens:
    """Counts non-padding tokens the trainer feeds the model."""

    def __init__(self) -> None:
        self.count = 0

    def hook(self, module: Any, args: Any, kwargs: Any) -> None:
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids")
        if mask is not None and mask.dim() == 2:
            self.count += int(mask.sum())
        elif ids is not None:
            self.count += int(ids.numel())


WARMUP_STEPS = 5  # not timed: CUDA context, kernel autotuning and compiles land here

TRAIN_VARIANTS = {  # name: what it changes against plain TRL + PEFT in bf16 (args: SFTConfig)
    "plain": {},
    # Liger's fused RMSNorm/RoPE/SwiGLU/linear+cross-entropy
    "plain_liger": {"args": {"use_liger_kernel": True}},
    "product": {"load_in_4bit": True},  # the job's path on a 4-bit preset (QLoRA)
    "product16": {"load_in_4bit": False},  # the job's path on a 16-bit preset
    # Ablations: padding-free batches forced on (the job leaves them off without flash-attn:
    # training.padding_free), and packing rows together (the job does not pack).
    "product_padding_free": {"load_in_4bit": True, "args": {"padding_free": True}},
    "product16_padding_free": {"load_in_4bit": False, "args": {"padding_free": True}},
    "product16_packed": {"load_in_4bit": False, "args": {"packing": True}},
}


def train_speed(workdir: Path, model_dir: Path, path: str, steps: int) -> dict[str, Any]:
    """path 'plain*': TRL + PEFT bf16. 'product*': the job's loader, LoRA and arguments."""
    variant = TRAIN_VARIANTS[path]
    if path.startswith("product"):
        home = _home(workdir, model_dir, "unsloth", variant["load_in_4bit"])
        from common.config import load_settings
        from production.model.device_pin import pin_device

        settings = load_settings(home)
        device = pin_device(settings, "development")
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    common = {
        "output_dir": str(workdir / f"out-{path}"),
        "max_steps": steps + WARMUP_STEPS,
        "per_device_train_batch_size": 8,
        "learning_rate": 2e-4,
        "logging_steps": 5,
        "report_to": "none",
        "seed": 0,
        "bf16": True,
        "save_strategy": "no",
        "max_length": 1024,
        "completion_only_loss": True,
        "disable_tqdm": True,
    }
    if path.startswith("plain"):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to("cuda")
        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM")
        )
        args = SFTConfig(**common, **variant.get("args", {}))
    else:
        from development import train
        from production.model.loading import load_model

        settings.training.profiles["bench"] = settings.profile("quick_test").model_copy(
            update={
                "max_steps": steps + WARMUP_STEPS,
                "batch_size": 8,
                "lora_r": 16,
                "learning_rate": 2e-4,
            }
        )
        model, tokenizer = load_model(settings, device, for_training=True)
        model = train._attach_lora(model, settings, "bench", "unsloth", "cuda:0")
        stage = train.Stage("sft", 256, steps + WARMUP_STEPS, 2e-4, "bench")
        product = train._common_args(settings, "bench", device, workdir / "out-product", stage, 8)
        args = SFTConfig(
            **(product | {k: common[k] for k in ("logging_steps", "save_strategy", "max_length")}),
            **(
                {
                    "completion_only_loss": True,
                    "padding_free": train.padding_free(settings, "unsloth"),
                }
                | variant.get("args", {})
            ),
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(_rows(tokenizer)),
        processing_class=tokenizer,
    )
    counter = _Tokens()
    trainer.model.register_forward_pre_hook(counter.hook, with_kwargs=True)
    clock = _after_warm_up(counter)
    trainer.add_callback(clock)
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    rows_seen = steps * trainer.args.per_device_train_batch_size
    rows_seen *= trainer.args.gradient_accumulation_steps
    torch.cuda.reset_peak_memory_stats()
    result = trainer.train()
    seconds = time.perf_counter() - clock.started
    # The hook sees what reaches the model; the estimate (rows seen x mean row length) is the
    # cross-check for a path that calls the inner model directly.
    estimate = rows_seen * sum(lengths) / len(lengths)
    tokens = (counter.count - clock.tokens_before) or estimate
    return {
        "path": path,
        "steps_timed": steps,
        "warmup_steps_not_timed": WARMUP_STEPS,
        "batch": trainer.args.per_device_train_batch_size,
        "grad_accum": trainer.args.gradient_accumulation_steps,
        "seconds": round(seconds, 2),
        "non_padding_tokens_hooked": counter.count - clock.tokens_before,
        "non_padding_tokens_estimated": round(estimate),
        "tokens_per_s": round(tokens / seconds, 1),
        "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
        "train_loss": round(result.training_loss, 4),
        "optim": str(trainer.args.optim),
        "padding_free": bool(getattr(trainer.args, "padding_free", False)),
        "liger": bool(getattr(trainer.args, "use_liger_kernel", False)),
        "packing": bool(getattr(trainer.args, "packing", False)),
    }


def _after_warm_up(counter: _Tokens) -> Any:
    """A TrainerCallback whose `started` and `tokens_before` are taken after WARMUP_STEPS."""
    import torch
    from transformers import TrainerCallback

    class AfterWarmUp(TrainerCallback):
        started = time.perf_counter()
        tokens_before = 0

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == WARMUP_STEPS:
                torch.cuda.synchronize()
                self.started = time.perf_counter()
                self.tokens_before = counter.count

    return AfterWarmUp()


# ---------------------------------------------------------------------------- driver


def write_results(kind: str, results: dict[str, Any]) -> Path:
    """benchmarks/results/<kind>-<device>-<time>.json, and a copy under $OUT (the device
    tool brings back what a run leaves there)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = results["device"].replace("NVIDIA ", "").replace(" ", "-").lower()
    out = RESULTS / f"{kind}-{name}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], out.name).write_text(out.read_text())
    return out


def _child(part: str, workdir: Path, model_dir: Path, adapter: Path, opts: argparse.Namespace):
    """Run one part in a fresh process; returns its JSON."""
    code = (
        "import json, sys; from pathlib import Path; from benchmarks import gpu_suite as g; "
        f"print('RESULT ' + json.dumps(g._part({part!r}, Path({str(workdir)!r}), "
        f"Path({str(model_dir)!r}), Path({str(adapter)!r}), {opts.new_tokens}, {opts.steps})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=900
    )
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or not line:
        return {"error": done.stderr[-3000:]}
    return json.loads(line[-1].removeprefix("RESULT "))


def _part(part: str, workdir: Path, model_dir: Path, adapter: Path, tokens: int, steps: int):
    if part == "serve_plain":
        return serve_plain(model_dir, adapter, tokens)
    if part.startswith("serve_"):
        return serve_engine(workdir, model_dir, adapter, part.removeprefix("serve_"), tokens)
    return train_speed(workdir, model_dir, part.split("_", 2)[2], steps)  # train_<model>_<path>


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="serving,training")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="timed steps after the warm-up")
    parser.add_argument(
        "--moe", default="", help="training variants to run on a GPT-OSS-shaped MoE too"
    )
    parser.add_argument(
        "--llama",
        default=",".join(TRAIN_VARIANTS),
        help="training variants on the Llama ('' for none)",
    )
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="tokenizer folder (default: the tiny one)"
    )
    opts = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.stderr.write("gpu_suite needs a CUDA GPU\n")
        return 2
    import peft
    import transformers

    parts = opts.parts.split(",")
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "model": SHAPE | {"intermediate": 8192, "dtype": "bfloat16"},
    }
    from importlib.metadata import PackageNotFoundError, version

    for package in ("trl", "unsloth", "bitsandbytes"):
        # Not imported here: Unsloth patches transformers, and the plain baselines run in
        # processes that must not see that.
        try:
            results["versions"][package] = version(package)
        except PackageNotFoundError:
            results["versions"][package] = None
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir, adapter = build(workdir, opts.tokenizer)
        weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        results["weight_bytes"] = weights
        if "serving" in parts:
            bw = bandwidth_gbs()
            bound = bw * 1e9 / weights
            results["bandwidth_gbs"] = round(bw, 1)
            results["bound_tok_s"] = round(bound, 1)
            serving = {
                name: _child(f"serve_{name}", workdir, model_dir, adapter, opts)
                for name in ("plain", *ENGINES)
            }
            for row in serving.values():
                if row.get("decode_tok_s"):
                    row["of_bound"] = round(row["decode_tok_s"] / bound, 4)
                    row["vs_plain"] = (
                        round(row["decode_tok_s"] / serving["plain"]["decode_tok_s"], 2)
                        if serving["plain"].get("decode_tok_s")
                        else None
                    )
            results["serving"] = serving
        if "training" in parts:
            # The same rows, seed and settings on each model; a GPT-OSS-shaped MoE as well
            # (16 experts, 2 per token, sliding + full attention; ~0.5 B parameters).
            from tests.tiny_models import tiny_gpt_oss

            models = {"llama": (model_dir, opts.llama)} if opts.llama else {}
            if opts.moe:
                moe = tiny_gpt_oss(workdir / "moe", hidden=1024, layers=8, experts=16)
                models["moe"] = (moe, opts.moe)
                results["moe_model"] = {"hidden": 1024, "layers": 8, "experts": 16, "per_token": 2}
            training: dict[str, Any] = {}
            for model_name, (path, variants) in models.items():
                rows = {
                    name: _child(f"train_{model_name}_{name}", workdir, path, adapter, opts)
                    for name in variants.split(",")
                    if name
                }
                plain = rows.get("plain", {})
                for row in rows.values():
                    if plain.get("tokens_per_s") and row.get("tokens_per_s"):
                        row["vs_plain_tokens_per_s"] = round(
                            row["tokens_per_s"] / plain["tokens_per_s"], 2
                        )
                        row["vs_plain_peak_memory"] = round(row["peak_gb"] / plain["peak_gb"], 2)
                training[model_name] = rows
            results["training"] = training
    write_results("gpu", results)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
