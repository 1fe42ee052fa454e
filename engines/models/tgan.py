"""tGAN temporal generator: n consecutive frames, its own previous output and a reference
background, each encoded at several scales, fused by per-pixel source attention, decoded with
StyleGAN2-style modulated convolutions and noise injection; an optional PixelShuffle SR head.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Generator, UpsampleHead, _positive_int, conv3

NOISE_MODES = ("train", "off", "fixed")


def _mix(*values: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions (FNV-1a)."""
    h = 0xCBF2_9CE4_8422_2325
    for v in values:
        h = ((h ^ (v & 0xFFFF_FFFF_FFFF_FFFF)) * 0x100_0000_01B3) & 0xFFFF_FFFF_FFFF_FFFF
    return h >> 1


def _act() -> nn.LeakyReLU:
    return nn.LeakyReLU(0.2, inplace=True)


class SourceEncoder(nn.Module):
    """One input's encoder: features at ``len(widths)`` scales, halving the size at each.

    ``stride`` > 1 patchifies an input that arrives at output resolution (``previous`` at
    h*scale) onto the frame grid with a ``stride`` x ``stride`` strided conv.
    """

    def __init__(self, cin: int, widths: list[int], stride: int = 1) -> None:
        super().__init__()
        first = conv3(cin, widths[0]) if stride == 1 else nn.Conv2d(cin, widths[0], stride, stride)
        self.levels = nn.ModuleList(
            [nn.Sequential(first, _act(), conv3(widths[0], widths[0]), _act())]
        )
        for a, b in pairwise(widths):
            self.levels.append(nn.Sequential(conv3(a, b, stride=2), _act(), conv3(b, b), _act()))

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for level in self.levels:
            x = level(x)
            feats.append(x)
        return feats


