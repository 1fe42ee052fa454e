"""RRDBNet: ESRGAN's generator (Wang et al. 2018), residual-in-residual dense blocks without batch
norm, residual scaling 0.2, nearest-neighbour upsampling + conv for x2 and x4.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Generator, _flag, _positive_int, conv3

RESIDUAL_SCALE = 0.2


class DenseBlock(nn.Module):
    """Five densely connected 3x3 convs (LReLU 0.2); output = x + 0.2 * last conv (ESRGAN RDB)."""

    def __init__(self, features: int, growth: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            conv3(features + i * growth, growth if i < 4 else features) for i in range(5)
        )
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for conv in self.convs[:-1]:
            feats.append(self.act(conv(torch.cat(feats, 1))))
        return x + RESIDUAL_SCALE * self.convs[-1](torch.cat(feats, 1))


class RRDB(nn.Module):
    """Three dense blocks inside a residual connection scaled by 0.2 (residual-in-residual)."""

    def __init__(self, features: int, growth: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(DenseBlock(features, growth) for _ in range(3)))

    def forward(self, x: Tensor) -> Tensor:
        return x + RESIDUAL_SCALE * self.blocks(x)


class RRDBNet(Generator):
    """ESRGAN generator (Wang et al., ECCV-W 2018): conv, ``blocks`` RRDBs, conv + trunk skip,
    per x2 nearest upsampling + conv, two HR convs. Scale 1, 2 or 4.

    ``unshuffle=True`` is Real-ESRGAN's x1/x2 variant (Wang et al. 2021): the input is
    pixel-unshuffled so the trunk runs at 1/4 of the output size (16x fewer trunk FLOPs at
    scale 1), then upsampled x4; H, W must then be multiples of ``4 // scale``.
    """

    ARCH = "rrdb"
    SIZES: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"features": 8, "growth": 4, "blocks": 1, "unshuffle": False},
        "small": {"features": 32, "growth": 16, "blocks": 2, "unshuffle": True},
        "large": {"features": 64, "growth": 32, "blocks": 23, "unshuffle": False},
    }

    def __init__(
        self,
        channels: int = 1,
        scale: int = 1,
        window: int = 1,
        previous: bool = False,
        background: bool = False,
        *,
        features: int = 24,
        growth: int = 12,
        blocks: int = 2,
        unshuffle: bool = False,
    ) -> None:
        name = type(self).__name__
        features = _positive_int(name, "features", features)
        growth = _positive_int(name, "growth", growth)
        blocks = _positive_int(name, "blocks", blocks)
        unshuffle = _flag(name, "unshuffle", unshuffle)
        super().__init__(
            channels, scale, window, previous, background,
            arch_kwargs={"features": features, "growth": growth, "blocks": blocks,
                         "unshuffle": unshuffle},
        )  # fmt: skip
        self.unshuffle = 4 // scale if unshuffle else 1
        self.multiple = self.unshuffle
        self.conv_first = conv3(self.fused_channels * self.unshuffle**2, features)
        self.body = nn.Sequential(*(RRDB(features, growth) for _ in range(blocks)))
        self.conv_body = conv3(features, features)
        ups = int(math.log2(scale * self.unshuffle))
        self.ups = nn.ModuleList(conv3(features, features) for _ in range(ups))
        self.conv_hr = conv3(features, features)
        self.conv_last = conv3(features, channels)
        self.act = nn.LeakyReLU(0.2, inplace=True)
        # trunk convs count `unshuffle` input px each, convs at output size 1/scale px
        trunk = (2 + 15 * blocks) * self.unshuffle + self.unshuffle - 1  # + unshuffle alignment
        up = sum(self.unshuffle / 2 ** (i + 1) for i in range(ups)) + 2 / scale
        self.receptive_radius = math.ceil(trunk + up)

    def _forward(
        self, frames: Tensor, previous: Tensor | None, background: Tensor | None
    ) -> Tensor:
        x = self.early_fusion(frames, previous, background)
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for up in self.ups:
            feat = self.act(up(F.interpolate(feat, scale_factor=2.0, mode="nearest")))
        return self.conv_last(self.act(self.conv_hr(feat)))
