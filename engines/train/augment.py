"""Augmentation for training: DiffAugment for discriminator inputs, and consistent video flips.

DiffAugment (Zhao et al. 2020) is differentiable and must treat real and fake alike: draw the
random parameters once with :func:`sample_params` and :func:`apply` them to every tensor that
should see the same transform (or let each call draw its own, as the paper does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: The operations, applied in the order the policy string lists them.
POLICY_OPS = ("translation", "cutout", "brightness", "contrast")
DEFAULT_POLICY = "translation,cutout,brightness,contrast"
#: Brightness adds a per-sample offset uniform in [-0.5, 0.5) (in units of the normalized data).
BRIGHTNESS_RANGE = (-0.5, 0.5)
#: Contrast scales each sample about its own mean by a factor uniform in [0.5, 1.5).
CONTRAST_RANGE = (0.5, 1.5)
#: Translation shifts by whole pixels, uniform in [-r*H, r*H] x [-r*W, r*W]; vacated pixels are 0.
TRANSLATION_RATIO = 0.125
#: Cutout zeroes one square of side round(r*H) x round(r*W), centred anywhere in the image.
CUTOUT_RATIO = 0.5


def parse_policy(policy: str) -> tuple[str, ...]:
    """Split "translation,cutout" into operation names; unknown names raise ValueError."""
    ops = tuple(p.strip() for p in policy.split(",") if p.strip())
    unknown = [op for op in ops if op not in POLICY_OPS]
    if unknown:
        raise ValueError(
            f"unknown DiffAugment operations {unknown} in {policy!r}: use {POLICY_OPS}"
        )
    return ops


@dataclass(frozen=True)
class AugmentParams:
    """One draw of DiffAugment's random parameters for a batch of shape (N, *, H, W)."""

    ops: tuple[str, ...]
    batch: int
    size: tuple[int, int]
    brightness: Tensor | None = None  # (N,) offsets
    contrast: Tensor | None = None  # (N,) factors
    translation: Tensor | None = None  # (N, 2) integer (dy, dx) shifts
    cutout: Tensor | None = None  # (N, 2) integer (y0, x0) top-left corners, may lie outside
    cutout_size: tuple[int, int] = (0, 0)


