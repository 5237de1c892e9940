"""`whetstone export-model`: a candidate for other runtimes, on the embedded model. The GGUF
that llama.cpp's converter writes loads back (transformers reads GGUF) and answers what
whetstone serving that candidate answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.test_server import make_lora

pytestmark = pytest.mark.slow

PROMPTS = ("What is the capital of France?", "Name three colours.", "What is 2 + 2?")


def _served(home: Path, candidate_id: str) -> list[str]:
    """Greedy answers of whetstone's own engine serving the candidate (float32)."""
    from common.config import load_settings
    from production.engine import Engine, Sampling

    settings = load_settings(home, {"model": {"dtype": "float32"}})
    engine = Engine(settings, "cpu")
    engine.load_adapter(candidate_id, home / "candidates" / candidate_id)
    engine.activate(candidate_id)
    greedy = Sampling(temperature=0, max_tokens=16)
    return [
        engine.stream(
            engine.prompt_ids([{"role": "user", "content": q}], None),
            greedy,
            lambda d: None,
            lambda: False,
        ).text
        for q in PROMPTS
    ]


def _greedy(model, tokenizer) -> list[str]:
    import torch

    answers = []
    stops = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    for question in PROMPTS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=True
        )["input_ids"]
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=stops
            )
        answers.append(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))
    return answers


def test_gguf_export_loads_back_and_answers_as_whetstone_serves(
    home_with_model: Path, prepared_model_dir: Path, tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    candidate = make_lora(home_with_model, "cand-export", prepared_model_dir, seed=3)
    out = tmp_path / "gguf"
    done = run_cli(
        "export-model", candidate, "--home", str(home_with_model), "--format", "gguf",
        "--outtype", "f32", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"exported {candidate} (gguf)" in done.stdout
    meta = json.loads((out / "whetstone-export.json").read_text())
    assert meta["candidate_id"] == candidate and meta["format"] == "gguf"
    assert [p.name for p in out.iterdir() if p.suffix == ".gguf"] == [f"{candidate}.gguf"]
    assert not list(tmp_path.glob(".gguf.*")), "the staging folder was left behind"

    model = AutoModelForCausalLM.from_pretrained(
        out, gguf_file=f"{candidate}.gguf", dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=f"{candidate}.gguf")
    served = _served(home_with_model, candidate)
    assert _greedy(model, tokenizer) == served
    base = AutoModelForCausalLM.from_pretrained(prepared_model_dir, dtype=torch.float32)
    assert _greedy(base, tokenizer) != served, "the adapter changed nothing: a weak test"

    again = run_cli("export-model", candidate, "--home", str(home_with_model), "--out", str(out))
    assert again.returncode != 0 and "exists" in again.stderr


def test_merged_and_lora_gguf_exports_and_bad_requests(
    home_with_model: Path, prepared_model_dir: Path, tmp_path: Path
) -> None:
    import gguf
    from safetensors import safe_open

    candidate = make_lora(home_with_model, "cand-both", prepared_model_dir, seed=4)
    merged = tmp_path / "merged"
    done = run_cli(
        "export-model", candidate, "--home", str(home_with_model), "--format", "merged",
        "--outtype", "bf16", "--out", str(merged),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    with safe_open(merged / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
        assert not any("lora" in name for name in names)  # folded in, not beside
        assert str(weights.get_tensor(names[0]).dtype) == "torch.bfloat16"
    assert (merged / "tokenizer.json").is_file() and (merged / "config.json").is_file()
    quantized = run_cli(
        "export-model", candidate, "--home", str(home_with_model), "--format", "merged",
        "--outtype", "q8_0", "--out", str(tmp_path / "q8"),
    )  # fmt: skip
    assert quantized.returncode != 0 and "GGUF quantization" in quantized.stderr
    assert not (tmp_path / "q8").exists()

    lora = tmp_path / "lora"
    done = run_cli(
        "export-model", candidate, "--home", str(home_with_model), "--format", "lora-gguf",
        "--out", str(lora),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    reader = gguf.GGUFReader(lora / f"{candidate}-lora.gguf")
    kinds = {str(field.name) for field in reader.fields.values()}
    assert "adapter.type" in kinds
    assert any("attn_q" in t.name and "lora_a" in t.name for t in reader.tensors)

    unknown = run_cli("export-model", "cand-nope", "--home", str(home_with_model))
    assert unknown.returncode != 0 and "cand-nope" in unknown.stderr
    bad = run_cli("export-model", candidate, "--home", str(home_with_model), "--format", "onnx")
    assert bad.returncode == 2 and "--format must be one of" in bad.stderr
    four_bit = run_cli(
        "export-model", candidate, "--home", str(home_with_model), "--format", "merged",
        "--set", "model.load_in_4bit=true", "--out", str(tmp_path / "never"),
    )  # fmt: skip
    assert four_bit.returncode != 0 and "16-bit base checkpoint" in four_bit.stderr
    assert not (tmp_path / "never").exists()
