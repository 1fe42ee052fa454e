"""Runtime backends that run an engine package, and ``open_backend`` that picks one and says why.

``auto`` takes the fastest backend that actually starts here (TensorRT > CUDA > CPU providers
of ONNX Runtime); a GPU provider that is offered but does not start is skipped with its reason.
"""

from __future__ import annotations

from ..package import EnginePackage
from .base import BACKENDS, Backend, BackendChoice, BackendError, choose_backend

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendChoice",
    "BackendError",
    "choose_backend",
    "open_backend",
]


def open_backend(
    package: EnginePackage, backend: str = "auto", threads: int | None = None
) -> tuple[Backend, str]:
    """Open ``backend`` for ``package``; return it and a one-line reason for the choice."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    from .onnxruntime import OnnxRuntimeBackend, available_providers

    available = available_providers()
    failed: dict[str, str] = {}
    while True:
        choice = choose_backend(backend, available, failed)
        try:
            return OnnxRuntimeBackend(package, choice, threads=threads), choice.reason
        except BackendError as e:
            if choice.requested.startswith("onnxruntime-") or choice.device == "cpu":
                raise
            failed[choice.device] = str(e)
