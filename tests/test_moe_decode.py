"""GPT-OSS on the static decoder (production.decode.moe_decode), on the CPU: the expert kernels'
math (in Triton's interpreter) against bitsandbytes' own dequantization, and the product's
Engine with decode "static" answering exactly what generate() over PEFT answers, on the 4-bit
layout and on transformers' fused bf16 experts, with LoRA on attention and every expert,
through adapter swaps and past the sliding window. tests/test_gpu.py runs the kernels on CUDA.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

from benchmarks.gpt_oss_checkpoint import build  # noqa: E402
from benchmarks.moe_decode import random_adapter  # noqa: E402
from common.config import load_settings  # noqa: E402
from production.decode import moe_decode  # noqa: E402
from production.engine import AdapterLoadError, Engine, Sampling  # noqa: E402
from tests.conftest import run_in_triton_interpreter  # noqa: E402
from tests.tiny_models import FIXED_RENDER_DATE, model_home  # noqa: E402

# Longer than the tiny model's 128-token sliding window, so the sliding layers' mask matters.
LONG_QUESTION = "What is the capital of France? " * 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("moe") / "gpt-oss-tiny-bnb-4bit", "tiny", "cpu")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Path:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint)
    return random_adapter(tmp_path_factory.mktemp("lora") / "attention-and-experts", config, 1)


def _linears(experts: int, out_features: int, in_features: int, nested: bool) -> list:
    """bitsandbytes-quantized weights, shaped as Nf4Stack reads a Linear4bit."""
    torch.manual_seed(0)
    layers = []
    for _ in range(experts):
        weight = torch.randn(out_features, in_features, dtype=torch.bfloat16)
        packed, state = bnb_functional.quantize_4bit(
            weight, quant_type="nf4", compress_statistics=nested, blocksize=64
        )
        layers.append(SimpleNamespace(weight=SimpleNamespace(data=packed, quant_state=state)))
    return layers


@pytest.mark.parametrize("nested", [True, False])
def test_stacked_experts_dequantize_exactly_as_bitsandbytes(nested: bool) -> None:
    # 320 x 256 weights: 1,280 blocks, so the double-quant scales span 5 nested blocks.
    layers = _linears(3, 320, 256, nested)
    stack = moe_decode.Nf4Stack.from_linears(layers)
    assert stack.nested is nested
    for i, layer in enumerate(layers):
        expected = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert torch.equal(stack.dequantize(i, torch.bfloat16), expected)


_KERNEL_CHECK = """
import torch, bitsandbytes.functional as F
from types import SimpleNamespace
from production.decode import moe_decode as md
torch.manual_seed(0)
E, K, N = 5, 192, 80  # K: 3 quant blocks; N: not a multiple of the kn tile
ids = torch.tensor([3, 0, 3])
weight = torch.randn(E, K, N, dtype=torch.bfloat16)
for x in (torch.randn(1, K, dtype=torch.bfloat16), torch.randn(3, K, dtype=torch.bfloat16)):
    got, want = md.expert_gemv_kn(x, weight, ids), md.reference_gemv_kn(x, weight, ids)
    assert (got - want).abs().max() < 1e-3, ("kn", (got - want).abs().max())
    for nested in (True, False):
        layers = []
        for _ in range(E):
            q, s = F.quantize_4bit(torch.randn(N, K, dtype=torch.bfloat16), quant_type="nf4",
                                   compress_statistics=nested, blocksize=64)
            layers.append(SimpleNamespace(weight=SimpleNamespace(data=q, quant_state=s)))
        stack = md.Nf4Stack.from_linears(layers)
        got, want = md.expert_gemv_nf4(x, stack, ids), md.reference_gemv_nf4(x, stack, ids)
        assert (got - want).abs().max() < 1e-3, ("nf4", nested, (got - want).abs().max())
        for e in (0, 4):  # the prompt path's dequantization: bitsandbytes' values
            want = F.dequantize_4bit(layers[e].weight.data, layers[e].weight.quant_state).float()
            got = stack._dequantize_kernel(e, torch.bfloat16).float()
            # The interpreter truncates fp32 to bf16 (the GPU rounds): within one bf16 step.
            assert torch.allclose(got, want, rtol=2**-7, atol=0), ("dequantize", e)
