"""Latency and rate summaries shared by the hook, the receiver and the CLI."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def percentiles(samples: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """p50/p90/p99/max of ``samples`` (None when there are none), in the samples' unit."""
    a = np.asarray(samples, dtype=float)
    if a.size == 0:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(a.max())}
