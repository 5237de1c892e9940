"""A random GPT-OSS checkpoint laid out exactly as the person's model is on disk
(`unsloth/gpt-oss-20b-unsloth-bnb-4bit`): every expert its own NF4 `Linear4bit` with its bnb
quantization state (double quantization, blocksize 64) and a bf16 bias, the router under
`router.linear`, attention 4-bit, embeddings / lm_head / norms / sinks in bf16, the bnb
`quantization_config` in config.json, and the harmony tokenizer files.

    python -m benchmarks.gpt_oss_checkpoint OUT [--shape 20b|small|tiny] [--device cuda] [--seed 0]

No hub: the weights are random (std 0.02, as transformers initialises GPT-OSS), quantized
here with bitsandbytes (on the GPU for the 20B shape: seconds; on the CPU for the tiny one).
The tokenizer is the tests' small harmony tokenizer; the 20B shape keeps GPT-OSS's
201,088-token embedding and lm_head, with the rows past the tokenizer (and those of its
control tokens) zeroed so greedy decoding stays inside the tokenizer and never stops early. See
production/model/gpt_oss_layout.py for the layout and how both backends load it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

# The GPT-OSS-20B shape (transformers' GptOssConfig defaults are the 120B's: 36 layers, 128
# experts); "small" is the GPU test's; "tiny" is CI's.
SHAPES: dict[str, dict[str, Any]] = {
    "20b": {"hidden": 2880, "layers": 24, "experts": 32, "top_k": 4, "heads": 64, "kv_heads": 8},
    "small": {"hidden": 512, "layers": 4, "experts": 8, "top_k": 2, "heads": 8, "kv_heads": 4},
    "tiny": {"hidden": 128, "layers": 2, "experts": 4, "top_k": 2, "heads": 4, "kv_heads": 2},
}
VOCAB_20B = 201_088
HEAD_DIM = {"20b": 64, "small": 64, "tiny": 32}
# Unsloth's bnb config for its 4-bit uploads (unsloth/models/vision.py): nf4, double quant,
# bf16 compute, and unsloth_zoo's SKIP_QUANTIZATION_MODULES (lm_head and the router stay 16-bit).
SKIP_MODULES = [
    "lm_head",
    "multi_modal_projector",
    "merger",
    "modality_projection",
    "mm_projector",
    "router",
    "mlp.gate",
    "block_sparse_moe.gate",
    "moe.gate",
    "mamba",
    "audio_tower",
    "vision_tower",
    "visual",
    "vision_embedder",
    "embed_vision",
    "embed_audio",
    "score",
    "classifier",
    "qa_outputs",
]
STD = 0.02


def gpt_oss_config(shape: str, vocab_size: int, tokenizer: Any) -> Any:
    from transformers import BitsAndBytesConfig, GptOssConfig

    s = SHAPES[shape]
    config = GptOssConfig(
        vocab_size=vocab_size,
        hidden_size=s["hidden"],
        intermediate_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        head_dim=HEAD_DIM[shape],
        num_local_experts=s["experts"],
        num_experts_per_tok=s["top_k"],
        sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * (s["layers"] // 2),
        attention_bias=True,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
    )
    config.architectures = ["GptOssForCausalLM"]
    config.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype="bfloat16",
        llm_int8_skip_modules=SKIP_MODULES,
    ).to_dict()
    return config


class _Writer:
    """Random tensors, 4-bit where the layout says so, written one shard per layer."""

    def __init__(self, out: Path, device: str, seed: int) -> None:
        import torch

        self.torch = torch
        self.out = out
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.weight_map: dict[str, str] = {}
        self.shard: dict[str, Any] = {}
        self.bytes = 0

    def normal(self, *shape: int) -> Any:
        torch = self.torch
        t = torch.randn(*shape, generator=self.generator, device=self.device, dtype=torch.float32)
        return (t * STD).to(torch.bfloat16)

    def dense(self, name: str, tensor: Any) -> None:
        self.shard[name] = tensor.to(self.torch.bfloat16).contiguous().cpu()

    def linear4bit(self, prefix: str, out_features: int, in_features: int) -> None:
        """`prefix`.weight as NF4 with its quant state (the keys Linear4bit saves) + bias."""
        import bitsandbytes.functional as bnb

        packed, state = bnb.quantize_4bit(
            self.normal(out_features, in_features),
            blocksize=64,
            compress_statistics=True,
            quant_type="nf4",
            quant_storage=self.torch.uint8,
        )
        self.shard[f"{prefix}.weight"] = packed.cpu()
        for key, value in state.as_dict(packed=True).items():
            self.shard[f"{prefix}.weight.{key}"] = value.contiguous().cpu()
        self.dense(f"{prefix}.bias", self.normal(out_features))

    def flush(self, name: str) -> None:
        from safetensors.torch import save_file

        filename = f"model-{name}.safetensors"
        save_file(self.shard, str(self.out / filename), metadata={"format": "pt"})
        for key, value in self.shard.items():
            self.weight_map[key] = filename
            self.bytes += value.numel() * value.element_size()
        self.shard = {}

    def finish(self) -> None:
        weight_map = dict(sorted(self.weight_map.items()))
        index = {"metadata": {"total_size": self.bytes}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def build(out: Path, shape: str = "tiny", device: str = "cpu", seed: int = 0) -> Path:
    """Write the checkpoint into `out` (created); returns it."""
    import torch

    from tests.tiny_models import tiny_tokenizer

    tokenizer = tiny_tokenizer(harmony=True)
    vocab = VOCAB_20B if shape == "20b" else len(tokenizer)
    config = gpt_oss_config(shape, vocab, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    w = _Writer(out, device, seed)
    hidden, inter = config.hidden_size, config.intermediate_size
    heads, kv, head_dim = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}"
        w.linear4bit(f"{p}.self_attn.q_proj", heads * head_dim, hidden)
        w.linear4bit(f"{p}.self_attn.k_proj", kv * head_dim, hidden)
        w.linear4bit(f"{p}.self_attn.v_proj", kv * head_dim, hidden)
        w.linear4bit(f"{p}.self_attn.o_proj", hidden, heads * head_dim)
        w.dense(f"{p}.self_attn.sinks", w.normal(heads))
        w.dense(f"{p}.mlp.router.linear.weight", w.normal(config.num_local_experts, hidden))
        w.dense(f"{p}.mlp.router.linear.bias", w.normal(config.num_local_experts))
        for i in range(config.num_local_experts):
            # Gate and up interleaved by row (2j gate, 2j+1 up), as the fused tensor's columns.
            w.linear4bit(f"{p}.mlp.experts.gate_up_projs.{i}", 2 * inter, hidden)
            w.linear4bit(f"{p}.mlp.experts.down_projs.{i}", hidden, inter)
        w.dense(f"{p}.input_layernorm.weight", torch.ones(hidden))
        w.dense(f"{p}.post_attention_layernorm.weight", torch.ones(hidden))
        w.flush(f"layer{n:02d}")
    w.dense("model.embed_tokens.weight", w.normal(vocab, hidden))
    w.dense("model.norm.weight", torch.ones(hidden))
    lm_head = w.normal(vocab, hidden)
    if shape == "20b":  # random weights never learn to stop: keep timings at max_tokens
        lm_head[len(tokenizer) :] = 0
        lm_head[tokenizer.all_special_ids] = 0
    w.dense("lm_head.weight", lm_head)
    w.flush("embeddings")
    w.finish()
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", default="cpu", help="where to draw and quantize: cpu|cuda")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.monotonic()
    build(args.out, args.shape, args.device, args.seed)
    print(f"wrote {args.out} ({args.shape}) in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
