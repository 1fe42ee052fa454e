"""Line-split training (Neighbor2Neighbor on scan lines): a denoiser learns from single noisy
frames by splitting each into two half-size images taken from neighbouring lines.

In every 2x2 cell of a frame, one pixel of its upper line and one of its lower line are taken
(the column of each drawn at random, and which of the two goes into which half drawn at random,
so neither half sits consistently above or to the side of the other). A confocal scanner records
neighbouring lines in separate sweeps (a bidirectional scan: forward and backward), so the two
halves are independent noise draws of nearly the same content, even when the noise is correlated
along a line (laser or detector fluctuation during one sweep). The generator maps one half onto
the other (Noise2Noise within a frame), plus Neighbor2Neighbor's regularizer (Huang et al. 2021):
the difference between the halves of the generator's own full-size output, taken without a
gradient, corrects for the half-line of content by which the halves differ. For a squared error
the two terms sum to one pixel loss against a corrected target, ``g2(y) + w (g1(f(y)) -
g2(f(y)))`` with ``w = gamma / (1 + gamma)``; that is what :func:`pairs` returns.

Bidirectional recordings must have their line phase undone first (the training data do it from
the profile, ``serve --correct-bidir`` live), or the halves differ by the phase.

What it cannot do: the generator trains on half-size images, so it sees the specimen at twice
its pixel size (structures two pixels wide are one pixel wide in training) and learns the noise of
single frames only; with a time-lapse, ``next-frame`` sees both the full grid and the real frame.
"""

from __future__ import annotations

import torch

GAMMA = 2.0
"""Neighbor2Neighbor's regularizer weight (their default for real noisy images)."""


def cells(shape: torch.Size, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat pixel indices (B, H/2 * W/2) of the two halves of frames of ``shape`` (B, C, H, W):
    in each 2x2 cell one pixel of either line, at random columns, in random order."""
    b, _, h, w = shape
    if h % 2 or w % 2 or h < 2 or w < 2:
        raise ValueError(f"line-split needs even frame sides, got {h}x{w}: crop to even sizes")
    gh, gw = h // 2, w // 2
    top = torch.arange(gh)[:, None] * 2 * w + torch.arange(gw)[None, :] * 2  # cell origin
    swap = torch.randint(0, 2, (b, gh, gw), generator=generator)
    cols = torch.randint(0, 2, (2, b, gh, gw), generator=generator)
    first = top + swap * w + cols[0]
    second = top + (1 - swap) * w + cols[1]
    return first.view(b, -1), second.view(b, -1)


def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The half of ``x`` (B, C, H, W) at ``index`` (from :func:`cells`): (B, C, H/2, W/2)."""
    b, c, h, w = x.shape
    picked = x.flatten(2).gather(2, index[:, None].expand(-1, c, -1))
    return picked.view(b, c, h // 2, w // 2)


def pairs(
    frames: torch.Tensor,
    target: torch.Tensor,
    output: torch.Tensor | None,
    generator: torch.Generator,
    gamma: float = GAMMA,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input half of every frame, corrected target half, the first half's index) from the
    full-size ``frames`` (B, C, H, W), their noisy ``target`` (the newest frame) and the
    generator's full-size ``output`` on them (taken without a gradient). ``gamma`` 0 (output
    None): the plain other half, Noise2Noise's target, whose error does not move with the
    generator (validation scores against it)."""
    first, second = cells(frames.shape, generator)
    corrected = take(target, second)
    if gamma:
        if output is None:
            raise ValueError("line-split's regularizer (gamma > 0) needs the full-size output")
        w = gamma / (1.0 + gamma)
        corrected = corrected + w * (take(output, first) - take(output, second))
    return take(frames, first), corrected, first


__all__ = ["GAMMA", "cells", "pairs", "take"]
