"""Loading the base model: the prepared local folder onto the device, with the backend
`common.devices.choose_backend` picks (transformers, or Unsloth's FastLanguageModel), in the
dtype the settings and the device call for. The serving engine (`production.engine`) and the
training/evaluation jobs (`development.modeling`) load through here; adapters are theirs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.config import Settings
from common.devices import choose_backend
from production.model import base_model, gpu_memory


def pick_dtype(name: str, device: str) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). bf16 measured fine on
    such a CPU (SmolLM2 ~19 tok/s on 2 cores); on an AVX2-only AMD EPYC a 1024x1024 bf16
    matmul took 2.9 s against 0.017 s in float32, and a training step minutes."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_model(
    settings: Settings, device: str, *, for_training: bool, role: str = "development"
) -> tuple[Any, Any]:
    """The base model and tokenizer on `device` from the prepared local folder, with the
    backend `choose_backend` picks for `role`. Serving and the training/evaluation jobs share
    it."""
    from production.model import gpt_oss_layout

    path = base_model.resolve(settings)
    split_experts = gpt_oss_layout.has_split_experts(path)
    if split_experts and not settings.model.load_in_4bit:
        raise base_model.BaseModelError(
            f"{path} stores GPT-OSS experts as 4-bit Linears (Unsloth's bnb-4bit layout): "
            "set model.load_in_4bit = true"
        )
    gpu_memory.apply_limit(settings.devices.memory_limit_gb, device)
    if choose_backend(settings, device, role) == "unsloth":
        # Unsloth recognises the split-expert layout by its tensor names and installs its
        # own expert classes.
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=path,
            max_seq_length=settings.model.max_seq_length,
            load_in_4bit=settings.model.load_in_4bit,
            dtype=None,
        )
        if not for_training:
            FastLanguageModel.for_inference(model)
        return model, tokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    # Straight onto the device: loading a 42 GB bf16 GPT-OSS on the CPU and then moving it
    # did not finish in 200 s on an H200 machine.
    kwargs: dict[str, Any] = {
        "dtype": pick_dtype(settings.model.dtype, device),
        "device_map": {"": device},
    }
    if settings.model.load_in_4bit and not base_model.saved_quantized(path):
        from transformers import BitsAndBytesConfig

        # 16-bit checkpoints are quantized at load; a 4-bit one keeps its own config.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=kwargs["dtype"]
        )
    if split_experts:
        with gpt_oss_layout.split_experts_installed():
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model, tokenizer
