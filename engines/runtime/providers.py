"""Which ONNX Runtime execution providers to ask for: the pure choice behind the
``onnxruntime*`` backends. ``choose_backend`` only looks at names (requested backend, providers
the runtime offers, the ones that already failed here), so the selection rules are unit-tested
without any hardware.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from .base import BackendError
from .registry import AUTO, find_backend

#: the registry family these names belong to
FAMILY = "onnxruntime"

Device = Literal["cpu", "cuda", "tensorrt"]

TENSORRT_PROVIDER = "TensorrtExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"

# Fastest first: what an ONNX Runtime session asks for to run on each device.
_PROVIDERS: dict[Device, tuple[str, ...]] = {
    "tensorrt": (TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER),
    "cuda": (CUDA_PROVIDER, CPU_PROVIDER),
    "cpu": (CPU_PROVIDER,),
}
_LABEL: dict[Device, str] = {"tensorrt": "TensorRT", "cuda": "CUDA", "cpu": "CPU"}
_EXPLICIT: dict[str, Device] = {
    "onnxruntime-cpu": "cpu",
    "onnxruntime-cuda": "cuda",
    "onnxruntime-tensorrt": "tensorrt",
}
INSTALL_GPU = (
    "on an NVIDIA GPU machine replace onnxruntime with onnxruntime-gpu "
    "(pip uninstall onnxruntime && pip install onnxruntime-gpu)"
)


class BackendChoice(BaseModel):
    """Which backend to open, on which device, with which ONNX Runtime providers, and why."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    requested: str
    backend: Literal["onnxruntime"] = "onnxruntime"
    device: Device
    providers: tuple[str, ...]
    reason: str


def choose_backend(
    requested: str,
    available_providers: Sequence[str],
    failed: Mapping[str, str] | None = None,
) -> BackendChoice:
    """The backend to try next for ``requested``, given the providers this runtime offers.

    ``failed`` maps devices ("tensorrt", "cuda") that were tried here and did not start to the
    reason; ``auto`` and ``onnxruntime`` then fall through to the next fastest device.
    """
    failed = dict(failed or {})
    if requested != AUTO:
        spec = find_backend(requested)  # BackendError naming every backend when unknown
        if spec.family != FAMILY:
            raise BackendError(
                f"backend {requested!r} is the {spec.title} backend, not an onnxruntime "
                "provider: open it with open_backend"
            )
    available = set(available_providers)
    if requested in _EXPLICIT:
        device = _EXPLICIT[requested]
        provider = _PROVIDERS[device][0]
        if provider not in available:
            have = ", ".join(sorted(available)) or "none"
            raise BackendError(
                f"backend {requested!r} needs {provider}, which this onnxruntime build does not "
                f"have (it has: {have}); {INSTALL_GPU}"
            )
        if device in failed:
            raise BackendError(f"backend {requested!r} did not start: {failed[device]}")
        return BackendChoice(
            requested=requested,
            device=device,
            providers=_PROVIDERS[device],
            reason=f"{requested}: onnxruntime on {_LABEL[device]} ({provider}), as requested",
        )
    notes = []
    for device in ("tensorrt", "cuda"):
        if device in failed:
            notes.append(f"{_LABEL[device]} provider did not start ({failed[device]})")
        elif _PROVIDERS[device][0] in available:
            break
    else:
        device = "cpu"
    if device == "cpu" and not notes:
        notes.append(f"no CUDA or TensorRT provider in this onnxruntime build; {INSTALL_GPU}")
    provider = _PROVIDERS[device][0]
    reason = f"{requested}: onnxruntime on {_LABEL[device]} ({provider})"
    if notes:
        reason += "; " + "; ".join(notes)
    elif device == "cuda":
        reason += "; fastest provider here (no TensorRT provider in this onnxruntime build)"
    else:
        reason += "; fastest provider here"
    return BackendChoice(
        requested=requested, device=device, providers=_PROVIDERS[device], reason=reason
    )
