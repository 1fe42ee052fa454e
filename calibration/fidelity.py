"""Live fidelity: does an enhanced frame explain the raw frame it came from, within the noise?

The enhanced frame (raw-equivalent ADU, ``scale`` times finer) is taken back through the rig's
forward model: binned to the raw grid, given the scan's line phase, turned into the expected
ADU and its variance with the camera's noise model. The residual is the reduced chi-square of
the raw frame against that prediction: about 1 when the enhanced frame is consistent with the
data, much larger when it invents (or removes) structure the raw data do not support. The worst
block's value makes a small invented object stand out even in a large frame.

The enhanced frame shows the specimen, not the camera's fixed pattern: it is taken to be in the
camera's ADU with its scalar offset and a uniform sensitivity (what a perfect engine trained on
clean targets returns), and the profile's offset map (column and pixel offsets) and flat field
are put into the prediction. An output that already carries them (an electrons engine converts
back with the rig's maps, ``calibration.units``) says so with ``pattern_in_output=True``.

Whether the check can be trusted at all is a separate, engine-independent question: the raw
frame's own noise against the noise model (:func:`noise_ratio`), watched over frames by
:class:`MismatchMonitor`. A profile whose gain or offset does not describe the camera makes
every honest frame's chi-square wrong (an over-estimated variance makes the check blind); the
monitor says so instead of staying silent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .camera import CameraParams, adu_variance, expected_adu, photons_from_adu
from .scan import ScanParams, bidirectional_shift, bin_image

BLOCK = 16


@dataclass(frozen=True)
class Fidelity:
    """Reduced chi-square of the raw frame given the enhanced one: global and worst block;
    ``noise``: the raw frame's noise against the model's (:func:`noise_ratio`), or None when
    not computed."""

    chi2: float
    worst_block: float
    noise: float | None = None

    def as_dict(self) -> dict[str, float]:
        d = {"chi2": round(self.chi2, 4), "worst_block": round(self.worst_block, 4)}
        if self.noise is not None:
            d["noise"] = round(self.noise, 4)
        return d


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
    pattern_in_output: bool = False,
    noise: bool = False,
) -> Fidelity:
    """Chi-square per pixel of ``raw`` against the forward model of ``enhanced``.

    ``offset_map`` and ``flat_field`` (the raw grid's) go into the prediction, unless
    ``pattern_in_output``: the enhanced frame already carries them. ``noise``: also compute
    :func:`noise_ratio` (engine-independent, for :class:`MismatchMonitor`)."""
    if enhanced.shape[0] != raw.shape[0] * scale or enhanced.shape[1] != raw.shape[1] * scale:
        raise ValueError(
            f"enhanced shape {enhanced.shape} is not raw shape {raw.shape} times scale {scale}"
        )
    pred = predicted_raw(enhanced, scale, scan)
    if pattern_in_output:
        photons = photons_from_adu(pred, camera, offset_map=offset_map, flat_field=flat_field)
    else:  # the specimen on this camera: its offsets and sensitivity put into the prediction
        photons = photons_from_adu(pred, camera)
        if offset_map is not None or flat_field is not None:
            pred = expected_adu(photons, camera, offset_map=offset_map, flat_field=flat_field)
    var = adu_variance(np.maximum(photons, 0.0), camera, flat_field=flat_field)
    chi = (raw.astype(np.float32) - pred) ** 2 / var
    rows, cols = (s // block * block for s in chi.shape)
    if rows and cols:
        blocks = chi[:rows, :cols].reshape(rows // block, block, cols // block, block)
        worst = float(blocks.mean(axis=(1, 3)).max())
    else:
        worst = float(chi.mean())
    ratio = None
    if noise:
        ratio = noise_ratio(raw, pred, camera, offset_map=offset_map, flat_field=flat_field)
    return Fidelity(float(chi.mean()), worst, ratio)


#: A pixel's second difference counts in :func:`noise_ratio` where the smoothed frame's
#: squared curvature is below this fraction of the noise's variance (no structure there).
FLAT_CURVATURE = 0.02


def noise_ratio(
    raw: np.ndarray,
    mean: np.ndarray,
    camera: CameraParams,
    *,
    offset_map: np.ndarray | None = None,
    flat_field: np.ndarray | None = None,
) -> float:
    """The raw frame's noise variance over the model's, from the raw frame alone: about 1 when
    the camera model (gain, offset, read noise) describes this camera, whatever the engine did.

    The offset map is subtracted, then along each row the second difference
    ``h = raw[x-1] - 2 raw[x] + raw[x+1]`` removes any locally linear signal; its expected
    square is ``v[x-1] + 4 v[x] + v[x+1]`` with ``v`` the model's variance at the local mean.
    The statistic is the mean of ``h**2`` over that expectation where the frame is locally
    flat (the smoothed frame's squared curvature below :data:`FLAT_CURVATURE` of the noise),
    so specimen structure does not count. ``mean`` sets only the variance's level (smoothed
    with a 1-pixel Gaussian first), so passing the raw frame itself is fine; the engine's
    output never enters the noise itself. A mean, not a median: the median is biased for the
    few-electron, discrete counts of photon-counting cameras, the mean is not.
    """
    r = np.asarray(raw, np.float32)
    if r.ndim != 2 or r.shape[1] < 3:
        return float("nan")
    if offset_map is not None:
        r = r - offset_map
    level = ndimage.gaussian_filter(np.asarray(mean, np.float32), 1.0)
    photons = np.maximum(
        photons_from_adu(level, camera, offset_map=offset_map, flat_field=flat_field), 0.0
    )
    v = adu_variance(photons, camera, flat_field=flat_field)
    h = r[:, :-2] - 2 * r[:, 1:-1] + r[:, 2:]
    vh = v[:, :-2] + 4 * v[:, 1:-1] + v[:, 2:]
    s = ndimage.gaussian_filter(r, 1.5)
    hs = s[:, :-2] - 2 * s[:, 1:-1] + s[:, 2:]
    flat = hs * hs < FLAT_CURVATURE * vh
    if not flat.any():
        return float("nan")
    return float((h[flat] ** 2 / vh[flat]).mean())


def mismatch_band(
    pixels: int, *, per_pixel_sd: float = 2.0, z: float = 5.0, tolerance: float = 1.25
) -> tuple[float, float]:
    """The band a matching camera model keeps a per-frame noise statistic in (mean ~1).

    Statistical part: the mean of ``pixels`` unit-mean terms scatters by
    ``per_pixel_sd / sqrt(pixels)``. For a reduced chi-square of independent pixels
    ``per_pixel_sd`` is sqrt(2); for :func:`noise_ratio` the squared second differences of
    neighbours are correlated (-4/6 and 1/6 at lags 1 and 2), which makes it
    sqrt(2 (1 + 2 (4/6)**2 + 2 (1/6)**2)) = 1.97, so 2.0 covers both. ``z`` (5) of those
    standard deviations on each side keeps the chance of one honest frame outside the band
    below 1e-6. Model part: a calibrated gain is good to about 5% and a read noise to about 10%,
    and at under one electron per pixel the variance's level is estimated with a few percent
    bias: ``tolerance`` (1.25) widens the band by that factor each way. A gain or an offset off
    by 2x moves the statistic to 0.5 or 2 (offset: 0.6 or far above), well outside.
    """
    if pixels <= 0:
        raise ValueError(f"pixels must be > 0, got {pixels}")
    spread = z * per_pixel_sd / math.sqrt(pixels)
    return (max(0.0, 1.0 - spread) / tolerance, (1.0 + spread) * tolerance)


class MismatchMonitor:
    """Says when a per-frame statistic that is about 1 under a matching camera model (the
    noise ratio, or a perfect output's chi-square) stayed out of ``band`` for ``run``
    consecutive frames, too low (the model's variance too large: the check goes blind) or too
    high; it clears after ``run`` consecutive frames back in the band. Pure: feed it numbers."""

    def __init__(self, band: tuple[float, float], run: int = 10) -> None:
        lo, hi = band
        if not (0 <= lo < 1 < hi) or run < 1:
            raise ValueError(f"band must hold 1 (got {band}) and run must be >= 1 (got {run})")
        self.band, self.run = (float(lo), float(hi)), int(run)
        self._out = 0
        self._in = 0
        self._values: list[float] = []
        self.mismatch: str | None = None
        """Why the model does not fit (None while it does)."""
        self.fired = 0
        """How many times it started saying so."""

    def update(self, value: float) -> bool:
        """Feed one frame's statistic; True on the frame the mismatch is first declared."""
        lo, hi = self.band
        if not math.isfinite(value):
            return False  # no evidence either way (e.g. a frame without a flat region)
        if lo <= value <= hi:
            self._out, self._values = 0, []
            self._in += 1
            if self.mismatch is not None and self._in >= self.run:
                self.mismatch = None
            return False
        self._in = 0
        self._out += 1
        self._values.append(value)
        if self.mismatch is None and self._out >= self.run:
            median = float(np.median(self._values[-self.run :]))
            side = "low" if median < lo else "high"
            self.mismatch = (
                f"noise statistic {median:.3g} over the last {self.run} frames, expected "
                f"{lo:.2f}-{hi:.2f} ({side}: the model's variance is too "
                f"{'large' if side == 'low' else 'small'})"
            )
            self.fired += 1
            return True
        return False