print("kernels agree")
"""


def test_the_triton_kernels_compute_the_reference_math_in_the_interpreter() -> None:
    """The kernels the GPU runs, executed by Triton's interpreter on the CPU: same expert
    addressing, split-K ranges, masks and NF4 decoding (double quant or not) as the torch
    reference the CPU serves with."""
    pytest.importorskip("triton")
    run = run_in_triton_interpreter(_KERNEL_CHECK)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "kernels agree" in run.stdout


_VARIANTS_CHECK = """
import torch, bitsandbytes.functional as F
from types import SimpleNamespace
from production.decode import moe_decode as md
torch.manual_seed(0)
E, K = 5, 192  # 3 quant blocks: K splits 1 and 3
ids = torch.tensor([3, 0, 3])
tiles = {
    "baseline": [None, {"BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 4}],
    "rows": [
        None,  # rows_tile: 256 rows, so N = 80 is masked
        {"BLOCK_N": 16, "num_warps": 1, "SPLIT": 1},
        {"BLOCK_N": 32, "num_warps": 1, "SPLIT": 3},
        {"BLOCK_N": 64, "num_warps": 1, "SPLIT": 3, "ATOMIC": True},
        {"BLOCK_N": 16, "num_warps": 1, "SPLIT": 3, "DECODE": "global"},
    ],
}
assert set(tiles) == set(md.NF4_VARIANTS)
checked = 0
for n in (80, 64):  # 64: every rows tile above divides it (no row masks)
    for nested in (True, False):
        layers = []
        for _ in range(E):
            q, s = F.quantize_4bit(torch.randn(n, K, dtype=torch.bfloat16), quant_type="nf4",
                                   compress_statistics=nested, blocksize=64)
            layers.append(SimpleNamespace(weight=SimpleNamespace(data=q, quant_state=s)))
        stack = md.Nf4Stack.from_linears(layers)
        # one activation row for every slot (gate_up) and one a slot (down)
        for x in (torch.randn(1, K, dtype=torch.bfloat16), torch.randn(3, K, dtype=torch.bfloat16)):
            want = md.reference_gemv_nf4(x, stack, ids)
            for variant, variant_tiles in tiles.items():
                for tile in variant_tiles:
                    got = md.expert_gemv_nf4(x, stack, ids, tile, variant)
                    diff = (got - want).abs().max()
                    assert diff < 1e-3, (variant, tile, n, nested, diff)
                    checked += 1
print("variants agree", checked)
"""


def test_every_nf4_kernel_variant_computes_the_reference_in_the_interpreter() -> None:
    """Each NF4 kernel (NF4_VARIANTS) at several tiles, in Triton's interpreter: double quant
    on and off, three slots on two experts (one repeated), one activation row or one a slot,
    K in one range or split (partial sums added by a second kernel or by atomics), rows that
    fill the tile or need masks, the NF4 table read from shared memory or global memory."""
    pytest.importorskip("triton")
    run = run_in_triton_interpreter(_VARIANTS_CHECK)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert "variants agree 56" in run.stdout, run.stdout


def test_the_rows_kernel_splits_k_evenly_and_tiles_the_20b_rows_without_masks() -> None:
    """The rows kernel's plan for GPT-OSS-20B (K = 2880: 45 quant blocks): every K range
    holds the same number of blocks (its loop has no bound check), and the default tiles
    divide gate_up's 5760 and down's 2880 rows."""
    cpu = torch.device("cpu")
    for n in (5760, 2880):
        tile = moe_decode.rows_tile(n)
        assert n % tile["BLOCK_N"] == 0
        plan = moe_decode.rows_plan(n, 2880, 4, None, cpu)
        assert plan["split"] * plan["BLOCKS_PER_SPLIT"] == 45
    for wanted in range(1, 60):
        split = moe_decode.rows_plan(
            2880, 2880, 4, {"BLOCK_N": 64, "num_warps": 1, "SPLIT": wanted}, cpu
        )["split"]
        assert 45 % split == 0
    assert moe_decode.rows_plan(64, 64, 1, None, cpu)["split"] == 1  # one block: one range


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_nf4_kernel_variant_computes_the_reference_on_the_gpu() -> None:
    """Each NF4 kernel on CUDA at GPT-OSS-20B's expert shapes (random double-quant stacks,
    bf16 activations, 4 slots): within fp32 rounding of reference_gemv_nf4, and the layer
    runs the default variant."""
    from benchmarks.moe_decode import random_nf4_stack, rows_tiles

    ids = torch.tensor([5, 0, 7, 5], device="cuda")
    for k, n in ((2880, 5760), (2880, 2880)):
        stack = random_nf4_stack(8, n, k)
        for rows in (1, 4):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            want = moe_decode.reference_gemv_nf4(x, stack, ids)
            configs = [("baseline", None), ("rows", None)] + [
                ("rows", tile) for tile in rows_tiles(n)
            ]
            for variant, tile in configs:
                got = moe_decode.expert_gemv_nf4(x, stack, ids, tile, variant)
                diff = float((got - want).abs().max())
                print(f"{n}x{k} x[{rows}] {variant} {tile}: max |diff| {diff:.2e}")
                assert diff < 1e-4 * max(1.0, float(want.abs().max())), (variant, tile, diff)
    assert moe_decode.NF4_VARIANT == "rows"


def _engine(home: Path, decode: str, **model: object) -> Engine:
    # fp32: the static path and PEFT's then agree to ~1e-6, so greedy answers compare exactly.
    overrides = {"server": {"decode": decode}, "model": {"dtype": "float32", **model}}
    return Engine(load_settings(home, overrides), "cpu")


def _answers(engine: Engine, adapters: list[str | None]) -> list[str]:
    greedy = Sampling(temperature=0, max_tokens=16)
    out = []
    for adapter_id in adapters:
        engine.activate(adapter_id)
        for question in ("What is the capital of France?", LONG_QUESTION):
            # The serving prompt, rendered on a fixed date (see FIXED_RENDER_DATE).
            prompt = engine.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
                reasoning_effort="medium",
                current_date=FIXED_RENDER_DATE,
            )
            out.append(engine.stream(prompt, greedy, lambda d: None, lambda: False).text)
    return out


def test_4bit_gpt_oss_static_decode_answers_as_peft_generate_does(
    tmp_path: Path, checkpoint: Path, adapter: Path
) -> None:
    home = model_home(tmp_path / "home", checkpoint, load_in_4bit=True, chat_format="harmony")
    order = [None, "a", None, "a"]
    reference = _engine(home, "generate")
    reference.load_adapter("a", adapter)
    expected = _answers(reference, order)  # two questions per adapter
    assert expected[0:2] != expected[2:4], "the adapter changes the answers"
    del reference

    engine = _engine(home, "static")
    assert engine.decode == "static"
    experts = engine.model.model.layers[0].mlp.experts
    assert isinstance(experts, moe_decode.DecodeExperts) and experts.quantized
    engine.load_adapter("a", adapter)
    # base -> a -> base -> a: the attention merge restores exactly, the expert buffers clear.
    assert _answers(engine, order) == expected


def test_fused_bf16_gpt_oss_with_expert_lora_answers_as_the_4bit_split_model(
    tmp_path: Path, checkpoint: Path, adapter: Path
) -> None:
    """transformers' fused experts (the bf16 kernel's layout) holding the 4-bit checkpoint's
    dequantized weights, serving an adapter saved on Unsloth's split expert names, answer
    what PEFT answers on the split 4-bit model: gate/up interleaving, the [in, out] storage
    and the expert LoRA's placement all line up."""
    from transformers import AutoTokenizer

    from production.model.loading import load_model
    from tests.test_gpt_oss_layout import _fused_reference

    split_home = model_home(
        tmp_path / "split", checkpoint, load_in_4bit=True, chat_format="harmony"
    )
    split, _ = load_model(
        load_settings(split_home, {"model": {"dtype": "float32"}}), "cpu", for_training=False
    )
    fused_dir = tmp_path / "fused"
    _fused_reference(split, checkpoint).save_pretrained(fused_dir)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(fused_dir)
    del split
    reference = _engine(split_home, "generate")
    reference.load_adapter("a", adapter)
    expected = _answers(reference, [None, "a"])
    del reference

    fused_home = model_home(tmp_path / "fused-home", fused_dir, chat_format="harmony")
    engine = _engine(fused_home, "static")
    experts = engine.model.model.layers[0].mlp.experts
    assert isinstance(experts, moe_decode.DecodeExperts) and not experts.quantized
    # Attention that reads only the tokens present, sliding layers on a ring of their window.
    from production.decode import decode_attention

    assert engine.model.config._attn_implementation == decode_attention.NAME
    rings = [layer for layer in engine.static.cache.layers if type(layer).__name__ == "RingLayer"]
    assert len(rings) == engine.model.config.layer_types.count("sliding_attention") > 0
    engine.load_adapter("a", adapter)
    assert _answers(engine, [None, "a"]) == expected


