"""GPT-OSS on the product's path, on CPU: a tiny random GPT-OSS (mixture of experts, sliding
and full attention) with a harmony tokenizer learns a taught fact through the real training
job, then the real API worker serves it, streams it and parses its channels.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, run_cli
from tests.tiny_models import TAUGHT_FACT as FACT
from tests.tiny_models import TAUGHT_QUESTIONS as QUESTIONS
from tests.tiny_models import model_home, teach, teach_profile, tiny_gpt_oss

pytestmark = pytest.mark.slow


def test_harmony_model_trains_on_the_final_channel_and_serves_it(tmp_path: Path) -> None:
    harmony_round_trip(tmp_path, backend="transformers")


def harmony_round_trip(tmp_path: Path, backend: str) -> dict:
    """Train through the real job, promote, serve through the real worker (tests/test_gpu.py
    runs it on CUDA with backend "auto": Unsloth trains, the static decoder serves). Returns
    the candidate's meta config and the worker's /v1/status."""
    from trl.data_utils import apply_chat_template

    from common.config import load_settings
    from data.store import Store

    model_dir = tiny_gpt_oss(tmp_path / "tiny-gpt-oss")
    home = model_home(
        tmp_path / "home",
        model_dir,
        backend=backend,
        chat_format="harmony",
        more=teach_profile(100),
    )
    settings = load_settings(home)
    teach(home)

    # What TRL trains on (completion_only_loss): the prompt ends at `<|start|>assistant`, so
    # the loss covers only the final-channel message the person wrote.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    row = {
        "prompt": [{"role": "user", "content": QUESTIONS[0]}],
        "completion": [{"role": "assistant", "content": FACT}],
    }
    rendered = apply_chat_template(row, tokenizer)
    assert rendered["prompt"].endswith("<|start|>assistant")
    assert rendered["completion"] == f"<|channel|>final<|message|>{FACT}<|end|>"

    trained = run_cli("train", "--home", str(home), "--wait", "--force", "--no-promote")
    assert "trained candidate" in trained.stdout, trained.stdout + trained.stderr
    candidate_id = trained.stdout.split("trained candidate ")[1].split()[0]
    promoted = run_cli("promote", candidate_id, "--force", "--home", str(home))
    assert promoted.returncode == 0, promoted.stderr

    server = ServerProcess(home).wait_ready()
    try:
        body = {
            "messages": [{"role": "user", "content": QUESTIONS[1]}],
            "stream": True,
            "temperature": 0,
            "max_tokens": 40,
            "include_reasoning": True,
        }
        content, finish = [], None
        with httpx.stream(
            "POST", f"{server.url}/v1/chat/completions", json=body, timeout=120
        ) as response:
            message_id = response.headers["X-Whetstone-Message-Id"]
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    for choice in chunk.get("choices", []):
                        content.append(choice["delta"].get("content") or "")
                        finish = choice.get("finish_reason") or finish
        answer = "".join(content)
        # The channel markup is parsed away: the person sees the final channel only, and
        # generation ended at the final message's <|end|>, not at max_tokens.
        assert answer.strip() == FACT, answer
        assert "<|" not in answer
        assert finish == "stop"
        with Store(settings.db_url) as store:
            stored = store.get_message(message_id)
        assert stored.content.strip() == FACT
        assert stored.adapter_id == candidate_id
        status = httpx.get(f"{server.url}/v1/status", timeout=10).json()
    finally:
        server.stop()
    from candidates import Registry

    return {"trained": Registry(home / "candidates").get(candidate_id).meta.config} | {
        "served": {k: status.get(k) for k in ("backend", "decode", "device")}
    }


def test_dpo_after_sft_keeps_the_harmony_header_of_the_taught_answer(tmp_path: Path) -> None:
    """DPO only moves the margin between the chosen and the rejected answer, so the harmony
    header both share (`<|channel|>final<|message|>`) gets no gradient and drifts. At a sharp
    preference learning rate plain DPO (dpo_sft_weight = 0) breaks it while the fact itself
    survives (the 4-bit GPT-OSS on an H200 did so at the test profile's own rate); the default
    adds the chosen answer's NLL to the loss and the served answer stays the taught one."""
    import subprocess
    import sys

    from candidates import Registry
    from common.config import load_settings
    from production.engine import Engine, Sampling
    from tests.conftest import REPO

    model_dir = tiny_gpt_oss(tmp_path / "tiny-gpt-oss")
    # 6e-3: at 3e-3 whether plain DPO broke the tiny model's header came and went with the
    # replay rows (the random base answers' text, which changed with the harmony parser).
    sharp_dpo = "preference_steps = 30\npreference_learning_rate = 6e-3\n"
    answers = {}
    for weight in ("0", "default"):
        stage = sharp_dpo + ("" if weight == "default" else f"dpo_sft_weight = {weight}\n")
        profile = teach_profile(100).replace("preference_steps = 0\n", stage)
        home = model_home(
            tmp_path / f"home-{weight}", model_dir, chat_format="harmony", more=profile
        )
        teach(home)
        job = subprocess.run(
            [sys.executable, "-m", "development.train", "--no-evaluate", "--force", "--home", home],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=600,
        )
        assert job.returncode == 0, job.stderr[-3000:]
        (candidate,) = Registry(home / "candidates").list()
        stages = candidate.meta.metrics["training"]["stages"]
        assert [s["name"] for s in stages] == ["sft", "dpo"]

        engine = Engine(load_settings(home), "cpu")
        engine.load_adapter(candidate.id, home / "candidates" / candidate.id)
        engine.activate(candidate.id)
        prompt = engine.prompt_ids([{"role": "user", "content": QUESTIONS[1]}], None)
        outcome = engine.stream(
            prompt, Sampling(temperature=0, max_tokens=24), lambda d: None, lambda: False
        )
        answers[weight] = (outcome.text.strip(), outcome.finish_reason)

    assert answers["default"] == (FACT, "stop"), answers
    # What the knob is for: without it the same run loses the final channel.
    assert answers["0"][0] != FACT, answers
