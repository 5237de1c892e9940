"""GPU facts without importing torch (the orchestrator must never load it)."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_total_mib: int
    memory_free_mib: int


# Set by whetstone on every process it pins to one GPU: the CUDA_VISIBLE_DEVICES that
# whetstone itself was started with ("all" when unset). A pinned worker that starts a job
# (`POST /v1/train` under `whetstone serve`) plans over the machine's GPUs from it, not over
# the one GPU it was pinned to (it used to put the job on the serving GPU).
WHETSTONE_GPUS = "WHETSTONE_GPUS"


def usable() -> str | None:
    """The CUDA_VISIBLE_DEVICES whetstone was started with (None: every GPU)."""
    outer = os.environ.get(WHETSTONE_GPUS)
    if outer is not None:
        return None if outer == "all" else outer
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def physical(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES value for the `index`-th GPU whetstone may use."""
    outer = usable()
    if outer is None:
        return str(index)
    wanted = [v.strip() for v in outer.split(",") if v.strip() and v.strip() != "-1"]
    return wanted[index] if index < len(wanted) else str(index)


def list_gpus() -> list[Gpu]:
    """GPUs whetstone may use per nvidia-smi: those of the CUDA_VISIBLE_DEVICES it was
    started with, numbered from 0 as its processes see them."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=index,name,memory.total,memory.free",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    found = []
    for line in out.strip().splitlines():
        index, name, total, free = (part.strip() for part in line.split(","))
        found.append(Gpu(int(index), name, int(float(total)), int(float(free))))
    visible = usable()
    if visible is None:
        return found
    wanted = [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"]
    by_index = {str(g.index): g for g in found}
    # Renumber: inside this process the first visible GPU is cuda:0.
    return [
        Gpu(i, g.name, g.memory_total_mib, g.memory_free_mib)
        for i, g in enumerate(by_index[w] for w in wanted if w in by_index)
    ]


def count() -> int:
    return len(list_gpus())