def test_auto_decode_takes_the_expert_kernels_for_gpt_oss_on_cuda_only(tmp_path: Path) -> None:
    from common.devices import choose_backend, serving_decode

    def settings(folder: Path, config: str, **model: object):
        folder.mkdir()
        (folder / "config.json").write_text(config)
        return load_settings(model_home(tmp_path / f"home-{folder.name}", folder), {"model": model})

    gpt_oss = settings(tmp_path / "gpt-oss", '{"model_type": "gpt_oss", "num_local_experts": 32}')
    other_moe = settings(tmp_path / "qwen-moe", '{"model_type": "qwen3_moe", "num_experts": 8}')
    quantized = gpt_oss.model_copy(
        update={"model": gpt_oss.model.model_copy(update={"load_in_4bit": True})}
    )
    assert serving_decode(gpt_oss, "cuda:0") == "static"
    assert serving_decode(quantized, "cuda:0") == "static"  # NF4 experts: their own kernel
    assert serving_decode(gpt_oss, "cpu") == "generate"
    assert serving_decode(other_moe, "cuda:0") == "generate"
    unsloth = gpt_oss.model_copy(
        update={"model": gpt_oss.model.model_copy(update={"backend": "unsloth"})}
    )
    assert serving_decode(unsloth, "cuda:0") == "generate"
    auto = gpt_oss.model_copy(
        update={"model": gpt_oss.model.model_copy(update={"backend": "auto"})}
    )
    assert choose_backend(auto, "cuda:0", "production") == "transformers"


