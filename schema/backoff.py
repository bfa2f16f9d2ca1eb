"""Retry timing: capped exponential backoff with full jitter, a pure function."""

from __future__ import annotations

import random


def compute_backoff(
    attempt: int,
    base_s: float = 2.0,
    cap_s: float = 300.0,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry `attempt` (1-based): uniform in [0, min(cap, base * 2**(n-1))].

    Full jitter (AWS architecture blog, "Exponential Backoff And Jitter") spreads retries of many
    workers that failed together, e.g. when a storage server restarts. Keep `cap_s` well below
    the broker's visibility timeout: Celery holds countdown retries in worker memory.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    ceiling = min(cap_s, base_s * 2 ** (attempt - 1))
    return (rng or random).uniform(0, ceiling)
