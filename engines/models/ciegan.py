"""CIEGAN-style deblurring generator (Sun et al. 2022, cell image enhancement GAN; after the
CycleGAN/Johnson ResNet generator): strided-conv encoder, residual bottleneck, transposed-conv
decoder with additive skips, instance norm.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any, ClassVar

from torch import Tensor, nn

from .base import Generator, UpsampleHead, _positive_int


def _norm(features: int) -> nn.InstanceNorm2d:
    # affine, no running stats: the same computation in train, eval and the exported InstanceNorm
    return nn.InstanceNorm2d(features, affine=True, track_running_stats=False)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, padding_mode="reflect"),
        _norm(cout),
        nn.ReLU(inplace=True),
    )


class BottleneckBlock(nn.Module):
    """Reflect-padded conv-IN-ReLU-conv-IN plus identity (Johnson et al. 2016)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(features, features, 3),
            nn.Conv2d(features, features, 3, padding=1, padding_mode="reflect"),
            _norm(features),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class CIEGANGenerator(Generator):
    """CIEGAN-style encoder-decoder (Sun et al., Front. Genet. 2022) for deblurring and denoising.

    7x7 stem, ``downs`` stride-2 convs (width doubles, capped at 8x), ``res_blocks`` bottleneck
    blocks, transposed-conv decoder whose outputs add the matching encoder features, 7x7 tail
    (PixelShuffle for scale > 1); output = newest frame + residual. Instance norm uses per-tile
    statistics, so tiled inference needs the manifest's overlap. H, W: multiples of
    ``2**downs``, and the bottleneck must be at least 2 px (reflect padding).
    """

    ARCH = "ciegan"
    SIZES: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"features": 8, "downs": 2, "res_blocks": 1},
        "small": {"features": 16, "downs": 2, "res_blocks": 4},
        "large": {"features": 64, "downs": 2, "res_blocks": 9},
    }

    def __init__(
        self,
        channels: int = 1,
        scale: int = 1,
        window: int = 1,
        previous: bool = False,
        background: bool = False,
        *,
        features: int = 16,
        downs: int = 2,
        res_blocks: int = 4,
    ) -> None:
        name = type(self).__name__
        features = _positive_int(name, "features", features)
        downs = _positive_int(name, "downs", downs, low=0)
        res_blocks = _positive_int(name, "res_blocks", res_blocks, low=0)
        super().__init__(
            channels, scale, window, previous, background,
            arch_kwargs={"features": features, "downs": downs, "res_blocks": res_blocks},
        )  # fmt: skip
        widths = [features * min(2**level, 8) for level in range(downs + 1)]
        self.stem = _conv(self.fused_channels, features, 7)
        self.downs = nn.ModuleList(_conv(a, b, 3, stride=2) for a, b in pairwise(widths))
        self.bottleneck = nn.Sequential(*(BottleneckBlock(widths[-1]) for _ in range(res_blocks)))
        self.ups = nn.ModuleList(
            nn.Sequential(
                nn.ConvTranspose2d(b, a, 3, stride=2, padding=1, output_padding=1),
                _norm(a),
                nn.ReLU(inplace=True),
            )
            for a, b in pairwise(widths)
        )
        self.tail = UpsampleHead(features, channels, scale, kernel=7)
        self.multiple = 2**downs
        self.receptive_radius = (
            3 + sum(4 * 2**lv for lv in range(downs)) + 2 * res_blocks * 2**downs + 3
        )

    def _forward(
        self, frames: Tensor, previous: Tensor | None, background: Tensor | None
    ) -> Tensor:
        x = self.stem(self.early_fusion(frames, previous, background))
        skips = []
        for down in self.downs:
            skips.append(x)
            x = down(x)
        x = self.bottleneck(x)
        for up, skip in zip(self.ups[::-1], skips[::-1], strict=True):
            x = up(x) + skip
        return self.base_image(frames) + self.tail(x)