def test_preparing_the_4bit_experts_holds_one_layer_twice_at_most(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stacks are built layer by layer and each layer's bitsandbytes experts are freed as
    soon as their stack replaces them, without waiting for Python's garbage collection (a
    Params4bit points back at its Linear4bit: a cycle): at most one layer is in memory twice.
    On the 20B shape the replaced experts stayed allocated until a full collection, and the
    start-up peak was 23.0 GiB for 13.4 GiB once ready."""
    import gc
    import weakref

    from production.model.loading import load_model

    home = model_home(tmp_path / "home", checkpoint, load_in_4bit=True, chat_format="harmony")
    model, _ = load_model(load_settings(home), "cpu", for_training=False)
    old = [[weakref.ref(p) for p in layer.mlp.experts.parameters()] for layer in model.model.layers]
    alive_while_stacking: list[int] = []
    stack = moe_decode.Nf4Stack.from_linears

    def counting(linears: list) -> moe_decode.Nf4Stack:
        alive_while_stacking.append(sum(any(ref() is not None for ref in refs) for refs in old))
        return stack(linears)

    monkeypatch.setattr(moe_decode.Nf4Stack, "from_linears", counting)
    gc.disable()
    try:
        moe_decode.prepare(model, lora_rank=8)
    finally:
        gc.enable()
    layers = len(old)
    # Two stacks (gate_up, down) per layer; while layer i stacks, layers i.. are still old.
    assert alive_while_stacking == [layers - i for i in range(layers) for _ in (0, 1)]
    assert not any(ref() is not None for refs in old for ref in refs)


def test_fused_gpt_oss_serves_an_expert_lora_on_target_parameters_as_peft_does(
    tmp_path: Path,
) -> None:
    """What Unsloth saves when it trains a bf16 GPT-OSS: PEFT's target_parameters on the fused
    [experts, in, out] weights, each factor stacked over the experts (and the second parameter's
    keys nested under `.base_layer`). The static decoder splits it per expert and answers as
    PEFT's own forward does, with and without the adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import tiny_gpt_oss

    model_dir = tiny_gpt_oss(tmp_path / "tiny-gpt-oss")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    peft_model = get_peft_model(base, lora)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapter change the answers
                param.normal_(0, 0.5)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    from safetensors.torch import load_file, save_file

    saved = load_file(adapter / "adapter_model.safetensors")
    assert any(".experts.base_layer.lora_A" in key for key in saved)

    home = model_home(tmp_path / "home", model_dir, chat_format="harmony")
    reference = _engine(home, "generate")
    reference.load_adapter("a", adapter)
    expected = _answers(reference, [None, "a"])
    del reference
    assert expected[:2] != expected[2:], "the adapter should change the answers"

    engine = _engine(home, "static")
    assert isinstance(engine.model.model.layers[0].mlp.experts, moe_decode.DecodeExperts)
    engine.load_adapter("a", adapter)
    assert _answers(engine, [None, "a", None]) == expected + expected[:2]

    # A stacked factor cut short (not r per expert) is refused by name; "a" still serves.
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    cut = next(key for key in saved if key.endswith("mlp.experts.base_layer.lora_A.weight"))
    save_file({**saved, cut: saved[cut][1:]}, broken / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match="not a LoRA stacked over the 4 experts"):
        engine.load_adapter("broken", broken)
    assert _answers(engine, ["a"]) == expected[2:]
