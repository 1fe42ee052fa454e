"""A toy backend (numpy only, reads no model file): the newest input frame, nearest-neighbour
upsampled to the package's scale, so on the identity engine it gives the identity's numbers.
All a new backend needs is a module like this one and one row:
``register_backend("toy", ("toy",), "toy_backend", auto=15)`` (tests/test_extend_backend.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from engines.package import EnginePackage
from engines.runtime import Backend, OpenOptions
from engines.runtime.base import feed


class ToyBackend:
    name = "toy"
    device = "cpu"

    def __init__(self, package: EnginePackage) -> None:
        self.package, self.scale = package, package.manifest.scale

    def infer(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        x = feed(self.package.name, ["frames"], inputs)["frames"][:, -1:]
        return x.repeat(self.scale, axis=2).repeat(self.scale, axis=3)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "device": self.device, "engine": self.package.name}

    def close(self) -> None:
        pass


def open_backend(pkg: EnginePackage, requested: str, options: OpenOptions) -> tuple[Backend, str]:
    return ToyBackend(pkg), f"{requested}: toy backend (numpy) for {pkg.name}"


def unavailable(options: OpenOptions) -> str | None:
    return None  # runs wherever numpy does


def status(options: OpenOptions) -> str:
    return f"toy (numpy {np.__version__})"
