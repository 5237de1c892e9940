"""GPU memory of this process: the configured cap (`devices.memory_limit_gb`) and the peak of
each stage of a job, so a report can say what a 24 GB card needs at every step."""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

GIB = 2**30


def apply_limit(limit_gb: float | None, device: str) -> None:
    """Cap torch's caching allocator on `device` at `limit_gb` GiB; past it, allocations
    fail with an out-of-memory error as on a card of that size."""
    if limit_gb is None or not device.startswith("cuda"):
        return
    total = torch.cuda.get_device_properties(device).total_memory
    if limit_gb * GIB >= total:
        log.info("devices.memory_limit_gb = %s is above the card's %.1f GiB", limit_gb, total / GIB)
        return
    torch.cuda.set_per_process_memory_fraction(limit_gb * GIB / total, device)
    log.info("GPU memory capped at %.1f GiB of %.1f GiB on %s", limit_gb, total / GIB, device)


def snapshot(device: str, limit_gb: float | None = None) -> dict[str, Any] | None:
    """This process's GPU memory now and at its peak (GiB); None on the CPU."""
    if not device.startswith("cuda"):
        return None
    return {
        "allocated_gib": round(torch.cuda.memory_allocated(device) / GIB, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 2),
        "reserved_gib": round(torch.cuda.memory_reserved(device) / GIB, 2),
        "limit_gib": limit_gb,
        "card_gib": round(torch.cuda.get_device_properties(device).total_memory / GIB, 1),
    }


class StagePeaks:
    """Peak allocated GiB per named stage, in order: `mark(name)` closes the stage that ran
    since the last mark (or since creation) and starts the next."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.device = device
        self.peaks: dict[str, float] = {}
        self.reset()

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def mark(self, name: str) -> float | None:
        if not self.cuda:
            return None
        peak = round(torch.cuda.max_memory_allocated(self.device) / GIB, 2)
        self.peaks[name] = peak
        log.info("peak GPU memory in %s: %.2f GiB", name, peak)
        self.reset()
        return peak

    def as_dict(self) -> dict[str, Any]:
        return dict(self.peaks)
