"""Latency and rate summaries shared by the hook, the receiver and the CLI."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class Samples:
    """The last ``capacity`` values in a preallocated array: memory is flat from the start."""

    def __init__(self, capacity: int = 1 << 16) -> None:
        self._values = np.empty(capacity, dtype=np.float64)
        self._n = 0

    def append(self, value: float) -> None:
        self._values[self._n % len(self._values)] = value
        self._n += 1

    def values(self) -> np.ndarray:
        """A copy of the values held (oldest order is not kept once full)."""
        return self._values[: min(self._n, len(self._values))].copy()

    def __len__(self) -> int:
        return min(self._n, len(self._values))


def percentiles(samples: Sequence[float] | np.ndarray | Samples) -> dict[str, float | None]:
    """p50/p90/p99/max of ``samples`` (None when there are none), in the samples' unit."""
    a = samples.values() if isinstance(samples, Samples) else np.asarray(samples, dtype=float)
    if a.size == 0:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(a.max())}
