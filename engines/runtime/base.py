"""The backend interface every runtime implements, and the error they raise.

Which backends exist, and in which order ``auto`` tries them, is ``registry``'s table; how the
ONNX Runtime backend picks its execution providers is ``providers``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from calibration.errors import ScopecastError


class BackendError(ScopecastError, RuntimeError):
    """A backend cannot be opened or run here; the message says which and what to install."""


def feed(
    engine: str, needed: Sequence[str], inputs: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The model's inputs as C-contiguous float32, in its order; BackendError naming any missing."""
    return feed_typed(engine, dict.fromkeys(needed, np.dtype(np.float32)), inputs)


def feed_typed(
    engine: str, dtypes: Mapping[str, np.dtype[Any]], inputs: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The model's inputs, each C-contiguous in the dtype it takes (a raw-io model's uint16
    frames; no copy when it already is), in its order; BackendError naming any missing."""
    missing = [n for n in dtypes if n not in inputs]
    if missing:
        raise BackendError(f"engine {engine!r} needs inputs {missing}; got {sorted(inputs)}")
    return {n: np.ascontiguousarray(inputs[n], dtype=t) for n, t in dtypes.items()}


@runtime_checkable
class Backend(Protocol):
    """Runs one engine: float32 inputs by name in, the model's first output (float32) out."""

    name: str
    device: str

    def infer(self, inputs: dict[str, np.ndarray]) -> np.ndarray: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...
