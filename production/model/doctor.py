"""The torch side of `whetstone doctor`: what this machine can run, as JSON on stdout.

Runs in its own process because the orchestrator never imports torch:

    python -m production.model.doctor --home ~/.local/share/whetstone
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from common.config import ConfigError, load_settings
from production.model import base_model


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_facts() -> dict[str, Any]:
    import torch

    devices = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            devices.append(
                {
                    "index": index,
                    "name": torch.cuda.get_device_name(index),
                    "free_gib": round(free / 2**30, 2),
                    "total_gib": round(total / 2**30, 2),
                    "bf16": torch.cuda.is_bf16_supported(),
                }
            )
    return {
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "cuda_devices": devices,
        "cpu_threads": torch.get_num_threads(),
    }


# Peak GPU memory of one process per role, as nvidia-smi saw the card (the CUDA context
# included), on the GPT-OSS-20B shape in the real 4-bit layout. Serving: the API worker's
# Engine (static decoder, expert kernels) with an adapter active, answering a prompt that
# nearly fills the 2,048-token window, measured by benchmarks/worker_memory.py on an H100.
# Training: benchmarks.gpt_oss_24gb on an H200, each process capped at 24 GiB, a job of
# SFT + DPO on 32 corrections with replay (batch 4, rows of ~40-120 tokens) and the
# evaluation of candidate, champion and base. Longer rows need more for training.
MEASURED_GIB: dict[str, dict[str, Any]] = {
    "gpt-oss-20b": {
        # The card's peak (nvidia-smi, CUDA context included) with a 31,971-token prompt.
        "serving": 19.1,
        # The window serving was measured at, and whether its sliding layers kept a ring: a
        # different window moves the need by the KV cache's difference (kv_cache_gib).
        "serving_window": 32768,
        "serving_ring": True,
        "training": 18.4,
        "source": (
            "benchmarks/results/worker-memory-h100-20b-20261207-043500-window-32k.json "
            "(serving), benchmarks/results/gpt-oss-24gb-h200-20261202-074753.json (training)"
        ),
    },
}
# Kept free on a card beyond the measured peak: longer prompts, allocator fragmentation.
HEADROOM_GIB = 1.0

# The attention shape of each measured preset's model (its config.json), so doctor can say
# what a window costs without the weights on this machine.
KV_SHAPES: dict[str, dict[str, int]] = {
    "gpt-oss-20b": {
        "full_layers": 12,
        "sliding_layers": 12,
        "sliding_window": 128,
        "kv_heads": 8,
        "head_dim": 64,
        "bytes": 2,  # bf16
    },
}


def kv_cache_gib(shape: dict[str, int], window: int, *, ring: bool) -> float:
    """GiB the static decoder reserves for keys and values over `window` tokens. With `ring`
    (GPT-OSS through production.decode.decode_attention) a sliding layer keeps only its window."""
    per_token = 2 * shape["kv_heads"] * shape["head_dim"] * shape["bytes"]  # keys and values
    sliding = min(window, shape["sliding_window"]) if ring else window
    tokens = shape["full_layers"] * window + shape["sliding_layers"] * sliding
    return tokens * per_token / 2**30


def serving_need_gib(settings: Any) -> tuple[float, float] | None:
    """(serving worker's GiB at the configured window, of it the KV cache's GiB): the measured
    peak moved by the KV difference between the measured window and this one."""
    measured, shape = MEASURED_GIB.get(settings.model.preset), KV_SHAPES.get(settings.model.preset)
    if measured is None or shape is None:
        return None
    kv = kv_cache_gib(shape, settings.model.serving_window, ring=True)
    then = kv_cache_gib(shape, measured["serving_window"], ring=measured["serving_ring"])
    return measured["serving"] - then + kv, kv


def memory_fit(settings: Any, devices: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per GPU: the roles the device plan puts on it, what they need (measured) and whether
    they fit. None when the preset has no measured figures."""
    from common.config import device_plan

    measured = MEASURED_GIB.get(settings.model.preset)
    if measured is None or not devices:
        return None
    placed = device_plan(settings, len(devices))
    limit = settings.devices.memory_limit_gb
    serving, kv = serving_need_gib(settings) or (measured["serving"], None)
    need_of = {"serving": round(serving, 1), "training": measured["training"]}
    gpus = []
    for dev in devices:
        here = f"cuda:{dev['index']}"
        roles = [
            role
            for role, device in (("serving", placed.production), ("training", placed.development))
            if device == here
        ]
        usable = dev["total_gib"] if limit is None else min(limit, dev["total_gib"])
        need = sum(need_of[role] for role in roles)
        problems = [
            f"{role} needs about {need_of[role]} GiB; {usable} GiB usable"
            + (
                f" (a {settings.model.serving_window}-token window: lower model.context_window)"
                if role == "serving"
                else ""
            )
            for role in roles
            if need_of[role] + HEADROOM_GIB > usable
        ]
        if len(roles) == 2 and need + HEADROOM_GIB > dev["total_gib"]:
            problems.append(
                f"serving and training together need about {need:.1f} GiB of "
                f"{dev['total_gib']} GiB: a training job beside the serving worker runs out "
                "of memory on this card"
            )
        gpus.append(
            {
                "index": dev["index"],
                "total_gib": dev["total_gib"],
                "roles": roles,
                "need_gib": round(need, 1),
                "fits": not problems,
                "problems": problems,
            }
        )
    return {
        "measured_gib": measured,
        "serving_window": settings.model.serving_window,
        "kv_cache_gib": None if kv is None else round(kv, 2),
        "gpus": gpus,
    }


