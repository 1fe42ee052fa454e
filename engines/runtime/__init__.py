"""Runtime backends that run an engine package, and ``open_backend`` that picks one and says why.

The backends are rows of ``registry`` (name, module, family, availability check, place in
``auto``). ``auto`` takes the first in that order that actually starts here: a TensorRT plan run
natively (``tensorrt``, when TensorRT, pycuda and a GPU are present and the package has a plan
for this machine, or one can be rebuilt by the ``rebuild`` the caller hands in), then OpenVINO
on the CPU (``openvino``: where it is installed, on x86-64, unless ONNX Runtime offers a GPU
provider), then ONNX Runtime's TensorRT > CUDA > CPU providers; one that is offered but does
not start is skipped with its reason.
"""

from __future__ import annotations

from ..package import EnginePackage
from .base import Backend, BackendError
from .plans import MachineFacts, PlanRebuilder, Rebuilt
from .providers import BackendChoice, choose_backend
from .registry import (
    AUTO,
    BackendSpec,
    OpenOptions,
    auto_order,
    backend_help,
    backend_names,
    backend_specs,
    find_backend,
    register_backend,
    unregister_backend,
)

__all__ = [
    "Backend",
    "BackendChoice",
    "BackendError",
    "BackendSpec",
    "MachineFacts",
    "OpenOptions",
    "PlanRebuilder",
    "Rebuilt",
    "auto_order",
    "backend_help",
    "backend_names",
    "backend_specs",
    "backend_status",
    "choose_backend",
    "find_backend",
    "open_backend",
    "register_backend",
    "unregister_backend",
]


def open_backend(
    package: EnginePackage,
    backend: str = AUTO,
    threads: int | None = None,
    *,
    precision: str | None = None,
    facts: MachineFacts | None = None,
    rebuild: PlanRebuilder | None = None,
) -> tuple[Backend, str]:
    """Open ``backend`` for ``package``; return it and a one-line reason for the choice.

    ``precision`` picks the TensorRT plan's precision (None: the package's first plan that fits
    this machine); ``facts`` replaces the machine's own TensorRT facts (tests); ``rebuild``
    rebuilds a TensorRT plan missing for this GPU (``engines.offline.build.rebuild_plan``, passed
    by the commands; None: such a package is a BackendError naming the build command).
    """
    options = OpenOptions(threads=threads, precision=precision, facts=facts, rebuild=rebuild)
    if backend != AUTO:
        spec = find_backend(backend)
        why = spec.unavailable(options)
        if why is not None:
            raise BackendError(f"backend {backend!r} is not available here: {why}")
        return spec.open_backend(package, backend, options)
    notes: list[str] = []
    error: BackendError | None = None  # the last backend's, when it failed to open
    for spec in auto_order():
        error = None
        why = spec.unavailable(options)
        if why is None:
            try:
                opened, reason = spec.open_backend(package, AUTO, options)
            except BackendError as e:
                why, error = str(e), e
            else:
                return opened, "; ".join([reason, *notes])
        notes.append(f"{spec.title} not used: {why}")
    if error is not None:  # the last resort's own error, then why the faster ones were not used
        raise BackendError("; ".join([str(error), *notes[:-1]])) from error
    raise BackendError(f"no backend can run here: {'; '.join(notes) or 'none registered'}")


def backend_status(facts: MachineFacts | None = None) -> dict[str, str]:
    """Each backend family and whether it can run here: a version and devices, or
    ``not available here (reason)``. Cheap: opens no model."""
    options = OpenOptions(facts=facts)
    return {spec.family: spec.describe_here(options) for spec in backend_specs()}
