"""The backends, as data: one row per backend family, read by ``open_backend``,
``backend_status``, ``choose_backend``, the ``--backend`` help and bench's reports.

A row names the backend names it answers to (``--backend NAME``), the module that implements it
(imported only when the backend is opened or checked, so the live path imports no GPU library
it does not use), the family ``backend_status`` reports it under, and its place in ``auto``'s
order (lowest first; None: never chosen by ``auto``). The module provides three functions,
named in the row:

- ``open(package, requested, options) -> (Backend, reason)``: opens it or raises BackendError;
- ``check(options) -> None | reason``: whether it can run here (cheap: opens no model);
- ``status(options) -> str``: a version and devices, when it can.

A new backend is one module and one ``register_backend(...)`` call.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .base import Backend, BackendError

if TYPE_CHECKING:
    from ..package import EnginePackage
    from .plans import MachineFacts, PlanRebuilder

AUTO = "auto"


@dataclass(frozen=True)
class OpenOptions:
    """What a caller may ask of any backend; each backend reads the fields it understands."""

    threads: int | None = None
    precision: str | None = None  # TensorRT: the plan's precision (None: the first that fits)
    facts: MachineFacts | None = None  # TensorRT: machine facts instead of this machine's (tests)
    rebuild: PlanRebuilder | None = None  # TensorRT: rebuilds a plan missing for this GPU


@dataclass(frozen=True)
class BackendSpec:
    """One backend family: its names, module, availability check and place in ``auto``."""

    family: str
    names: tuple[str, ...]
    module: str
    auto: int | None = None
    label: str = ""  # how reasons name it ("TensorRT"); default: the family
    help: str = ""  # a few words for ``--backend`` help
    open: str = "open_backend"
    check: str = "unavailable"
    status: str = "status"

    def _module(self) -> ModuleType:
        return importlib.import_module(self.module)

    def _function(self, name: str) -> Callable[..., Any]:
        return getattr(self._module(), name)

    @property
    def title(self) -> str:
        return self.label or self.family

    def unavailable(self, options: OpenOptions) -> str | None:
        """None when this backend can run here, else the reason (a module that does not import
        is one)."""
        try:
            check = self._function(self.check)
        except ImportError as e:
            return f"{self.module} does not import ({e})"
        return check(options)

    def open_backend(
        self, package: EnginePackage, requested: str, options: OpenOptions
    ) -> tuple[Backend, str]:
        try:
            opener = self._function(self.open)
        except ImportError as e:
            raise BackendError(f"backend {requested!r}: {self.module} does not import ({e})") from e
        return opener(package, requested, options)

    def describe_here(self, options: OpenOptions) -> str:
        """A version and devices, or ``not available here (reason)``."""
        why = self.unavailable(options)
        if why is not None:
            return f"not available here ({why})"
        return self._function(self.status)(options)


_ROWS: dict[str, BackendSpec] = {}


def register_backend(
    family: str,
    names: tuple[str, ...],
    module: str,
    *,
    auto: int | None = None,
    **more: Any,
) -> BackendSpec:
    """Add (or replace) the row for ``family``; returns it. Names must not clash with another
    family's, nor be ``auto``."""
    spec = BackendSpec(family=family, names=tuple(names), module=module, auto=auto, **more)
    if not spec.names or AUTO in spec.names:
        raise ValueError(f"backend {family!r}: give its names (not {AUTO!r})")
    for other in _ROWS.values():
        clash = set(other.names) & set(spec.names)
        if other.family != family and clash:
            raise ValueError(
                f"backend {family!r}: {sorted(clash)} already belong to {other.family!r}"
            )
    _ROWS[family] = spec
    return spec


def unregister_backend(family: str) -> None:
    """Remove ``family``'s row (tests that register a backend undo it)."""
    _ROWS.pop(family, None)


def backend_specs() -> list[BackendSpec]:
    """Every row, in registration order."""
    return list(_ROWS.values())


def backend_names() -> tuple[str, ...]:
    """Every name ``--backend`` accepts: ``auto`` first, then each row's names."""
    return (AUTO, *(n for spec in _ROWS.values() for n in spec.names))


def auto_order() -> list[BackendSpec]:
    """The rows ``auto`` tries, in order."""
    return sorted((s for s in _ROWS.values() if s.auto is not None), key=lambda s: s.auto or 0)


def find_backend(name: str) -> BackendSpec:
    """The row that answers to ``name``; BackendError listing every name when none does."""
    for spec in _ROWS.values():
        if name in spec.names:
            return spec
    raise BackendError(f"unknown backend {name!r}: choose one of {', '.join(backend_names())}")


def backend_help() -> str:
    """One line for ``--backend``: every name, with each family's note."""
    parts = [f"{AUTO} (fastest that starts: {', '.join(s.family for s in auto_order())})"]
    for spec in _ROWS.values():
        names = ", ".join(spec.names)
        parts.append(f"{names} ({spec.help})" if spec.help else names)
    return ", ".join(parts)


# -- the backends that ship ----------------------------------------------------------------

register_backend(
    "tensorrt", ("tensorrt",), "engines.runtime.tensorrt", auto=10, label="TensorRT",
    help="plans, extra gpu", open="open_tensorrt",
)  # fmt: skip
register_backend(
    "onnxruntime",
    ("onnxruntime", "onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt"),
    "engines.runtime.onnxruntime", auto=20, label="ONNX Runtime",
    help="fastest provider, or the one named", open="open_onnxruntime",
)  # fmt: skip
register_backend(
    "openvino", ("openvino",), "engines.runtime.openvino", auto=18, label="OpenVINO",
    help="CPU; auto takes it on x86-64 unless onnxruntime offers a GPU", open="open_openvino",
)  # fmt: skip
register_backend(
    "triton", ("triton",), "engines.runtime.triton", auto=None, label="Triton",
    help="a Triton server, --triton-url", open="open_triton",
)  # fmt: skip
