"""The static decoder (server.decode = "static": StaticCache, adapter merged into the weights)
against generate() over PEFT, on the embedded model on the CPU. The CUDA-graph step is the
same loop compiled; tests/test_gpu.py runs it on the GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import load_settings
from production.engine import AdapterLoadError, Engine, Sampling

PROMPTS = ("What is the capital of France?", "Name three colours.")


def _engine(home: Path, decode: str) -> Engine:
    # fp32: merged and unmerged adapters then agree to ~1e-6, so greedy answers compare exactly.
    overrides = {"server": {"decode": decode}, "model": {"dtype": "float32", "max_seq_length": 256}}
    return Engine(load_settings(home, overrides), "cpu")


def _lora(out: Path, model_dir: Path, seed: int, **config: object) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(init_lora_weights=False, **config)  # random B: it changes the answers
    with torch.no_grad():
        model = get_peft_model(base, lora)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.05)  # changed answers, still words
    model.save_pretrained(out)
    return out


def _answers(engine: Engine, tokens: int = 20) -> list[str]:
    greedy = Sampling(temperature=0, max_tokens=tokens)
    out = []
    for question in PROMPTS:
        prompt = engine.prompt_ids([{"role": "user", "content": question}], None)
        out.append(engine.stream(prompt, greedy, lambda d: None, lambda: False).text)
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory, prepared_model_dir: Path) -> dict:
    root = tmp_path_factory.mktemp("loras")
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return {
        "all7": _lora(
            root / "all7", prepared_model_dir, 1, r=8, lora_alpha=16, target_modules=every
        ),
        # rank-stabilised scaling and a per-layer alpha: the merge must scale as PEFT does
        "qv": _lora(
            root / "qv",
            prepared_model_dir,
            2,
            r=4,
            lora_alpha=8,
            use_rslora=True,
            alpha_pattern={"v_proj": 32},
            target_modules=["q_proj", "v_proj"],
        ),
    }


def _serve(engine: Engine, adapter_id: str | None) -> list[str]:
    engine.activate(adapter_id)
    return _answers(engine)


def test_static_decode_answers_as_generate_does_through_adapter_swaps(
    home_with_model: Path, adapters: dict
) -> None:
    reference = _engine(home_with_model, "generate")
    for name, folder in adapters.items():
        reference.load_adapter(name, folder)
    expected = {name: _serve(reference, name) for name in (None, "all7", "qv")}
    assert reference.decode == "generate"
    assert len({tuple(v) for v in expected.values()}) == 3, "each adapter changes the answers"
    del reference

    engine = _engine(home_with_model, "static")
    assert engine.decode == "static"
    for name, folder in adapters.items():
        engine.load_adapter(name, folder)
    # Every swap starts from the original weights: base -> all7 -> qv -> base -> all7 -> qv.
    for name in (None, "all7", "qv", None, "all7", "qv"):
        assert _serve(engine, name) == expected[name], f"serving {name}"


def _endings(engine: Engine) -> list[tuple[str, int, str]]:
    """(text, tokens, finish) ended by max_tokens, by the end-of-turn token, by a cancel
    after two deltas."""
    prompt = engine.prompt_ids([{"role": "user", "content": "Say hello."}], None)
    seen: list[str] = []
    runs = [
        (Sampling(temperature=0, max_tokens=3), lambda d: None, lambda: False),
        (Sampling(temperature=0, max_tokens=200), lambda d: None, lambda: False),
        (
            Sampling(temperature=0, max_tokens=200),
            lambda d: seen.append(d.text),
            lambda: len(seen) >= 2,
        ),
    ]
    outs = [
        engine.stream(prompt, sampling, on_delta, cancel) for sampling, on_delta, cancel in runs
    ]
    return [(o.text, o.completion_tokens, o.finish_reason) for o in outs]


def test_static_decode_stops_like_generate(home_with_model: Path) -> None:
    static = _endings(_engine(home_with_model, "static"))
    assert [finish for _, _, finish in static] == ["length", "stop", "cancelled"]
    assert static[0][1] == 3
    generate = _endings(_engine(home_with_model, "generate"))
    assert static[:2] == generate[:2]
    # generate() checks its stopping criteria one token later than the static loop does.
    assert generate[2][2] == "cancelled" and static[2][1] <= generate[2][1]


def test_static_decode_sampling_follows_the_seed(home_with_model: Path) -> None:
    engine = _engine(home_with_model, "static")
    prompt = engine.prompt_ids([{"role": "user", "content": "Tell me a story."}], None)

    def sample(seed: int) -> str:
        hot = Sampling(temperature=1.2, top_p=0.95, max_tokens=16, seed=seed)
        return engine.stream(prompt, hot, lambda d: None, lambda: False).text

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1


def test_an_adapter_the_merge_cannot_express_is_refused_and_the_old_one_serves(
    home_with_model: Path, adapters: dict, prepared_model_dir: Path, tmp_path: Path
) -> None:
    engine = _engine(home_with_model, "static")
    engine.load_adapter("all7", adapters["all7"])
    engine.activate("all7")
    before = _answers(engine)

    dora = _lora(
        tmp_path / "dora", prepared_model_dir, 3, r=4, use_dora=True, target_modules=["q_proj"]
    )
    with pytest.raises(AdapterLoadError, match="use_dora"):
        engine.load_adapter("dora", dora)

    wrong = tmp_path / "wrong-shape"
    wrong.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (wrong / name).write_bytes((adapters["qv"] / name).read_bytes())
    from safetensors.torch import load_file, save_file

    weights = load_file(wrong / "adapter_model.safetensors")
    save_file(
        # v_proj's B is 192 x r; o_proj is 576 -> 576
        {k.replace("v_proj", "o_proj"): v for k, v in weights.items()},
        wrong / "adapter_model.safetensors",
    )
    with pytest.raises(AdapterLoadError, match="o_proj"):
        engine.load_adapter("wrong", wrong)

    assert engine.adapter_id == "all7"
    assert _answers(engine) == before


def test_auto_decode_is_static_on_cuda_for_16_bit_dense_models_and_gpt_oss(tmp_path: Path) -> None:
    from common.devices import choose_backend, serving_decode
    from tests.tiny_models import model_home, tiny_gpt_oss, tiny_llama

    dense = load_settings(model_home(tmp_path / "d", tiny_llama(tmp_path / "llama")))
    moe = load_settings(model_home(tmp_path / "m", tiny_gpt_oss(tmp_path / "gpt-oss")))
    quantized = dense.model_copy(
        update={"model": dense.model.model_copy(update={"load_in_4bit": True})}
    )
    assert serving_decode(dense, "cuda:0") == "static"
    assert serving_decode(dense, "cpu") == "generate"
    assert serving_decode(moe, "cuda:0") == "static"  # GPT-OSS: production.decode.moe_decode
    assert serving_decode(quantized, "cuda:0") == "generate"
    auto = dense.model_copy(update={"model": dense.model.model_copy(update={"backend": "auto"})})
    assert choose_backend(auto, "cuda:0", "production") == "transformers"


def test_forcing_static_decode_on_a_4_bit_model_is_refused_by_name(home_with_model: Path) -> None:
    settings = load_settings(
        home_with_model, {"server": {"decode": "static"}, "model": {"load_in_4bit": True}}
    )
    with pytest.raises(RuntimeError, match="server.decode = 'static' needs a 16-bit model"):
        Engine(settings, "cpu")


def test_unloading_adapters_while_the_base_model_serves_keeps_answering(
    home_with_model: Path, adapters: dict
) -> None:
    """A rollback to the base model unloads the adapter that served before (the worker's
    sync): the base must keep answering as it did. Over PEFT, deleting the adapter PEFT still
    held active made every chat a 500 (KeyError; found by schemathesis)."""
    engine = _engine(home_with_model, "generate")  # the static path: the swap tests above
    base = _serve(engine, None)
    for name, folder in adapters.items():
        engine.load_adapter(name, folder)
    engine.activate("all7")
    engine.activate(None)
    engine.unload_adapter("all7")  # another adapter is still loaded
    assert _serve(engine, None) == base
    engine.activate("qv")
    assert _serve(engine, "qv") != base
    engine.activate(None)
    engine.unload_adapter("qv")  # the last one
    assert _serve(engine, None) == base
    engine.load_adapter("all7", adapters["all7"])  # and adapters load again afterwards
    assert _serve(engine, "all7") != base


@pytest.mark.parametrize("decode", ["generate", "static"])
def test_no_sampled_id_is_past_the_tokenizer(tmp_path: Path, decode: str) -> None:
    """An embedding padded past the tokenizer (the random 20B GPT-OSS: 2k tokens, 201k rows)
    has rows that decode to nothing: sampled at temperature 1 they filled a streamed answer
    with silent steps (2.1 s of no text on an H100). No id past the tokenizer is picked,
    greedy or sampled, on either decoder."""
    from production.decode.steering import SteeringSpec
    from tests.tiny_models import model_home, tiny_llama

    model = tiny_llama(tmp_path / "padded", hidden=64, layers=2, vocab_size=8192)
    home = model_home(tmp_path / "home", model)
    engine = Engine(load_settings(home, {"server": {"decode": decode}}), "cpu")
    assert engine.decode == decode and len(engine.tokenizer) < engine.vocab_size == 8192
    prompt = engine.prompt_ids([{"role": "user", "content": "Tell me a story."}], None)
    for temperature in (1.0, 0.0):
        for seed in range(3):
            sampling = Sampling(
                temperature=temperature,
                max_tokens=48,
                seed=seed,
                steering=SteeringSpec(logprobs=0),
            )
            outcome = engine.stream(prompt, sampling, lambda d: None, lambda: False)
            tokens = [entry.token for entry in outcome.logprobs]
            assert tokens and max(tokens) < len(engine.tokenizer), (decode, temperature, seed)


def test_gpt_oss_static_decode_falls_back_to_eager_attention_when_the_kernel_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decode attention that does not build (a card or driver the kernel never met) leaves
    the static decoder on transformers' eager attention over the training row length, as it
    served before: same answers, not generate()'s ten-fold slower path, and the window
    stated."""
    from production.decode import decode_attention
    from tests.tiny_models import model_home, tiny_gpt_oss

    home = model_home(
        tmp_path / "home",
        tiny_gpt_oss(tmp_path / "gpt-oss"),
        chat_format="harmony",
        max_seq_length=256,
        more="context_window = 2048\n",
    )

    def engine(decode: str) -> Engine:
        return Engine(load_settings(home, {"server": {"decode": decode}}), "cpu")

    reference = _answers(engine("generate"), tokens=8)
    working = engine("static")
    assert working.decode == "static" and working.context_window == 2048
    assert working.model.config._attn_implementation == decode_attention.NAME
    assert _answers(working, tokens=8) == reference
    del working

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no kernel for this card")

    monkeypatch.setattr(decode_attention, "attention", broken)
    fallback = engine("static")
    assert fallback.decode == "static" and fallback.context_window == 256
    assert fallback.model.config._attn_implementation == "eager"
    assert _answers(fallback, tokens=8) == reference
