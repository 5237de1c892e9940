"""The person's model's on-disk layout, on the CPU: a tiny GPT-OSS saved as Unsloth's bnb-4bit
checkpoint is (every expert its own NF4 Linear with quant state and bias, the router under
`router.linear`), the product's loader reads it without quantizing anything again, computes
what the fused model with the same weights computes, and the training job puts LoRA on
attention and on every expert (tests/test_gpu.py runs the same through Unsloth on CUDA).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")

from benchmarks.gpt_oss_checkpoint import SHAPES, build  # noqa: E402
from production.model.gpt_oss_layout import adapter_placement, has_split_experts  # noqa: E402
from tests.tiny_models import FIXED_RENDER_DATE, model_home  # noqa: E402

TINY = SHAPES["tiny"]
QUANT_STATE = {"absmax", "quant_map", "nested_absmax", "nested_quant_map"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("layout") / "gpt-oss-tiny-bnb-4bit", "tiny", "cpu")


def _tensors(folder: Path) -> dict[str, tuple[str, list[int]]]:
    from safetensors import safe_open

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / shard), "pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                piece = fh.get_slice(name)
                out[name] = (piece.get_dtype(), piece.get_shape())
    assert set(out) == set(index["weight_map"])
    return out


def test_the_checkpoint_is_laid_out_as_unsloths_bnb_4bit_gpt_oss(checkpoint: Path) -> None:
    tensors = _tensors(checkpoint)
    hidden, experts = TINY["hidden"], TINY["experts"]
    assert has_split_experts(checkpoint)
    assert not [n for n in tensors if n.endswith((".experts.gate_up_proj", ".experts.down_proj"))]
    for layer in range(TINY["layers"]):
        for i in range(experts):
            for proj, (out_f, in_f) in (
                ("gate_up_projs", (2 * hidden, hidden)),
                ("down_projs", (hidden, hidden)),
            ):
                p = f"model.layers.{layer}.mlp.experts.{proj}.{i}"
                assert tensors[f"{p}.weight"] == ("U8", [out_f * in_f // 2, 1])
                assert tensors[f"{p}.weight.absmax"] == ("U8", [out_f * in_f // 64])
                assert tensors[f"{p}.weight.quant_map"] == ("F32", [16])
                assert f"{p}.weight.quant_state.bitsandbytes__nf4" in tensors
                assert {f"{p}.weight.{k}" for k in QUANT_STATE} <= set(tensors)
                assert tensors[f"{p}.bias"] == ("BF16", [out_f])
        router = f"model.layers.{layer}.mlp.router.linear"
        assert tensors[f"{router}.weight"] == ("BF16", [experts, hidden])
        assert tensors[f"{router}.bias"] == ("BF16", [experts])
        assert tensors[f"model.layers.{layer}.self_attn.q_proj.weight"][0] == "U8"
        assert tensors[f"model.layers.{layer}.self_attn.sinks"][0] == "BF16"
    assert tensors["lm_head.weight"][0] == tensors["model.embed_tokens.weight"][0] == "BF16"

    config = json.loads((checkpoint / "config.json").read_text())
    quant = config["quantization_config"]
    assert (quant["quant_method"], quant["bnb_4bit_quant_type"]) == ("bitsandbytes", "nf4")
    assert quant["bnb_4bit_use_double_quant"] is True
    assert {"lm_head", "router"} <= set(quant["llm_int8_skip_modules"])
    assert config["num_local_experts"] == experts
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|start|>user<|message|>hi<|end|>" in rendered


def _settings(tmp_path: Path, checkpoint: Path, load_in_4bit: bool = True):
    from common.config import load_settings

    home = model_home(
        tmp_path / "home",
        checkpoint,
        backend="transformers",
        load_in_4bit=load_in_4bit,
        chat_format="harmony",
    )
    return load_settings(home)


def _fused_reference(model, config_dir: Path):
    """A stock (fused-expert, 16-bit) GPT-OSS holding the loaded model's dequantized
    weights: what the person's model computes, written the way transformers writes it."""
    from bitsandbytes.functional import dequantize_4bit
    from transformers import AutoConfig, GptOssForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    del config.quantization_config
    reference = GptOssForCausalLM(config).to(model.dtype).eval()

    def weight(module):
        w = module.weight
        return dequantize_4bit(w.data, w.quant_state) if hasattr(w, "quant_state") else w.data

    state = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".experts." not in name:
            state[f"{name}.weight"] = weight(module)
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.data
    for n, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        p = f"model.layers.{n}.mlp"
        state[f"{p}.experts.gate_up_proj"] = torch.stack(
            [weight(m).T for m in experts.gate_up_projs]
        )
        state[f"{p}.experts.gate_up_proj_bias"] = torch.stack(
            [m.bias.data for m in experts.gate_up_projs]
        )
        state[f"{p}.experts.down_proj"] = torch.stack([weight(m).T for m in experts.down_projs])
        state[f"{p}.experts.down_proj_bias"] = torch.stack(
            [m.bias.data for m in experts.down_projs]
        )
        state[f"{p}.router.weight"] = layer.mlp.router.linear.weight.data
        state[f"{p}.router.bias"] = layer.mlp.router.linear.bias.data
    for name, tensor in model.state_dict().items():
        if "sinks" in name or "norm" in name or "embed_tokens" in name:
            state[name] = tensor
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return reference


