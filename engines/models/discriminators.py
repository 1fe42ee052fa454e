"""Discriminators: PatchGAN with linear attention (pix2pix + tGAN), Real-ESRGAN's U-Net with
spectral norm, and a plain CNN classifier (cross-system work). Training code only.

Every one takes ``forward(candidate, condition=None)``: the condition (e.g. all n input frames,
for temporal consistency) is resized to the candidate's H, W and concatenated with it;
``in_channels`` counts both.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from .base import _flag, _positive_int

NORMS = ("none", "instance", "batch")


def _maybe_sn(module: nn.Module, spectral: bool) -> nn.Module:
    return spectral_norm(module) if spectral else module


def _norm(kind: str, features: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(features, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(features)
    return nn.Identity()


class Discriminator(nn.Module):
    """Base: joins candidate and condition, checks channels, records its config."""

    ARCH: ClassVar[str] = ""
    SIZES: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, in_channels: int, arch_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.in_channels = _positive_int(type(self).__name__, "in_channels", in_channels)
        self._arch_kwargs = arch_kwargs

    def config(self) -> dict[str, Any]:
        """The constructor kwargs that rebuild this discriminator (JSON-able)."""
        return {"in_channels": self.in_channels, **self._arch_kwargs}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Self:
        return cls(**cfg)

    def join(self, candidate: Tensor, condition: Tensor | None) -> Tensor:
        """``candidate`` with ``condition`` (bilinearly resized to its H, W) stacked as channels."""
        name = type(self).__name__
        if candidate.ndim != 4:
            raise ValueError(
                f"{name}: candidate must be (N, C, H, W), got {tuple(candidate.shape)}"
            )
        x = candidate
        if condition is not None:
            if condition.ndim != 4 or condition.shape[0] != candidate.shape[0]:
                raise ValueError(
                    f"{name}: condition must be (N, C, h, w) with N={candidate.shape[0]} like the "
                    f"candidate, got {tuple(condition.shape)}"
                )
            if condition.shape[-2:] != candidate.shape[-2:]:
                size = tuple(candidate.shape[-2:])
                condition = F.interpolate(
                    condition, size=size, mode="bilinear", align_corners=False
                )
            x = torch.cat([candidate, condition], 1)
        if x.shape[1] != self.in_channels:
            cond = 0 if condition is None else condition.shape[1]
            raise ValueError(
                f"{name} was built for {self.in_channels} input channels but got candidate "
                f"{candidate.shape[1]} + condition {cond}: build it with "
                f"in_channels={candidate.shape[1] + cond}"
            )
        return x


class LinearAttention(nn.Module):
    """Linear attention (Katharopoulos et al. 2020): phi(q) (phi(k)^T v) with phi = elu + 1,
    O(HW) memory; added through a zero-initialized gate (SAGAN), as in tGAN's discriminator."""

    def __init__(self, features: int, key_dim: int | None = None) -> None:
        super().__init__()
        d = key_dim or max(features // 8, 4)
        self.q = nn.Conv2d(features, d, 1)
        self.k = nn.Conv2d(features, d, 1)
        self.v = nn.Conv2d(features, features, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        q = (F.elu(self.q(x)) + 1).flatten(2)  # (N, d, L)
        k = (F.elu(self.k(x)) + 1).flatten(2)  # (N, d, L)
        v = self.v(x).flatten(2)  # (N, C, L)
        length = k.shape[-1]
        kv = torch.einsum("ndl,ncl->ndc", k, v) / length  # means, not sums: same ratio, no overflow
        norm = torch.einsum("ndl,nd->nl", q, k.mean(-1)) + 1e-6
        out = torch.einsum("ndl,ndc->ncl", q, kv) / norm[:, None]
        return x + self.gamma * out.reshape(n, c, h, w)


class PatchGAN(Discriminator):
    """pix2pix PatchGAN (Isola et al. 2017; 70x70 receptive field at ``layers=3``) with a linear
    attention layer after the first conv (tGAN); conditional: candidate + input frames in."""

    ARCH = "patchgan"
    SIZES: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"features": 8, "layers": 2},
        "small": {"features": 32, "layers": 3},
        "large": {"features": 64, "layers": 3},
    }

    def __init__(
        self,
        in_channels: int = 2,
        *,
        features: int = 64,
        layers: int = 3,
        norm: str = "none",
        spectral: bool = True,
        attention: bool = True,
    ) -> None:
        name = type(self).__name__
        features = _positive_int(name, "features", features)
        layers = _positive_int(name, "layers", layers)
        if norm not in NORMS:
            raise ValueError(f"{name}: norm must be one of {NORMS}, got {norm!r}")
        spectral, attention = _flag(name, "spectral", spectral), _flag(name, "attention", attention)
        super().__init__(
            in_channels,
            {"features": features, "layers": layers, "norm": norm, "spectral": spectral,
             "attention": attention},
        )  # fmt: skip
        act = nn.LeakyReLU(0.2)  # not in place: WGAN-GP differentiates twice through it
        body: list[nn.Module] = [
            _maybe_sn(nn.Conv2d(in_channels, features, 4, 2, 1), spectral),
            act,
        ]
        if attention:
            body.append(LinearAttention(features))
        width = features
        for i in range(1, layers + 1):
            out = features * min(2**i, 8)
            stride = 2 if i < layers else 1
            body += [
                _maybe_sn(nn.Conv2d(width, out, 4, stride, 1, bias=norm == "none"), spectral),
                _norm(norm, out),
                act,
            ]
            width = out
        body.append(_maybe_sn(nn.Conv2d(width, 1, 4, 1, 1), spectral))
        self.body = nn.Sequential(*body)

    def forward(self, candidate: Tensor, condition: Tensor | None = None) -> Tensor:
        """Patch logits (N, 1, ~H/2**layers - 2, ~W/2**layers - 2)."""
        return self.body(self.join(candidate, condition))


