"""The card's view of GPU memory (nvidia-smi), sampled in a thread while a benchmark runs: what
a process really holds, CUDA context, kernels and torch's cached blocks included, which is what
has to fit on the person's card. torch's own counters (allocated, reserved) leave the context
and the cached-but-free blocks of other pools out.

    with CardMemory() as card:
        ...                      # start-up
        card.mark("start-up")    # peak MiB since the last mark, per stage
        ...
        card.mark("steady")
    card.stages  # {"start-up": {"process_mib": ..., "card_mib": ...}, "steady": {...}}
"""

from __future__ import annotations

import os
import subprocess
import threading
from typing import Any

PERIOD_S = 0.2


def _query(args: list[str]) -> list[list[str]]:
    out = subprocess.run(
        ["nvidia-smi", *args, "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line.strip()]


def read_mib(pid: int, gpu_index: int) -> tuple[int | None, int | None, str]:
    """(this process's MiB, the card's used MiB, where the process figure came from). A
    container may show other pids than the process's own (another pid namespace): then the sum
    over every compute process on the card stands in for it."""
    try:
        card = int(_query(["-i", str(gpu_index), "--query-gpu=memory.used"])[0][0])
        rows = _query(["-i", str(gpu_index), "--query-compute-apps=pid,used_memory"])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None, None, "unavailable"
    used = {int(p): int(m) for p, m in rows if p.isdigit() and m.isdigit()}
    if pid in used:
        return used[pid], card, "pid"
    return (sum(used.values()) if used else None), card, "all compute processes"


def _gpu_index() -> int:
    """The physical index of cuda:0 (nvidia-smi numbers cards as the host does)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(visible) if visible.isdigit() else 0


class CardMemory:
    """Peak nvidia-smi memory of process `pid` (default: this one) and of its card, per stage."""

    def __init__(self, pid: int | None = None, gpu_index: int | None = None) -> None:
        self.pid = pid or os.getpid()
        self.gpu_index = _gpu_index() if gpu_index is None else gpu_index
        self.stages: dict[str, dict[str, Any]] = {}
        self.source = "unavailable"
        self._peak = {"process_mib": 0, "card_mib": 0}
        self._last = {"process_mib": 0, "card_mib": 0}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="card-memory")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(PERIOD_S)

    def sample(self) -> None:
        process, card, source = read_mib(self.pid, self.gpu_index)
        with self._lock:
            self.source = source if process is not None else self.source
            for key, value in (("process_mib", process), ("card_mib", card)):
                if value is not None:
                    self._last[key] = value
                    self._peak[key] = max(self._peak[key], value)

    def mark(self, stage: str) -> dict[str, Any]:
        """Close `stage`: its peaks (MiB and GiB) and the figures now; the next stage starts."""
        self.sample()  # a stage shorter than the period still gets one reading
        with self._lock:
            row = {
                "process_peak_mib": self._peak["process_mib"],
                "card_peak_mib": self._peak["card_mib"],
                "process_now_mib": self._last["process_mib"],
                "process_peak_gib": round(self._peak["process_mib"] / 1024, 2),
                "process_source": self.source,
            }
            self._peak = dict(self._last)
        self.stages[stage] = row
        return row

    def __enter__(self) -> CardMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
