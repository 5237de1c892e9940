"""The kept conversation cache (server.prompt_cache): a turn of the same conversation prefills
only what is new, and answers exactly what a fresh prefill answers (greedy, fp32 on the
CPU); a hot swap, an edited earlier turn and harmony's dropped analysis start over where
they must."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import load_settings
from production.engine import Engine, Outcome, Sampling
from tests.tiny_models import model_home, tiny_gpt_oss

GREEDY = Sampling(temperature=0, max_tokens=16)
TURNS = ("What is the capital of France?", "And of Germany?", "Name three colours.")


def _engine(home: Path, decode: str) -> Engine:
    # fp32: a prefill in two parts and one in a piece agree to ~1e-6, so greedy answers compare.
    overrides = {"server": {"decode": decode}, "model": {"dtype": "float32"}}
    return Engine(load_settings(home, overrides), "cpu")


def _kept_and_fresh(engine: Engine, prompt: list[int]) -> tuple[Outcome, Outcome]:
    """The answer with the cache as the last request left it, then with nothing kept."""
    kept = engine.stream(prompt, GREEDY, lambda d: None, lambda: False)
    engine.forget_prompts()
    fresh = engine.stream(prompt, GREEDY, lambda d: None, lambda: False)
    assert fresh.cached_tokens == 0
    assert (kept.text, kept.reasoning) == (fresh.text, fresh.reasoning)
    return kept, fresh


def _lora(out: Path, model_dir: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=every, init_lora_weights=False)
    with torch.no_grad():
        model = get_peft_model(base, lora)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.3)  # an answer that differs from the base's
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("decode", ["generate", "static"])
def test_each_turn_prefills_only_what_is_new_and_answers_as_a_fresh_prefill(
    home_with_model: Path, prepared_model_dir: Path, tmp_path: Path, decode: str
) -> None:
    engine = _engine(home_with_model, decode)
    assert engine.decode == decode
    messages: list[dict] = []
    last_prompt: list[int] = []
    for number, question in enumerate(TURNS):
        messages.append({"role": "user", "content": question})
        prompt = engine.prompt_ids(messages, None)
        kept, _ = _kept_and_fresh(engine, prompt)
        if number:  # the earlier turns, and the answer as the model wrote it, are not re-read
            assert kept.cached_tokens >= len(last_prompt), (number, kept.cached_tokens)
        messages.append({"role": "assistant", "content": kept.text})
        last_prompt = prompt

    # The person edits the first question: only the part before the edit is kept.
    edited = [{"role": "user", "content": "What is the capital of Spain?"}]
    prompt = engine.prompt_ids(edited, None)
    before_edit = len(engine.prompt_ids([{"role": "user", "content": ""}], None)) - 8
    kept, _ = _kept_and_fresh(engine, prompt)
    assert 0 < kept.cached_tokens < len(prompt) - 3
    assert kept.cached_tokens >= before_edit

    # The same question again (regenerate): all but the last token or two come from the cache.
    again, _ = _kept_and_fresh(engine, prompt)
    assert again.cached_tokens >= len(prompt) - 2

    # A hot swap: the cache answered for the old weights, so the next turn starts over.
    engine.load_adapter("qv", _lora(tmp_path / "qv", prepared_model_dir))
    engine.activate("qv")
    swapped = engine.stream(prompt, GREEDY, lambda d: None, lambda: False)
    assert swapped.cached_tokens == 0
    assert swapped.text != again.text, "the adapter changes the answer"
    kept, _ = _kept_and_fresh(engine, prompt)  # and from then on its own prompts are kept
    assert kept.cached_tokens >= len(prompt) - 2
    # Turns 2-3, the edit, the regenerate and the kept turn after the swap: five hits at least.
    assert engine.prompt_cache.hits >= 5 and engine.prompt_cache.requests == 13


def test_harmony_turns_restart_from_the_sliding_layers_kept_copy(tmp_path: Path) -> None:
    """GPT-OSS's sliding layers keep a ring of their window (8 here, so every prompt is past
    it). A harmony turn renders the last answer otherwise than the model wrote it, so the
    next prompt parts from what is held right after the last prompt: the rings go back to
    their copy of that prompt's end, and the answer is a fresh prefill's."""
    model = tiny_gpt_oss(tmp_path / "model", hidden=64, layers=4, sliding_window=8)
    engine = _engine(model_home(tmp_path / "home", model, chat_format="harmony"), "static")
    assert engine.static is not None and len(engine.static.rings) == 2
    messages: list[dict] = []
    last_prompt: list[int] = []
    rewound = 0
    for number, question in enumerate(TURNS):
        messages.append({"role": "user", "content": question})
        prompt = engine.prompt_ids(messages, None)
        held = list(engine.static.held)
        kept, _ = _kept_and_fresh(engine, prompt)
        if number:
            assert len(held) > len(last_prompt) > 8
            assert len(last_prompt) - 2 <= kept.cached_tokens < len(prompt)
            rewound += kept.cached_tokens < len(held)
        messages.append({"role": "assistant", "content": kept.text})
        last_prompt = prompt
    assert rewound, "no turn restarted inside what was held"
    again, _ = _kept_and_fresh(engine, last_prompt)
    assert again.cached_tokens == len(last_prompt) - 2


def test_a_prompt_prefilled_in_chunks_answers_as_in_one_forward(tmp_path: Path) -> None:
    """server.prefill_chunk bounds a long prompt's memory: prefilled 7 tokens at a time (the
    rings' window is 8, so chunks start inside it), the answer is the one forward's."""
    model = tiny_gpt_oss(tmp_path / "model", hidden=64, layers=4, sliding_window=8)
    engine = _engine(model_home(tmp_path / "home", model, chat_format="harmony"), "static")
    assert engine.static is not None and engine.settings.server.prefill_chunk == 8192
    messages = [{"role": "user", "content": " ".join(TURNS * 3)}]
    prompt = engine.prompt_ids(messages, None)
    answers = []
    for chunk in (0, 7, 0):
        engine.static.prefill_chunk = chunk
        engine.forget_prompts()
        answers.append(engine.stream(prompt, GREEDY, lambda d: None, lambda: False))
    assert len(prompt) > 50
    assert answers[0].text == answers[1].text == answers[2].text
    assert answers[0].reasoning == answers[1].reasoning