class UNetDiscriminatorSN(Discriminator):
    """Real-ESRGAN's U-Net discriminator with spectral norm (Wang et al. 2021): per-pixel logits
    (N, 1, H, W); H and W must be multiples of 8."""

    ARCH = "unet-sn"
    SIZES: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"features": 8},
        "small": {"features": 32},
        "large": {"features": 64},
    }
    multiple = 8

    def __init__(self, in_channels: int = 1, *, features: int = 64) -> None:
        features = _positive_int(type(self).__name__, "features", features)
        super().__init__(in_channels, {"features": features})
        f = features

        def sn(cin: int, cout: int, k: int = 3, s: int = 1) -> nn.Module:
            return spectral_norm(nn.Conv2d(cin, cout, k, s, 1, bias=False))

        self.conv0 = nn.Conv2d(in_channels, f, 3, 1, 1)
        self.down = nn.ModuleList(
            [sn(f, 2 * f, 4, 2), sn(2 * f, 4 * f, 4, 2), sn(4 * f, 8 * f, 4, 2)]
        )
        self.up = nn.ModuleList([sn(8 * f, 4 * f), sn(4 * f, 2 * f), sn(2 * f, f)])
        self.refine = nn.Sequential(sn(f, f), nn.LeakyReLU(0.2), sn(f, f), nn.LeakyReLU(0.2))
        self.out = nn.Conv2d(f, 1, 3, 1, 1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, candidate: Tensor, condition: Tensor | None = None) -> Tensor:
        x = self.join(candidate, condition)
        h, w = x.shape[-2:]
        if h % self.multiple or w % self.multiple:
            raise ValueError(
                f"{type(self).__name__}: H and W must be multiples of {self.multiple}, got "
                f"{h}x{w}: crop the candidate"
            )
        skips = [self.act(self.conv0(x))]
        for down in self.down:
            skips.append(self.act(down(skips[-1])))
        x = skips.pop()
        for up in self.up:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = self.act(up(x)) + skips.pop()
        return self.out(self.refine(x))


class CNNClassifier(Discriminator):
    """A plain CNN -> one logit per image (N, 1): strided 3x3 convs, global mean, MLP (the
    cross-system widefield->confocal work's discriminator)."""

    ARCH = "cnn"
    SIZES: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {"features": 8, "layers": 2, "hidden": 16},
        "small": {"features": 16, "layers": 4, "hidden": 64},
        "large": {"features": 64, "layers": 5, "hidden": 256},
    }

    def __init__(
        self,
        in_channels: int = 1,
        *,
        features: int = 32,
        layers: int = 4,
        hidden: int = 128,
        spectral: bool = False,
    ) -> None:
        name = type(self).__name__
        features = _positive_int(name, "features", features)
        layers = _positive_int(name, "layers", layers)
        hidden = _positive_int(name, "hidden", hidden)
        spectral = _flag(name, "spectral", spectral)
        super().__init__(
            in_channels,
            {"features": features, "layers": layers, "hidden": hidden, "spectral": spectral},
        )
        body: list[nn.Module] = [
            _maybe_sn(nn.Conv2d(in_channels, features, 3, 1, 1), spectral),
            nn.LeakyReLU(0.2),
        ]
        width = features
        for i in range(1, layers + 1):
            out = features * min(2**i, 8)
            body += [_maybe_sn(nn.Conv2d(width, out, 3, 2, 1), spectral), nn.LeakyReLU(0.2)]
            width = out
        self.features = nn.Sequential(*body)
        self.head = nn.Sequential(
            _maybe_sn(nn.Linear(width, hidden), spectral),
            nn.LeakyReLU(0.2),
            _maybe_sn(nn.Linear(hidden, 1), spectral),
        )

    def forward(self, candidate: Tensor, condition: Tensor | None = None) -> Tensor:
        """One logit per image, (N, 1)."""
        return self.head(self.features(self.join(candidate, condition)).mean((2, 3)))
