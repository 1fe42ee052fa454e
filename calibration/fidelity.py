"""Live fidelity: does an enhanced frame explain the raw frame it came from, within the noise?

The enhanced frame (raw-equivalent ADU, ``scale`` times finer) is taken back through the rig's
forward model: binned to the raw grid, given the scan's line phase, turned into the expected
ADU and its variance with the camera's noise model. The residual is the reduced chi-square of
the raw frame against that prediction: about 1 when the enhanced frame is consistent with the
data, much larger when it invents (or removes) structure the raw data do not support. The worst
block's value makes a small invented object stand out even in a large frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .camera import CameraParams, adu_variance, photons_from_adu
from .scan import ScanParams, bidirectional_shift, bin_image

BLOCK = 16


@dataclass(frozen=True)
class Fidelity:
    """Reduced chi-square of the raw frame given the enhanced one: global and worst block."""

    chi2: float
    worst_block: float

    def as_dict(self) -> dict[str, float]:
        return {"chi2": round(self.chi2, 4), "worst_block": round(self.worst_block, 4)}


def predicted_raw(enhanced: np.ndarray, scale: int, scan: ScanParams | None = None) -> np.ndarray:
    """The raw frame's expected ADU from an enhanced frame: bin by ``scale``, add the line phase."""
    pred = bin_image(np.asarray(enhanced, dtype=np.float32), scale) / np.float32(scale * scale)
    if scan is not None and scan.bidirectional and scan.phase_px:
        pred = bidirectional_shift(pred, scan.phase_px)
    return pred


def fidelity(
    enhanced: np.ndarray,
    raw: np.ndarray,
    camera: CameraParams,
    *,
    scale: int = 1,
    scan: ScanParams | None = None,
    offset_map: np.ndarray | None = None,
    flat_field: np.ndarray | None = None,
    block: int = BLOCK,
) -> Fidelity:
    """Chi-square per pixel of ``raw`` against the forward model of ``enhanced``."""
    if enhanced.shape[0] != raw.shape[0] * scale or enhanced.shape[1] != raw.shape[1] * scale:
        raise ValueError(
            f"enhanced shape {enhanced.shape} is not raw shape {raw.shape} times scale {scale}"
        )
    pred = predicted_raw(enhanced, scale, scan)
    photons = np.maximum(
        photons_from_adu(pred, camera, offset_map=offset_map, flat_field=flat_field), 0.0
    )
    var = adu_variance(photons, camera, flat_field=flat_field)
    chi = (raw.astype(np.float32) - pred) ** 2 / var
    rows, cols = (s // block * block for s in chi.shape)
    if rows and cols:
        blocks = chi[:rows, :cols].reshape(rows // block, block, cols // block, block)
        worst = float(blocks.mean(axis=(1, 3)).max())
    else:
        worst = float(chi.mean())
    return Fidelity(float(chi.mean()), worst)