class SourceAttention(nn.Module):
    """Per-pixel softmax weights over the S sources from a 1x1 conv on their concatenation;
    the fused map is the weighted sum (each pixel picks how much to trust frames, its previous
    output and the background)."""

    def __init__(self, features: int, sources: int) -> None:
        super().__init__()
        self.sources = sources
        self.score = nn.Conv2d(features * sources, sources, 1) if sources > 1 else None

    def forward(self, feats: list[Tensor]) -> Tensor:
        if self.score is None:
            return feats[0]
        weights = torch.softmax(self.score(torch.cat(feats, 1)), dim=1)
        fused = weights[:, 0:1] * feats[0]
        for i in range(1, self.sources):
            fused = fused + weights[:, i : i + 1] * feats[i]
        return fused


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated 3x3 conv with demodulation (Karras et al. 2020), in its non-fused
    form (scale the input, convolve, rescale the output): no grouped conv, so N stays dynamic."""

    def __init__(self, cin: int, cout: int, style_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.affine = nn.Linear(style_dim, cin)
        nn.init.ones_(self.affine.bias)

    def forward(self, x: Tensor, style: Tensor) -> Tensor:
        s = self.affine(style)
        x = F.conv2d(x * s[:, :, None, None], self.weight, padding=1)
        w2 = self.weight.square().sum((2, 3))
        demod = torch.rsqrt(s.square() @ w2.t() + 1e-8)
        return x * demod[:, :, None, None]


class NoiseInjection(nn.Module):
    """StyleGAN noise: add a learned per-channel scale (zero at init) times one Gaussian plane.

    ``mode``: "train" fresh noise each call, "off" none, "fixed" noise from a
    ``torch.Generator`` seeded by (seed, layer, N, H, W): deterministic for any input size.
    """

    def __init__(self, features: int, index: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, features, 1, 1))
        self.index = index

    def forward(self, x: Tensor, mode: str, seed: int) -> Tensor:
        if mode == "off":
            return x
        n, _, h, w = x.shape
        if mode == "train":
            noise = torch.randn(n, 1, h, w, device=x.device, dtype=x.dtype)
        else:
            gen = torch.Generator(device=x.device)
            gen.manual_seed(_mix(seed, self.index, n, h, w))
            noise = torch.randn(n, 1, h, w, generator=gen, device=x.device).to(x.dtype)
        return x + self.weight * noise


class StyledConv(nn.Module):
    """Modulated conv -> noise -> bias -> LReLU (one StyleGAN2 synthesis layer)."""

    def __init__(self, cin: int, cout: int, style_dim: int, index: int) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(cin, cout, style_dim)
        self.noise = NoiseInjection(cout, index)
        self.act = _act()

    def forward(self, x: Tensor, style: Tensor, mode: str, seed: int) -> Tensor:
        x = self.noise(self.conv(x, style), mode, seed)
        return self.act(x + self.conv.bias[None, :, None, None])


class TemporalGenerator(Generator):
    """tGAN temporal generator (frames + previous output + background, attention fusion, style
    and noise injection), after tGAN's temporal model; ``scale=2`` adds a PixelShuffle SR head.

    Each enabled input has its own encoder (``previous`` is patchified from h*scale to the frame
    grid by a strided conv); at every scale a ``SourceAttention`` fuses them with per-pixel
    softmax weights. A style vector (MLP of the fused bottleneck's global mean) modulates every
    decoder conv (StyleGAN2 modulation/demodulation); ``NoiseInjection`` follows each.
    Output = newest frame (bilinear x scale) + residual. With previous/background off it runs on
    frames alone.

    Determinism: ``noise`` is "train" (random noise while training, none in eval), "off" (never)
    or "fixed" (seeded per layer and shape, also in eval). ``export_onnx`` forces "off", so
    exported engines are deterministic; ``eval()`` with the default "train" is deterministic too.
    The style vector pools the whole input, so tiles see tile-local statistics.
    """

    ARCH = "tgan"
    SIZES: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"features": 4, "depth": 1, "style_dim": 8},
        "small": {"features": 8, "depth": 3, "style_dim": 32},
        "large": {"features": 32, "depth": 3, "style_dim": 128},
    }

    def __init__(
        self,
        channels: int = 1,
        scale: int = 1,
        window: int = 1,
        previous: bool = False,
        background: bool = False,
        *,
        features: int = 8,
        depth: int = 3,
        style_dim: int = 32,
        noise: str = "train",
        noise_seed: int = 0,
    ) -> None:
        name = type(self).__name__
        features = _positive_int(name, "features", features)
        depth = _positive_int(name, "depth", depth, low=0)
        style_dim = _positive_int(name, "style_dim", style_dim)
        noise_seed = _positive_int(name, "noise_seed", noise_seed, low=0)
        super().__init__(
            channels, scale, window, previous, background,
            arch_kwargs={"features": features, "depth": depth, "style_dim": style_dim,
                         "noise": noise, "noise_seed": noise_seed},
        )  # fmt: skip
        self.noise = noise
        self.noise_seed = noise_seed
        widths = [features * min(2**level, 8) for level in range(depth + 1)]
        self.encode_frames = SourceEncoder(self.in_channels, widths)
        self.encode_previous = SourceEncoder(channels, widths, stride=scale) if previous else None
        self.encode_background = SourceEncoder(channels, widths) if background else None
        sources = 1 + previous + background
        self.fuse = nn.ModuleList(SourceAttention(w, sources) for w in widths)
        self.style = nn.Sequential(
            nn.Linear(widths[-1], style_dim), _act(), nn.Linear(style_dim, style_dim), _act()
        )
        self.bottom = StyledConv(widths[-1], widths[-1], style_dim, index=0)
        self.ups = nn.ModuleList(conv3(b, a) for a, b in pairwise(widths))
        self.decoders = nn.ModuleList(
            nn.ModuleList(
                [
                    StyledConv(2 * w, w, style_dim, index=2 * level + 1),
                    StyledConv(w, w, style_dim, index=2 * level + 2),
                ]
            )
            for level, w in enumerate(widths[:-1])
        )
        self.act = _act()
        self.tail = UpsampleHead(features, channels, scale)
        self.multiple = 2**depth
        # 3x3 convs per level, plus the grid's alignment at each down/up step
        encoder = 2 + sum(2 * 2 ** (lv - 1) + 2**lv for lv in range(1, depth + 1))
        decoder = 2**depth + sum(4 * 2**lv for lv in range(depth)) + 1
        self.receptive_radius = encoder + decoder

    @property
    def noise(self) -> str:
        """Noise-injection mode: "train", "off" or "fixed" (see the class docstring)."""
        return self._noise

    @noise.setter
    def noise(self, mode: str) -> None:
        if mode not in NOISE_MODES:
            raise ValueError(f"TemporalGenerator: noise must be one of {NOISE_MODES}, got {mode!r}")
        self._noise = mode

    def config(self) -> dict[str, Any]:
        return {**super().config(), "noise": self.noise}

    def noise_mode(self) -> str:
        """The mode in effect now: "train" only adds random noise in training mode."""
        if self.noise == "train" and not self.training:
            return "off"
        return self.noise

    def _forward(
        self, frames: Tensor, previous: Tensor | None, background: Tensor | None
    ) -> Tensor:
        sources = [self.encode_frames(frames)]
        if self.encode_previous is not None and previous is not None:
            sources.append(self.encode_previous(previous))
        if self.encode_background is not None and background is not None:
            sources.append(self.encode_background(background))
        fused = [fuse([s[lv] for s in sources]) for lv, fuse in enumerate(self.fuse)]
        style = self.style(fused[-1].mean((2, 3)))
        mode, seed = self.noise_mode(), self.noise_seed
        x = self.bottom(fused[-1], style, mode, seed)
        for level in range(len(self.ups) - 1, -1, -1):
            x = self.act(self.ups[level](F.interpolate(x, scale_factor=2.0, mode="nearest")))
            first, second = self.decoders[level]
            x = first(torch.cat([x, fused[level]], 1), style, mode, seed)
            x = second(x, style, mode, seed)
        return self.base_image(frames) + self.tail(x)
