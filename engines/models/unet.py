"""Residual U-Net: the cross-system widefield->confocal generator (and the denoising baseline of
progressive-GAN restoration): encoder-decoder, skip connections, residual blocks, global residual.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Generator, UpsampleHead, _flag, _positive_int, conv3


class ResBlock(nn.Module):
    """conv-LReLU-conv plus a (1x1 when the width changes) shortcut, no normalization (EDSR)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv3(cin, cout), nn.LeakyReLU(0.2, inplace=True), conv3(cout, cout)
        )
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


def _stage(cin: int, cout: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(*(ResBlock(cin if i == 0 else cout, cout) for i in range(blocks)))


class ResUNet(Generator):
    """Residual U-Net (Ronneberger 2015 + He 2016 blocks) as in cross-system widefield->confocal
    transfer; output = newest frame (bilinearly upsampled for scale > 1) + a learned residual.

    Level ``l`` has ``features * 2**l`` channels (capped at 8x); downsampling is a strided 3x3
    conv, upsampling nearest x2 + 3x3 conv, skips are concatenated. H, W: multiples of
    ``2**depth``. Scale > 1 ends in a PixelShuffle head.

    ``residual=False`` drops the global residual (output = the learned image alone), as blind-
    spot training needs (CSBDeep's Noise2Void U-Net has none): a residual would add the pixel
    the network never saw in training. Only ``residual: false`` is recorded in ``config()``,
    so the configs of residual U-Nets keep their form.
    """

    ARCH = "unet"
    SIZES: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"features": 8, "depth": 2, "blocks": 1},
        "small": {"features": 12, "depth": 3, "blocks": 1},
        "large": {"features": 32, "depth": 4, "blocks": 2},
    }

    def __init__(
        self,
        channels: int = 1,
        scale: int = 1,
        window: int = 1,
        previous: bool = False,
        background: bool = False,
        *,
        features: int = 12,
        depth: int = 3,
        blocks: int = 1,
        residual: bool = True,
    ) -> None:
        name = type(self).__name__
        features = _positive_int(name, "features", features)
        depth = _positive_int(name, "depth", depth, low=0)
        blocks = _positive_int(name, "blocks", blocks)
        super().__init__(
            channels, scale, window, previous, background,
            arch_kwargs={"features": features, "depth": depth, "blocks": blocks,
                         **({} if residual else {"residual": False})},
        )  # fmt: skip
        self.residual = _flag(name, "residual", residual)
        widths = [features * min(2**level, 8) for level in range(depth + 1)]
        self.head = conv3(self.fused_channels, features)
        self.encoders = nn.ModuleList(_stage(w, w, blocks) for w in widths[:-1])
        self.downs = nn.ModuleList(conv3(a, b, stride=2) for a, b in pairwise(widths))
        self.bottom = _stage(widths[-1], widths[-1], blocks)
        self.ups = nn.ModuleList(conv3(b, a) for a, b in pairwise(widths))
        self.decoders = nn.ModuleList(_stage(2 * w, w, blocks) for w in widths[:-1])
        self.act = nn.LeakyReLU(0.2, inplace=True)
        self.tail = UpsampleHead(features, channels, scale)
        self.multiple = 2**depth
        # two 3x3 convs per block and level; per level change a conv and the grid's alignment
        per_level = [2 * blocks * 2**level for level in range(depth + 1)]
        changes = 4 * sum(2**level for level in range(depth))
        self.receptive_radius = 1 + 2 * sum(per_level[:-1]) + per_level[-1] + changes + 1

    def _forward(
        self, frames: Tensor, previous: Tensor | None, background: Tensor | None
    ) -> Tensor:
        x = self.head(self.early_fusion(frames, previous, background))
        skips = []
        for encode, down in zip(self.encoders, self.downs, strict=True):
            x = encode(x)
            skips.append(x)
            x = self.act(down(x))
        x = self.bottom(x)
        for up, decode, skip in zip(self.ups[::-1], self.decoders[::-1], skips[::-1], strict=True):
            x = self.act(up(F.interpolate(x, scale_factor=2.0, mode="nearest")))
            x = decode(torch.cat([x, skip], 1))
        out = self.tail(self.act(x))
        return self.base_image(frames) + out if self.residual else out
