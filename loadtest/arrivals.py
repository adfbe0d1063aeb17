"""When requests are sent: Poisson or gamma inter-arrival times, as vLLM's `bench serve`.

Gamma intervals with shape = burstiness and mean 1/rate: burstiness 1 is a Poisson process,
below 1 burstier (clumps and gaps), above 1 more even. An infinite rate sends all at once.
"""

from __future__ import annotations

import math

import numpy as np


def intervals(n: int, request_rate: float, burstiness: float = 1.0,
              seed: int = 0) -> np.ndarray:
    """n waits in seconds; the i-th request is sent intervals[:i+1].sum() after the start.

    The first request waits too (as in vLLM), so the schedule has no special first element.
    """
    if request_rate <= 0 or math.isnan(request_rate):
        raise ValueError(f"--request-rate must be > 0 (or inf), got {request_rate}")
    if burstiness <= 0 or not math.isfinite(burstiness):
        raise ValueError(f"--burstiness must be a positive number, got {burstiness}")
    if math.isinf(request_rate):
        return np.zeros(n)
    # Mean of gamma(k, theta) is k * theta; theta = 1 / (rate * k) keeps the mean at 1/rate.
    theta = 1.0 / (request_rate * burstiness)
    return np.random.default_rng(seed).gamma(shape=burstiness, scale=theta, size=n)


def send_times(n: int, request_rate: float, burstiness: float = 1.0,
               seed: int = 0) -> np.ndarray:
    """Offsets in seconds from the benchmark start at which each request is due."""
    return np.cumsum(intervals(n, request_rate, burstiness, seed))