def test_the_loader_reads_the_4bit_experts_as_saved_and_computes_the_fused_model(
    tmp_path: Path, checkpoint: Path
) -> None:
    from bitsandbytes.nn import Linear4bit
    from safetensors import safe_open

    from production.model.loading import load_model

    model, tokenizer = load_model(_settings(tmp_path, checkpoint), "cpu", for_training=False)
    experts = model.model.layers[1].mlp.experts
    assert len(experts.gate_up_projs) == TINY["experts"]
    assert all(isinstance(m, Linear4bit) for m in (*experts.gate_up_projs, *experts.down_projs))
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    assert not isinstance(model.lm_head, Linear4bit)
    # Nothing is quantized again at load: the packed bytes in memory are the file's.
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.experts.down_projs.3.weight"
    with safe_open(str(checkpoint / index[name]), "pt") as fh:
        on_disk = fh.get_tensor(name)
    assert torch.equal(experts.down_projs[3].weight.data, on_disk)

    reference = _fused_reference(model, checkpoint)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
        current_date=FIXED_RENDER_DATE,
    )["input_ids"]
    with torch.no_grad():
        got = model(input_ids=ids).logits.float()
        expected = reference(input_ids=ids).logits.float()
    assert got.shape == expected.shape
    # The same weights computed in another order: close (a layout mistake, e.g. gate and up not
    # interleaved, is off by more than 10x this), and mostly the same next token (random
    # weights make near-ties).
    assert (got - expected).abs().max() < 0.05
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_lora_goes_on_attention_and_every_expert(tmp_path: Path, checkpoint: Path) -> None:
    from development.train import _attach_lora
    from production.model.loading import load_model

    settings = _settings(tmp_path, checkpoint)
    # The person's notes (and Unsloth's notebooks) name the MLP as gate/up/down.
    assert {"gate_proj", "up_proj", "down_proj"} <= set(settings.lora.target_modules)
    model, _ = load_model(settings, "cpu", for_training=True)
    model = _attach_lora(model, settings, "quick_test", "transformers", "cpu")
    wrapped = {
        re.sub(r"\.\d+\.", ".N.", name.removesuffix(".lora_A"))
        for name, _ in model.named_modules()
        if name.endswith("lora_A")
    }
    layers, experts = TINY["layers"], TINY["experts"]
    per_kind = {}
    for name, _ in model.named_modules():
        if name.endswith("lora_A"):
            kind = re.search(r"(self_attn\.\w+|experts\.\w+)\.", name).group(1)
            per_kind[kind] = per_kind.get(kind, 0) + 1
    assert per_kind == {
        "self_attn.q_proj": layers,
        "self_attn.k_proj": layers,
        "self_attn.v_proj": layers,
        "self_attn.o_proj": layers,
        "experts.gate_up_projs": layers * experts,
        "experts.down_projs": layers * experts,
    }, wrapped
    model.save_pretrained(tmp_path / "adapter")
    placement = adapter_placement(tmp_path / "adapter")
    # An A and a B per wrapped module.
    assert placement["experts.gate_up"] == placement["experts.down"] == 2 * layers * experts
    assert placement["attention.q_proj"] == 2 * layers
    assert set(placement) == {
        "attention.q_proj",
        "attention.k_proj",
        "attention.v_proj",
        "attention.o_proj",
        "experts.gate_up",
        "experts.down",
    }


def test_a_4bit_checkpoint_with_load_in_4bit_off_is_refused_by_name(
    tmp_path: Path, checkpoint: Path
) -> None:
    from production.model.base_model import BaseModelError
    from production.model.loading import load_model

    settings = _settings(tmp_path, checkpoint, load_in_4bit=False)
    with pytest.raises(BaseModelError, match=r"set model\.load_in_4bit = true"):
        load_model(settings, "cpu", for_training=False)
