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


def list_gpus() -> list[Gpu]:
    """GPUs visible to this process per nvidia-smi, honouring CUDA_VISIBLE_DEVICES."""
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
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
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
