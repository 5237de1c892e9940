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
