"""Capped exponential backoff with jitter: how every reconnect in linewatch waits (cameras, bridges).

Ground floor, standard library only, so a bridge or client process can use it without loading OpenCV.
"""

from __future__ import annotations

import random
from typing import Protocol


class BackoffPolicy(Protocol):
    initial_s: float  # the first delay
    max_s: float  # the cap
    jitter: float  # ± this fraction, so that many clients do not retry in step


def backoff_delay(attempt: int, policy: BackoffPolicy, rng: random.Random) -> float:
    """initial·2^attempt, capped at max_s, ± jitter (never above the cap)."""
    base = policy.initial_s * (2 ** min(attempt, 32))
    jittered = base * (1.0 + rng.uniform(-policy.jitter, policy.jitter))
    return max(0.0, min(policy.max_s, jittered))
