"""The device plan: which GPU (or the CPU) each worker gets, decided without torch.

2+ GPUs: production cuda:0, development cuda:1. One GPU: both on it (training waits for
chat to be idle). No GPU: both on the CPU. Explicit config values win over `auto`.

A worker process is pinned by setting CUDA_VISIBLE_DEVICES *before* torch is imported; inside
it, its one visible GPU is then `cuda:0`.
"""

from __future__ import annotations

from common.config import Settings, device_plan


def worker_env(device: str) -> tuple[dict[str, str], str]:
    """Environment for a worker on `device` (numbered among the GPUs whetstone may use), and
    the device name to use inside it."""
    from common import gpus

    outer = {gpus.WHETSTONE_GPUS: gpus.usable() or "all"}
    if device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""} | outer, "cpu"
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    return {"CUDA_VISIBLE_DEVICES": gpus.physical(index)} | outer, "cuda:0"


def child_env(settings: Settings, role: str) -> dict[str, str]:
    """The environment for a worker subprocess of `role` ("production" or "development"):
    this one's, pinned to the planned device, with the in-process device name for the child
    (read back by `pin_device`)."""
    import os

    from common import gpus

    env, inside = worker_env(getattr(device_plan(settings, gpus.count()), role))
    return os.environ | env | {"WHETSTONE_WORKER_DEVICE": inside}


def serving_decode(settings: Settings, device: str) -> str:
    """How the API worker decodes: "static" (static KV cache, merged adapter, CUDA-graph step
    on CUDA) or "generate" (transformers' generate over PEFT).

    auto picks static on CUDA for 16-bit dense models and for GPT-OSS in bf16 or 4 bits (its
    experts run through production.decode.moe_decode's kernels), unless model.backend is "unsloth":
    that asks for Unsloth's own inference path."""
    wanted = settings.server.decode
    if wanted != "auto":
        return wanted
    if not device.startswith("cuda") or settings.model.backend == "unsloth":
        return "generate"
    if is_gpt_oss(settings):
        return "static"
    sixteen_bit = not settings.model.load_in_4bit
    return "static" if sixteen_bit and not _mixture_of_experts(settings) else "generate"


def _base_config(settings: Settings) -> dict:
    """The base model's config.json (a local folder), {} when there is none to read."""
    import json
    from pathlib import Path

    try:
        return json.loads((Path(settings.model.base_model) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def is_gpt_oss(settings: Settings) -> bool:
    return _base_config(settings).get("model_type") == "gpt_oss"


def _mixture_of_experts(settings: Settings) -> bool:
    """Whether the base model (a local folder) routes to experts: other than GPT-OSS, the
    static decoder has no expert kernels for them (their host-synced loops cannot be captured)."""
    config = _base_config(settings)
    return any(config.get(key) for key in ("num_local_experts", "num_experts", "n_routed_experts"))


def choose_backend(settings: Settings, device: str, role: str = "development") -> str:
    """transformers or unsloth, from `model.backend` and whether Unsloth is installed.

    Serving a 16-bit model on CUDA, `auto` means transformers: the static decoder outruns
    Unsloth's for_inference there (benchmarks/results/serving-*.json). Training takes Unsloth
    whenever it is installed."""
    wanted = settings.model.backend
    if wanted == "transformers" or not device.startswith("cuda"):
        if wanted == "unsloth":
            raise RuntimeError("model.backend = 'unsloth' needs a CUDA device")
        return "transformers"
    if wanted == "auto" and role == "production" and serving_decode(settings, device) == "static":
        return "transformers"
    import importlib.util

    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if wanted == "unsloth" and not has_unsloth:
        raise RuntimeError("model.backend = 'unsloth' but unsloth is not installed: .[gpu]")
    return "unsloth" if has_unsloth else "transformers"