def sample_params(
    shape: Sequence[int], policy: str = DEFAULT_POLICY, generator: torch.Generator | None = None
) -> AugmentParams:
    """Draw random parameters for tensors of ``shape`` (N, C, H, W); reuse them to augment alike."""
    if len(shape) != 4:
        raise ValueError(f"DiffAugment takes (N, C, H, W) shapes, got {tuple(shape)}")
    n, _, h, w = (int(s) for s in shape)
    ops = parse_policy(policy)
    values: dict[str, Tensor] = {}
    cutout_size = (0, 0)
    if "brightness" in ops:
        lo, hi = BRIGHTNESS_RANGE
        values["brightness"] = lo + (hi - lo) * torch.rand(n, generator=generator)
    if "contrast" in ops:
        lo, hi = CONTRAST_RANGE
        values["contrast"] = lo + (hi - lo) * torch.rand(n, generator=generator)
    if "translation" in ops:
        sy, sx = int(h * TRANSLATION_RATIO + 0.5), int(w * TRANSLATION_RATIO + 0.5)
        dy = torch.randint(-sy, sy + 1, (n,), generator=generator)
        dx = torch.randint(-sx, sx + 1, (n,), generator=generator)
        values["translation"] = torch.stack((dy, dx), dim=1)
    if "cutout" in ops:
        cutout_size = (int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5))
        cy = torch.randint(0, h, (n,), generator=generator)
        cx = torch.randint(0, w, (n,), generator=generator)
        values["cutout"] = torch.stack((cy - cutout_size[0] // 2, cx - cutout_size[1] // 2), dim=1)
    return AugmentParams(ops=ops, batch=n, size=(h, w), cutout_size=cutout_size, **values)


def _translate(x: Tensor, shifts: Tensor) -> Tensor:
    """out[i, :, y, x] = x[i, :, y - dy_i, x - dx_i], zero where that falls outside."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    ys = torch.arange(h, device=x.device).view(1, h, 1) - shifts[:, 0].view(n, 1, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w) - shifts[:, 1].view(n, 1, 1)
    ys = (ys + 1).clamp(0, h + 1)
    xs = (xs + 1).clamp(0, w + 1)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, ys, xs].permute(0, 3, 1, 2)


def _cutout_mask(params: AugmentParams, like: Tensor) -> Tensor:
    assert params.cutout is not None
    n = params.batch
    h, w = params.size
    corner = params.cutout.to(like.device)
    ys = torch.arange(h, device=like.device).view(1, h, 1)
    xs = torch.arange(w, device=like.device).view(1, 1, w)
    y0, x0 = corner[:, 0].view(n, 1, 1), corner[:, 1].view(n, 1, 1)
    inside = (ys >= y0) & (ys < y0 + params.cutout_size[0])
    inside = inside & (xs >= x0) & (xs < x0 + params.cutout_size[1])
    return (~inside).unsqueeze(1).to(like.dtype)


def apply(x: Tensor, params: AugmentParams) -> Tensor:
    """Apply one draw of DiffAugment to x (N, C, H, W): differentiable; same draw, same result."""
    if x.dim() != 4 or x.shape[0] != params.batch or tuple(x.shape[-2:]) != params.size:
        raise ValueError(
            f"these DiffAugment parameters were drawn for batch {params.batch} of size "
            f"{params.size}, got a tensor of shape {tuple(x.shape)}: draw them with "
            "sample_params(x.shape, ...)"
        )
    for op in params.ops:
        if op == "brightness":
            assert params.brightness is not None
            x = x + params.brightness.to(x.device, x.dtype).view(-1, 1, 1, 1)
        elif op == "contrast":
            assert params.contrast is not None
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * params.contrast.to(x.device, x.dtype).view(-1, 1, 1, 1) + mean
        elif op == "translation":
            assert params.translation is not None
            x = _translate(x, params.translation.to(x.device))
        elif op == "cutout":
            x = x * _cutout_mask(params, x)
    return x


def diff_augment(
    x: Tensor,
    policy: str | None = None,
    *,
    seed: int | None = None,
    params: AugmentParams | None = None,
) -> Tensor:
    """DiffAugment (Zhao 2020) of x (N, C, H, W) with ``policy`` (default DEFAULT_POLICY).

    With ``params`` (from :func:`sample_params`) that exact draw is applied, so real and fake
    get identical transforms; otherwise a fresh draw is made (reproducible with ``seed``).
    """
    if params is not None:
        if seed is not None:
            raise ValueError("give diff_augment either params or seed, not both")
        if policy is not None and parse_policy(policy) != params.ops:
            raise ValueError(
                f"policy {policy!r} differs from the params' operations {params.ops}: "
                "leave policy out when passing params"
            )
        return apply(x, params)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    drawn = sample_params(x.shape, DEFAULT_POLICY if policy is None else policy, generator)
    return apply(x, drawn)


# --- conventional, geometry-consistent augmentation of a training sample ----------------------

ArrayT = TypeVar("ArrayT", np.ndarray, Tensor)


def dihedral(x: ArrayT, op: int) -> ArrayT:
    """One of the 8 flips/rotations of the last two axes: bit 0 flips x, bit 1 flips y, bit 2
    transposes (after the flips). Works on numpy arrays and tensors of any resolution."""
    if not 0 <= op < 8:
        raise ValueError(f"dihedral op {op} must be in 0..7")
    if isinstance(x, Tensor):
        dims = [d for bit, d in ((1, -1), (2, -2)) if op & bit]
        y = torch.flip(x, dims) if dims else x
        return y.transpose(-2, -1).contiguous() if op & 4 else y
    y = x
    if op & 1:
        y = y[..., ::-1]
    if op & 2:
        y = y[..., ::-1, :]
    if op & 4:
        y = np.swapaxes(y, -1, -2)
    return np.ascontiguousarray(y)


def video_augment(
    frames: ArrayT,
    target: ArrayT,
    previous: ArrayT | None = None,
    background: ArrayT | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[ArrayT, ArrayT, ArrayT | None, ArrayT | None]:
    """Apply one random flip/rot90/transpose (uniform over all 8) to every tensor of a sample.

    frames (..., H, W) is the input window; target, previous (the engine's previous output)
    and background may be at another integer scale s (..., s*H, s*W). Flips and transposes
    about the image centre keep every pixel's footprint aligned across resolutions.
    """
    if frames.ndim < 2:
        raise ValueError(f"frames must have spatial axes (..., H, W), got shape {frames.shape}")
    h, w = frames.shape[-2:]
    for name, t in (("target", target), ("previous", previous), ("background", background)):
        if t is None:
            continue
        th, tw = t.shape[-2:] if t.ndim >= 2 else (0, 0)
        if th == 0 or th % h or tw % w or th // h != tw // w:
            raise ValueError(
                f"{name} of shape {tuple(t.shape)} is not frames' size {h}x{w} times one integer "
                "scale: crop input and target patches from the same region"
            )
    if rng is None:
        rng = np.random.default_rng()
    op = int(rng.integers(8))
    return (
        dihedral(frames, op),
        dihedral(target, op),
        None if previous is None else dihedral(previous, op),
        None if background is None else dihedral(background, op),
    )
