"""Pinning a worker process (the API worker, a training job) to its planned device. Runs
first thing in the worker, before torch is imported: CUDA_VISIBLE_DEVICES is only read when
CUDA initialises, and Unsloth patches transformers only if it is imported before it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from common import gpus
from common.config import Settings, device_plan
from common.devices import choose_backend, worker_env


def pin_device(settings: Settings, role: str) -> str:
    """In a worker process, before torch is imported: pin this process to its planned device
    (role "production" or "development") and return the device name to use inside it.

    A parent that already pinned the process (CUDA_VISIBLE_DEVICES and
    WHETSTONE_WORKER_DEVICE both set) wins, so `whetstone serve`/`train` decide once.
    """
    if "CUDA_VISIBLE_DEVICES" in os.environ and "WHETSTONE_WORKER_DEVICE" in os.environ:
        inside = os.environ["WHETSTONE_WORKER_DEVICE"]
    else:
        device = getattr(device_plan(settings, gpus.count()), role)
        env, inside = worker_env(device)
        os.environ.update(env)
    if role == "development" and inside.startswith("cuda"):
        _yield_cpu_to_serving()
    if role == "production":
        use_serving_allocator()
        use_compile_cache(settings.paths.compile_cache_dir)
    _import_unsloth_first(settings, inside, role)
    return inside


# torch's allocator in the API worker: expandable segments map the blocks a prompt frees back
# into one growing segment instead of leaving holes in fixed ones. Measured on an H100 (20B NF4
# shape, a prompt filling the 2,048-token window): the worker's card memory 16.1 GiB with the
# default segments, 15.8 GiB with these; same answers, same decode speed.
SERVING_ALLOCATOR = "expandable_segments:True"


def use_serving_allocator() -> None:
    """Before CUDA starts in this process: the API worker's allocator settings, unless
    PYTORCH_CUDA_ALLOC_CONF says otherwise."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", SERVING_ALLOCATOR)


def use_compile_cache(folder: Path) -> None:
    """Before torch starts in this process: keep inductor's and Triton's compiled artifacts
    in `folder` (the home's), not in /tmp, unless the environment already says where."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))


# A GPU training job needs few CPU threads. Measured with benchmarks/two_gpus.py on 2x H200
# (one run each): chat decode next to a training job fell to 0.80x of idle with torch's
# default threads and normal priority, 0.90x with these; TTFT stayed at 1.2x (not solved).
TRAINING_CPU_THREADS = 4


def _yield_cpu_to_serving() -> None:
    """In a GPU training job: few CPU threads and a lower priority, so the API worker's
    decode loop (CPU-bound: one kernel launch after another) keeps its cores."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(TRAINING_CPU_THREADS))
    with contextlib.suppress(OSError):
        os.nice(10)


def _import_unsloth_first(settings: Settings, device: str, role: str) -> None:
    """Unsloth patches transformers' model classes only if it is imported before them; where
    it will load the model, import it now, while nothing has imported transformers yet."""
    try:
        if choose_backend(settings, device, role) != "unsloth":
            return
    except RuntimeError:
        return  # the loader raises it again, where the model is loaded
    import unsloth  # noqa: F401
