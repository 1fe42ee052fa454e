"""Scanner/detector sampling: bin the fine grid into recorded pixels, then bidirectional line
phase."""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class ScanParams(BaseModel):
    """How the fine simulation grid maps onto recorded pixels and scan lines."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    downsample: int = Field(
        1, ge=1, description="Fine-grid pixels per recorded pixel along each axis."
    )
    bidirectional: bool = Field(
        False, description="Odd rows are scanned backwards and carry a phase error."
    )
    phase_px: float = Field(
        0.0,
        allow_inf_nan=False,
        description="Shift of odd (backward) rows vs even rows, in recorded pixels; + is right.",
    )


def bin_image(image: np.ndarray, factor: int) -> np.ndarray:
    """Sum factor x factor blocks (detected photons add up); float32."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2 or factor < 1 or image.shape[0] % factor or image.shape[1] % factor:
        raise ValueError(
            f"cannot bin image of shape {image.shape} by factor {factor}: need a 2-D image whose "
            "sides are multiples of a factor >= 1; crop or pad the fine image."
        )
    if factor == 1:
        return image.copy()
    h, w = image.shape
    return image.reshape(h // factor, factor, w // factor, factor).sum(
        axis=(1, 3), dtype=np.float32
    )


def bidirectional_shift(image: np.ndarray, phase_px: float) -> np.ndarray:
    """Shift odd rows right by `phase_px` (linear interpolation, edge values repeated); even rows
    unchanged."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"bidirectional_shift expects a 2-D image, got shape {image.shape}.")
    if not math.isfinite(phase_px):
        raise ValueError(f"phase_px must be finite, got {phase_px}.")
    out = image.copy()
    w = image.shape[1]
    src = np.clip(np.arange(w, dtype=np.float64) - phase_px, 0, w - 1)
    left = np.floor(src).astype(np.intp)
    right = np.minimum(left + 1, w - 1)
    frac = (src - left).astype(np.float32)
    odd = image[1::2]
    out[1::2] = odd[:, left] * (1 - frac) + odd[:, right] * frac
    return out


def scan(fine: np.ndarray, scan: ScanParams) -> np.ndarray:
    """Fine-grid photons -> recorded-pixel photons: bin by `downsample`, then apply the line phase
    if bidirectional."""
    binned = bin_image(fine, scan.downsample)
    return bidirectional_shift(binned, scan.phase_px) if scan.bidirectional else binned
