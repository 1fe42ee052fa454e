"""Generator and discriminator architectures of the seeds, by name, at named sizes (training
code: importing this package imports torch; the live path never does)."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .base import Generator
from .ciegan import CIEGANGenerator
from .discriminators import CNNClassifier, Discriminator, PatchGAN, UNetDiscriminatorSN
from .rrdb import RRDBNet
from .tgan import TemporalGenerator
from .unet import ResUNet

GENERATORS: dict[str, type[Generator]] = {
    cls.ARCH: cls for cls in (ResUNet, RRDBNet, CIEGANGenerator, TemporalGenerator)
}
DISCRIMINATORS: dict[str, type[Discriminator]] = {
    cls.ARCH: cls for cls in (PatchGAN, UNetDiscriminatorSN, CNNClassifier)
}

__all__ = [
    "DISCRIMINATORS",
    "GENERATORS",
    "CIEGANGenerator",
    "CNNClassifier",
    "Discriminator",
    "Generator",
    "PatchGAN",
    "RRDBNet",
    "ResUNet",
    "TemporalGenerator",
    "UNetDiscriminatorSN",
    "build_discriminator",
    "build_generator",
    "count_parameters",
]


def _build(kind: str, registry: dict[str, Any], arch: str, size: str, overrides: dict) -> Any:
    if arch not in registry:
        raise ValueError(f"unknown {kind} {arch!r}: choose one of {', '.join(sorted(registry))}")
    cls = registry[arch]
    if size not in cls.SIZES:
        raise ValueError(
            f"unknown size {size!r} for {kind} {arch!r}: choose one of {', '.join(cls.SIZES)}"
        )
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(
            f"{kind} {arch!r} has no option {', '.join(map(repr, unknown))}: it accepts "
            f"{', '.join(sorted(accepted))}"
        )
    return cls(**{**cls.SIZES[size], **overrides})


def build_generator(arch: str, size: str = "small", **overrides: Any) -> Generator:
    """A generator by name ("unet", "rrdb", "ciegan", "tgan") at a named size, kwargs override."""
    return _build("generator", GENERATORS, arch, size, overrides)


def build_discriminator(arch: str, size: str = "small", **overrides: Any) -> nn.Module:
    """A discriminator by name ("patchgan", "unet-sn", "cnn") at a named size, kwargs override."""
    return _build("discriminator", DISCRIMINATORS, arch, size, overrides)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters())
