"""The generator interface every architecture implements, and the engine I/O convention it follows.

Inputs and output follow ``engines.package``: ``frames`` (N, channels*window, h, w), oldest frame
first; ``previous`` (N, channels, h*scale, w*scale); ``background`` (N, channels, h, w); output
(N, channels, h*scale, w*scale). Training code only: this module imports torch.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCALES = (1, 2, 4)
"""Output/input size ratios an engine may have (the manifest's ``scale``)."""


def conv3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    """A 3x3 convolution that keeps the size (or halves it with ``stride=2``)."""
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


def _positive_int(owner: str, name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}: {name} must be an integer >= {low}, got {value!r}")
    return value


def _flag(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be True or False, got {value!r}")
    return value


def _exporting() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


class Generator(nn.Module):
    """Base of every generator: validates the engine inputs, records its config, rebuilds from it.

    Subclasses set ``ARCH``, ``SIZES``, ``multiple`` and ``receptive_radius`` and implement
    ``_forward``; ``config()`` returns the constructor kwargs (JSON-able) so that
    ``type(g).from_config(g.config())`` rebuilds the same architecture.
    """

    ARCH: ClassVar[str] = ""
    SIZES: ClassVar[dict[str, dict[str, Any]]] = {}

    multiple: int
    """Input H and W must be multiples of this (e.g. ``2**depth`` for an encoder-decoder)."""
    receptive_radius: int
    """Approximate receptive-field radius in input pixels (convolutions only), for tile overlap."""

    def __init__(
        self,
        channels: int = 1,
        scale: int = 1,
        window: int = 1,
        previous: bool = False,
        background: bool = False,
        *,
        arch_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        self.channels = _positive_int(name, "channels", channels)
        if scale not in SCALES or isinstance(scale, bool):
            raise ValueError(f"{name}: scale must be one of {SCALES}, got {scale!r}")
        self.scale = int(scale)
        self.window = _positive_int(name, "window", window)
        self.takes_previous = _flag(name, "previous", previous)
        self.takes_background = _flag(name, "background", background)
        self.multiple = 1
        self.receptive_radius = 0
        self._arch_kwargs = dict(arch_kwargs or {})

    # -- interface --------------------------------------------------------------------------

    @property
    def input_names(self) -> list[str]:
        """The ONNX input names, in the order of the I/O convention."""
        names = ["frames"]
        if self.takes_previous:
            names.append("previous")
        if self.takes_background:
            names.append("background")
        return names

    @property
    def in_channels(self) -> int:
        """Channels of ``frames``: ``channels * window``."""
        return self.channels * self.window

    def config(self) -> dict[str, Any]:
        """The constructor kwargs that rebuild this generator (JSON-able; saved with
        checkpoints)."""
        return {
            "channels": self.channels,
            "scale": self.scale,
            "window": self.window,
            "previous": self.takes_previous,
            "background": self.takes_background,
            **self._arch_kwargs,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Self:
        """Rebuild a generator from ``config()``; an ``"arch"`` key, if present, must match."""
        cfg = dict(cfg)
        arch = cfg.pop("arch", cls.ARCH)
        if cls is Generator or arch != cls.ARCH:
            raise ValueError(
                f"{cls.__name__}.from_config got arch {arch!r}: call from_config on the class "
                f"of that architecture (engines.models.GENERATORS[{arch!r}])"
            )
        return cls(**cfg)

    def forward(
        self, frames: Tensor, previous: Tensor | None = None, background: Tensor | None = None
    ) -> Tensor:
        """Enhance ``frames`` (N, channels*window, h, w) -> (N, channels, h*scale, w*scale)."""
        if not _exporting():
            self.check_inputs(frames, previous, background)
        return self._forward(frames, previous, background)

    def _forward(
        self, frames: Tensor, previous: Tensor | None, background: Tensor | None
    ) -> Tensor:
        raise NotImplementedError

    # -- helpers for subclasses -------------------------------------------------------------

    def check_inputs(
        self, frames: Tensor, previous: Tensor | None = None, background: Tensor | None = None
    ) -> None:
        """Raise ValueError naming the offending shape if the inputs break the I/O convention."""
        name = type(self).__name__
        if frames.ndim != 4 or frames.shape[1] != self.in_channels:
            raise ValueError(
                f"{name}: frames must be (N, {self.in_channels}, H, W) (channels {self.channels} "
                f"x window {self.window}), got {tuple(frames.shape)}"
            )
        n, _, h, w = frames.shape
        m = self.multiple
        for axis, size in (("H", h), ("W", w)):
            if size % m or size == 0:
                low, high = size // m * m, -(-size // m) * m
                raise ValueError(
                    f"{name}: input {axis}={size} is not a multiple of {m}: pad to {high} or crop "
                    f"to {low} (frames shape {tuple(frames.shape)})"
                )
        s = self.scale
        wanted = {
            "previous": (self.takes_previous, previous, (n, self.channels, h * s, w * s)),
            "background": (self.takes_background, background, (n, self.channels, h, w)),
        }
        for key, (takes, tensor, shape) in wanted.items():
            if takes and tensor is None:
                raise ValueError(f"{name} was built with {key}=True: pass {key} of shape {shape}")
            if not takes and tensor is not None:
                raise ValueError(
                    f"{name} was built with {key}=False but got {key} of shape "
                    f"{tuple(tensor.shape)}: rebuild with {key}=True or drop it"
                )
            if tensor is not None and tuple(tensor.shape) != shape:
                raise ValueError(
                    f"{name}: {key} must have shape {shape}, got {tuple(tensor.shape)}"
                )

    def current(self, frames: Tensor) -> Tensor:
        """The newest frame of the window (the last ``channels`` planes)."""
        return frames[:, (self.window - 1) * self.channels :]

    def early_fusion(
        self, frames: Tensor, previous: Tensor | None, background: Tensor | None
    ) -> Tensor:
        """All inputs stacked on the frame grid; ``previous`` folded in by pixel-unshuffle.

        Its channel count is ``fused_channels``; single-encoder architectures start from it.
        """
        parts = [frames]
        if previous is not None:
            parts.append(F.pixel_unshuffle(previous, self.scale) if self.scale > 1 else previous)
        if background is not None:
            parts.append(background)
        return torch.cat(parts, 1) if len(parts) > 1 else frames

    @property
    def fused_channels(self) -> int:
        """Channels of ``early_fusion``'s output."""
        return (
            self.in_channels
            + self.takes_previous * self.channels * self.scale**2
            + self.takes_background * self.channels
        )

    def base_image(self, frames: Tensor) -> Tensor:
        """The newest frame at output size (bilinear for scale > 1): what the net adds a residual
        to."""
        cur = self.current(frames)
        if self.scale == 1:
            return cur
        return F.interpolate(
            cur, scale_factor=float(self.scale), mode="bilinear", align_corners=False
        )


class UpsampleHead(nn.Module):
    """Features -> ``channels * scale**2`` planes -> PixelShuffle(scale) (ESPCN; identity at 1)."""

    def __init__(self, features: int, channels: int, scale: int, kernel: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(features, channels * scale**2, kernel, padding=kernel // 2)
        self.shuffle = nn.PixelShuffle(scale) if scale > 1 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.shuffle(self.conv(x))
