"""The embedded default model: prepared once from the wheel's GGUF, then loaded from the home."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.config import load_settings
from common.home import Home
from production.model import base_model
from tests.conftest import REPO


def test_resolve_uses_the_prepared_home_copy(home_with_model: Path) -> None:
    settings = load_settings(home_with_model, gpu_count=0)
    path = Path(base_model.resolve(settings, prepare=False))
    assert path == home_with_model.resolve() / "models" / "smollm2-135m-instruct"
    assert (path / "model.safetensors").exists() and (path / "chat_template.jinja").exists()


def test_unprepared_model_without_prepare_says_what_to_run(home: Path) -> None:
    settings = load_settings(home, gpu_count=0)
    with pytest.raises(base_model.BaseModelError, match="whetstone doctor --home"):
        base_model.resolve(settings, prepare=False)


def test_custom_base_model_folder_without_config_is_refused(home: Path, tmp_path: Path) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    settings = load_settings(
        home, {"model": {"preset": "custom", "base_model": str(empty)}}, gpu_count=0
    )
    with pytest.raises(base_model.BaseModelError, match="without config.json"):
        base_model.resolve(settings)


def test_prepared_model_answers_a_simple_question(prepared_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepared_model_dir)
    model = AutoModelForCausalLM.from_pretrained(prepared_model_dir, dtype=torch.bfloat16)
    assert tokenizer.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == 2
    assert model.generation_config.do_sample is False  # greedy unless a request asks to sample
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    # It stopped at its end-of-turn token instead of running on to max_new_tokens.
    assert out[0, -1].item() == tokenizer.eos_token_id


@pytest.mark.slow
def test_prepare_survives_kill_then_runs_once_then_loads_fast(home: Path) -> None:
    cmd = [sys.executable, "-m", "production.model.base_model", "--home", str(home), "--quiet"]
    target = Home(home).models_dir / "smollm2-135m-instruct"

    # kill -9 halfway through: nothing half-written where loaders look.
    victim = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(8)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not base_model.is_prepared(target)
    assert not target.exists()

    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert base_model.is_prepared(target)
    weights_mtime = (target / "model.safetensors").stat().st_mtime_ns
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # the dead temp is gone

    started = time.monotonic()
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert time.monotonic() - started < 10  # no second conversion (that takes ~25 s)
    assert (target / "model.safetensors").stat().st_mtime_ns == weights_mtime


def test_preparing_the_model_draws_one_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    """A newcomer saw transformers' four bars drawn under whetstone's own while the GGUF was
    read and copied; only whetstone's (made before, on the real stderr) shows."""
    from tqdm import tqdm

    ours = tqdm(total=1, desc="preparing the model", file=sys.stderr)
    with base_model.libraries_quiet():
        for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors"):
            pass
        ours.update()
    ours.close()
    shown = capsys.readouterr().err
    assert "preparing the model" in shown and "1/1" in shown
    assert "Converting" not in shown
