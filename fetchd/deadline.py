"""Deadlines that allow slow but steady transfers and stop tricklers.

A fixed timeout around a whole transfer fails a large message on a slow link for ever; a
timeout per read lets a server that sends a byte every few seconds hold a poll for days. The
rule here: a reply must arrive within ``timeout`` plus one second per MIN_RATE bytes received,
and no read may wait longer than ``timeout``.
"""

from __future__ import annotations

MIN_RATE = 1024  # bytes per second a transfer must average to stay alive


class Progress:
    """The deadline of one reply, extended by the data that arrived."""

    def __init__(self, timeout: float, now: float) -> None:
        self.timeout = timeout
        self.start = now
        self.received = 0

    def remaining(self, now: float) -> float:
        return self.start + self.timeout + self.received / MIN_RATE - now