def model_check(settings: Any, facts: dict[str, Any]) -> dict[str, Any]:
    """Whether the configured model profile can be loaded here, and why not."""
    profile = settings.model
    out: dict[str, Any] = {"base_model": profile.base_model, "loadable": False, "problems": []}
    problems: list[str] = out["problems"]
    devices = facts["cuda_devices"]
    if profile.load_in_4bit or profile.backend == "unsloth":
        if not devices:
            problems.append(
                f"preset {profile.preset} needs CUDA (4-bit / Unsloth); no CUDA GPU is visible"
            )
        elif max(d["free_gib"] for d in devices) < profile.min_vram_gb:
            best = max(d["free_gib"] for d in devices)
            problems.append(
                f"needs about {profile.min_vram_gb} GiB free VRAM; the best GPU has {best} GiB free"
            )
        for dist in ("bitsandbytes",) + (("unsloth",) if profile.backend == "unsloth" else ()):
            if _version(dist) is None:
                problems.append(f"{dist} is not installed: pip install -e '.[gpu]'")
    try:
        where = base_model.resolve(settings, prepare=False)
    except base_model.BaseModelError as exc:
        problems.append(str(exc))
        return out
    out["path"] = where
    if not Path(where).exists():
        try:
            from huggingface_hub import snapshot_download

            snapshot_download(where, local_files_only=True)
        except Exception:
            problems.append(
                f"{where!r} is neither a local folder nor in the local hub cache; this machine has "
                "no hub access: copy the model folder here and set model.base_model to its path"
            )
    if problems:
        return out
    if Path(where).exists() and not profile.load_in_4bit:
        import torch
        from transformers import AutoModelForCausalLM

        started = time.monotonic()
        try:
            AutoModelForCausalLM.from_pretrained(where, dtype=torch.bfloat16)
        except Exception as exc:
            problems.append(f"loading {where} failed: {type(exc).__name__}: {exc}")
            return out
        out["load_seconds"] = round(time.monotonic() - started, 2)
    out["loadable"] = True
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--home", required=True, type=Path)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "versions": {
            d: _version(d)
            for d in ("transformers", "peft", "trl", "datasets", "accelerate", "unsloth")
        },
    }
    report.update(torch_facts())
    try:
        settings = load_settings(args.home)
    except ConfigError as exc:
        report["model"] = {"loadable": False, "problems": [str(exc)]}
    else:
        report["model"] = model_check(settings, report)
        report["memory_fit"] = memory_fit(settings, report["cuda_devices"])
    report["unsloth_importable"] = importlib.util.find_spec("unsloth") is not None
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
