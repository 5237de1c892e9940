"""Streamed text held back while it might still become a marker (a stop string, a tool-call
tag): what the stop-string filter and the hermes tool-call parser share."""

from __future__ import annotations


def partial_suffix(text: str, marker: str) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of `marker`: text
    to hold back while it might still become `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
