"""Blind-spot training (Noise2Void, with N2V2's median replacement): a denoiser learns from
noisy frames alone.

A few pixels of the newest input frame are hidden: each is replaced by the median of its
neighbours (the 5x5 neighbourhood without itself), and the loss counts the generator's output
at those pixels only, against the frame's own noisy values there. A pixel's noise is
independent of its neighbours' (a camera's shot and read noise), so the best the generator can
do at a hidden pixel is predict its expected value from the neighbourhood: the clean signal.
N2V2 (Hoeck et al. 2022) replaces hidden pixels by that median rather than by a random
neighbour, which removes the checkerboard artefacts of the original; its architectural changes
(blur pooling, no top-level skip) are not made here.

What it cannot do: noise that is correlated between neighbouring pixels (sCMOS pattern noise
left in, scan-line phase, demosaicing) is learnt as signal, and the hidden pixel's own value is
never seen, so fine detail the size of one pixel is smoothed.

Earlier frames of a temporal window stay as they are: their noise is independent of the newest
frame's, so a temporal engine learns from them too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK = 8
"""One hidden pixel per BLOCK x BLOCK block, at a random place in it (1.6% of the pixels)."""
RADIUS = 2
"""Hidden pixels take the median of the (2 RADIUS + 1)^2 neighbourhood without the centre."""


def hide(frames: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``frames`` (B, C, H, W, oldest channel first) with blind spots in the newest channel, and
    the mask (B, 1, H, W; True where hidden)."""
    b, _, h, w = frames.shape
    gh, gw = -(-h // BLOCK), -(-w // BLOCK)
    dy = torch.randint(0, BLOCK, (b, gh, gw), generator=generator)
    dx = torch.randint(0, BLOCK, (b, gh, gw), generator=generator)
    rows = (torch.arange(gh)[:, None] * BLOCK + dy).clamp(max=h - 1)
    cols = (torch.arange(gw)[None, :] * BLOCK + dx).clamp(max=w - 1)
    mask = torch.zeros(b, h, w, dtype=torch.bool)
    mask[torch.arange(b)[:, None, None], rows, cols] = True
    mask = mask[:, None]
    newest = frames[:, -1:]
    k = 2 * RADIUS + 1
    padded = F.pad(newest, (RADIUS,) * 4, mode="reflect")
    neighbours = F.unfold(padded, k)  # (B, k*k, H*W)
    centre = (k * k) // 2
    neighbours = torch.cat([neighbours[:, :centre], neighbours[:, centre + 1 :]], dim=1)
    median = neighbours.median(dim=1).values.view(b, 1, h, w)
    hidden = torch.where(mask, median, newest)
    return torch.cat([frames[:, :-1], hidden], dim=1), mask


def scored(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The output at the hidden pixels and the target elsewhere: any pixel loss of it against
    the target counts the hidden pixels only (scaled by their share, a constant)."""
    return torch.where(mask, output, target)


__all__ = ["BLOCK", "RADIUS", "hide", "scored"]
