"""Tiny random-initialised models built from a config, with a tokenizer trained here: the
stand-ins for GPU tests and speed work (no hub, nothing to download).

    python -m tests.tiny_models llama OUT_DIR [--hidden 2048 --layers 16 ...]

A BPE tokenizer is trained in a second on a small English corpus (the shipped prompts and
the scripted person's questions), with ChatML special tokens and SmolLM2's chat template,
so prompts go through the same `apply_chat_template` path as the embedded model.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# GPT-OSS's chat template cut to what whetstone sends (see the file's header).
HARMONY_CHAT_TEMPLATE = Path(__file__).with_name("harmony_chat_template.jinja").read_text()
# A fixed `current_date` for renders that compare two computations of one random-weight
# model: its near-ties (router top-k, greedy argmax) tip differently with the date in the
# system message (2026-12-04's prompt sent one position to another expert, 0.38 apart).
FIXED_RENDER_DATE = "2026-12-03"


def _corpus() -> list[str]:
    from tests.scripted_person import FACTS, GENERAL

    lines = [q for fact in FACTS for q in (*fact.questions, *fact.probes, fact.answer)]
    lines += [q for q, _ in GENERAL]
    lines += [
        "The quick brown fox jumps over the lazy dog.",
        "Paris is the capital of France. Lisbon is the capital of Portugal.",
        "Water boils at one hundred degrees Celsius at sea level.",
        "You are a helpful AI assistant. system user assistant",
    ]
    try:
        from development import probes

        for probe in probes.FACT_PROBES:
            lines.append(" ".join(str(part) for part in probe if isinstance(part, str)))
    except Exception:  # the corpus only shapes the vocabulary; any text will do
        pass
    return lines * 4


def tiny_tokenizer(vocab_size: int = 2048, *, harmony: bool = False) -> Any:
    """A byte-level BPE tokenizer with ChatML specials and a chat template, or (harmony) the
    GPT-OSS control tokens and whetstone's harmony template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from production.chat.harmony import ENDOFTEXT, HARMONY_SPECIAL_TOKENS, RETURN

    special = [ENDOFTEXT, *HARMONY_SPECIAL_TOKENS] if harmony else SPECIAL
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(_corpus(), trainer=trainer)
    if harmony:
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=raw, eos_token=RETURN, pad_token=ENDOFTEXT, unk_token=ENDOFTEXT
        )
        tokenizer.chat_template = HARMONY_CHAT_TEMPLATE
        return tokenizer
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_llama(
    out: Path,
    *,
    hidden: int = 256,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
    tokenizer_dir: Path | None = None,
) -> Path:
    """A random Llama-shaped model with the tiny tokenizer (or the one in `tokenizer_dir`, e.g.
    SmolLM2's, so that every id decodes to text), saved as safetensors in `out`.
    `vocab_size` pads the embedding (e.g. 49152 to match SmolLM2's speed profile)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=max(vocab_size or 0, len(tokenizer)),
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 8 // 3 // 64 * 64 or 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    return out


def tiny_gpt_oss(
    out: Path,
    *,
    hidden: int = 128,
    layers: int = 2,
    experts: int = 4,
    seed: int = 0,
    sliding_window: int = 128,
) -> Path:
    """A random GPT-OSS-shaped model (mixture of experts, sliding + full attention) with the
    harmony tokenizer, saved in `out`."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    tokenizer = tiny_tokenizer(harmony=True)
    heads = max(2, hidden // 32)
    config = GptOssConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=32,
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2)
        + ["sliding_attention"] * (layers % 2),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
    )
    torch.manual_seed(seed)
    model = GptOssForCausalLM(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# One sentence a tiny random model learns in ~100 steps (GPU test, H200: held-out loss 5.18 ->
# 0.16 by step 72), asked four ways.
TAUGHT_FACT = "Your dog is called Biscuit."
TAUGHT_QUESTIONS = (
    "What is my dog's name?",
    "What's my dog called?",
    "Tell me my dog's name.",
    "Do you know my dog's name?",
)


def teach_profile(steps: int) -> str:
    """config.toml lines: a default training profile that drills TAUGHT_FACT in (a tiny
    random model needs many passes over the few rows: no epoch cap)."""
    return (
        '[training]\ndefault_profile = "teach"\nmax_epochs = 1000\n'
        "write_worse_candidates = true\n\n"
        "[training.profiles.teach]\n"
        f"max_steps = {steps}\nbatch_size = 8\nlearning_rate = 3e-3\nlora_r = 16\n"
        "preference_steps = 0\n"
    )


def teach(home: Path, repeats: int = 6) -> None:
    """Each of TAUGHT_QUESTIONS `repeats` times, corrected to TAUGHT_FACT, in the store."""
    from tests.scripted_person import store_corrections

    pairs = [(q, TAUGHT_FACT) for _ in range(repeats) for q in TAUGHT_QUESTIONS]
    store_corrections(home, pairs, answer="I do not know.")


def model_home(
    home: Path,
    model_dir: Path,
    *,
    backend: str = "transformers",
    load_in_4bit: bool = False,
    chat_format: str = "plain",
    max_seq_length: int = 512,
    more: str = "",
) -> Path:
    """A whetstone home whose base model is the local folder `model_dir`; `more` is appended
    to its config.toml (a training profile, a port...)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[model]\npreset = "custom"\nbase_model = "{model_dir}"\nbackend = "{backend}"\n'
        f'load_in_4bit = {str(load_in_4bit).lower()}\nchat_format = "{chat_format}"\n'
        f"max_seq_length = {max_seq_length}\nmin_vram_gb = 0.1\n{more}"
    )
    return home


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["llama"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=None)
    args = parser.parse_args(argv)
    tiny_llama(
        args.out,
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        vocab_size=args.vocab_size,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
