"""Jittered exponential backoff: the one rule for waiting between attempts (deliveries, connections)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Waits `base`, doubling with each failure in a row, never above `cap`."""

    base: float = 1.0
    cap: float = 60.0

    def delay(self, retries: int, jitter: float) -> float:
        """The wait before retry number `retries` (0 for the first); `jitter` in [0, 1] takes off up to half."""
        # Half fixed, half random: replicas restarted together spread out, and every wait still
        # grows, so a platform that is down is not hammered.
        growth: int = 2 ** min(retries, 16)  # typeshed types int ** int as Any (a negative power is a float)
        return min(self.cap, self.base * growth) * (0.5 + 0.5 * jitter)
