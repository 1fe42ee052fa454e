"""Runtime backends that run an engine package, and ``open_backend`` that picks one and says why.

``auto`` takes the fastest backend that actually starts here: a TensorRT plan run natively
(``tensorrt``, when TensorRT, pycuda and a GPU are present and the package has a plan for this
machine or one that can be rebuilt), then ONNX Runtime's TensorRT > CUDA > CPU providers; a GPU
option that is offered but does not start is skipped with its reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ..package import EnginePackage
from .base import BACKENDS, Backend, BackendChoice, BackendError, choose_backend
from .plans import MachineFacts

T = TypeVar("T")

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendChoice",
    "BackendError",
    "backend_status",
    "choose_backend",
    "open_backend",
    "open_tensorrt",
]


def open_backend(
    package: EnginePackage,
    backend: str = "auto",
    threads: int | None = None,
    *,
    precision: str | None = None,
    facts: MachineFacts | None = None,
) -> tuple[Backend, str]:
    """Open ``backend`` for ``package``; return it and a one-line reason for the choice.

    ``precision`` picks the TensorRT plan's precision (None: the package's first plan that fits
    this machine); ``facts`` replaces the machine's own TensorRT facts (tests).
    """
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    tensorrt_note = ""
    if backend in ("auto", "tensorrt"):
        try:
            return open_tensorrt(package, backend, precision=precision, facts=facts)
        except BackendError as e:
            if backend == "tensorrt":
                raise
            tensorrt_note = f"; TensorRT not used: {e}"
    from .onnxruntime import OnnxRuntimeBackend, available_providers

    available = available_providers()
    failed: dict[str, str] = {}
    while True:
        choice = choose_backend(backend, available, failed)
        try:
            opened = OnnxRuntimeBackend(package, choice, threads=threads)
        except BackendError as e:
            if choice.requested.startswith("onnxruntime-") or choice.device == "cpu":
                raise
            failed[choice.device] = str(e)
            continue
        return opened, choice.reason + tensorrt_note


def open_tensorrt(
    package: EnginePackage,
    requested: str = "tensorrt",
    *,
    precision: str | None = None,
    facts: MachineFacts | None = None,
) -> tuple[Backend, str]:
    """The native TensorRT backend for ``package``: a matching plan, or one rebuilt (timed,
    numerics-checked) from the package's ONNX; BackendError says why neither works here."""
    from .plans import machine_facts, needed_shapes, select_plan

    facts = facts or machine_facts()
    if not facts.usable:
        raise BackendError(facts.problem)
    choice = select_plan(
        package.manifest, facts, precision=precision, shapes=needed_shapes(package.manifest),
        build_missing=requested == "tensorrt",
    )  # fmt: skip
    if choice.action == "fallback":
        raise BackendError(choice.reason)
    from .tensorrt import TensorRtBackend

    if choice.action == "use":
        assert choice.plan is not None
        plan = choice.plan
        return _gpu(lambda: TensorRtBackend(package, plan)), (
            f"{requested}: TensorRT {plan.precision} plan on {facts.gpu}; {choice.reason}"
        )
    from ..build import rebuild_plan

    rebuilt = _gpu(lambda: rebuild_plan(package, choice))
    backend = _gpu(
        lambda: TensorRtBackend(rebuilt.package, rebuilt.plan, plan_bytes=rebuilt.plan_bytes)
    )
    return backend, (
        f"{requested}: TensorRT {rebuilt.plan.precision} plan on {facts.gpu}, rebuilt in "
        f"{rebuilt.seconds:.1f} s and checked ({rebuilt.report.summary()}), {rebuilt.saved}; "
        f"{choice.reason}"
    )


def _gpu(step: Callable[[], T]) -> T:
    """Run a GPU step (build, open), turning driver and TensorRT failures into BackendError."""
    try:
        return step()
    except BackendError:
        raise
    except Exception as e:  # pycuda and tensorrt raise their own error types; a plan's I/O
        raise BackendError(f"the TensorRT backend did not start: {type(e).__name__}: {e}") from e


def backend_status(facts: MachineFacts | None = None) -> dict[str, str]:
    """Each backend family and whether it can run here: a version and devices, or
    ``not available here (reason)``. Cheap: opens no model."""
    import onnxruntime as ort

    from .onnxruntime import available_providers
    from .plans import machine_facts

    facts = facts or machine_facts()
    providers = ", ".join(p.removesuffix("ExecutionProvider") for p in available_providers())
    status = {"onnxruntime": f"onnxruntime {ort.__version__} ({providers})"}
    status["tensorrt"] = (
        f"{facts.describe()}, plans run with pycuda"
        if facts.usable
        else f"not available here ({facts.problem})"
    )
    return status
