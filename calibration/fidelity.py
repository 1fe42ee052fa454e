"""Live fidelity: does an enhanced frame explain the raw frame it came from, within the noise?

The enhanced frame (raw-equivalent ADU, ``scale`` times finer) is taken back through the rig's
forward model: binned to the raw grid, given the scan's line phase, turned into the expected
ADU and its variance with the camera's noise model. The residual is the reduced chi-square of
the raw frame against that prediction: about 1 when the enhanced frame is consistent with the
data, much larger when it invents (or removes) structure the raw data do not support. The worst
block's value makes a large invented object stand out even in a large frame; a small one is
averaged away in both. Localized objects are the job of the scan (:func:`scan`): the signed,
whitened residual matched-filtered at several scales (the PSF's to 8x it), its threshold set
from the noise model for a chosen per-frame false-alarm rate, the regions above it published.

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
from collections import deque
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage

from .camera import CameraParams, expected_adu, photons_from_adu, variance_at_mean
from .scan import ScanParams, bidirectional_shift, bin_image

BLOCK = 16
#: Scales of the matched-filter bank, in units of the PSF's Gaussian sigma (raw px).
SCAN_SCALES = (1.0, 2.0, 4.0, 8.0)
#: Per-frame false-alarm rate the live scan's threshold is set for. Nominal: ``bench fidelity``
#: measured 2.5-5.3% of honest frames flagged at 2% (and 6-8% at 5%) on simulated and real
#: scenes at a few photons per pixel, where the skew-corrected statistic's tails run a little
#: heavier than the Gaussian field the threshold assumes; 2% keeps honest flags at or under 5%.
FALSE_ALARM = 0.02
#: Regions kept per frame (the strongest), in :class:`Scan` and the published header.
MAX_REGIONS = 16


@dataclass(frozen=True)
class Fidelity:
    """Reduced chi-square of the raw frame given the enhanced one: global and worst block;
    ``noise``: the raw frame's noise against the model's (:func:`noise_ratio`), or None when
    not computed."""

    chi2: float
    worst_block: float
    noise: float | None = None
    scan: Scan | None = None
    """The localized matched-filter scan (:func:`scan`), when asked for."""

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"chi2": round(self.chi2, 4), "worst_block": round(self.worst_block, 4)}
        if self.noise is not None:
            d["noise"] = round(self.noise, 4)
        if self.scan is not None:
            d["flagged"] = [g.as_dict() for g in self.scan.regions]
            d["threshold"] = round(self.scan.threshold, 3)
        return d


def predicted_raw(enhanced: np.ndarray, scale: int, scan: ScanParams | None = None) -> np.ndarray:
    """The raw frame's expected ADU from an enhanced frame: bin by ``scale``, add the line phase.
    A power-of-two scale takes 2x2 block means by strided sums (a reshaped sum over two axes
    costs several times more). At scale 1 without a line phase the result is ``enhanced``
    itself (as float32): read it, do not write it."""
    e: np.ndarray = np.asarray(enhanced, dtype=np.float32)
    pred: np.ndarray
    if scale > 1 and scale & (scale - 1) == 0 and not (e.shape[0] % scale or e.shape[1] % scale):
        pred = e
        for _ in range(scale.bit_length() - 1):
            pred = _bin2(pred)
    elif scale == 1:
        pred = e  # read only below: no copy
    else:
        pred = bin_image(e, scale) / np.float32(scale * scale)
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
    sigmas: Sequence[float] | None = None,
    false_alarm: float = FALSE_ALARM,
    map_bin: int | None = None,
    max_regions: int = MAX_REGIONS,
) -> Fidelity:
    """Chi-square per pixel of ``raw`` against the forward model of ``enhanced``.

    ``offset_map`` and ``flat_field`` (the raw grid's) go into the prediction, unless
    ``pattern_in_output``: the enhanced frame already carries them. ``noise``: also compute
    :func:`noise_ratio` (engine-independent, for :class:`MismatchMonitor`). ``sigmas`` (raw
    px, e.g. :func:`default_sigmas` of the PSF): also scan the same residual for localized
    excess or missing signal (:func:`scan_residual`) at ``false_alarm`` per frame, and with
    ``map_bin`` pool its significance into a coarse map (:attr:`Scan.map`)."""
    if enhanced.shape[0] != raw.shape[0] * scale or enhanced.shape[1] != raw.shape[1] * scale:
        raise ValueError(
            f"enhanced shape {enhanced.shape} is not raw shape {raw.shape} times scale {scale}"
        )
    pred = predicted_raw(enhanced, scale, scan)
    if not pattern_in_output and (offset_map is not None or flat_field is not None):
        # the specimen on this camera: its offsets and sensitivity put into the prediction
        pred = expected_adu(photons_from_adu(pred, camera), camera, offset_map=offset_map,
                            flat_field=flat_field)  # fmt: skip
    var = variance_at_mean(pred, camera, offset_map=offset_map)
    r = np.subtract(raw, pred, dtype=np.float32)
    r /= np.sqrt(var)
    chi = np.square(r)
    rows, cols = (s // block * block for s in chi.shape)
    if rows and cols:
        strips = chi[:rows, :cols].reshape(rows // block, block, cols).sum(axis=1)
        worst = float(strips.reshape(rows // block, cols // block, block).sum(axis=2).max())
        worst /= block * block
    else:
        worst = float(chi.mean())
    ratio = None
    if noise:
        ratio = noise_ratio(raw, pred, camera, offset_map=offset_map)
    found = None
    if sigmas is not None:
        found = scan_residual(r, sigmas=sigmas, false_alarm=false_alarm, noise=(var, camera),
                              map_bin=map_bin, max_regions=max_regions)  # fmt: skip
    return Fidelity(float(chi.mean()), worst, ratio, found)


#: A pixel's second difference counts in :func:`noise_ratio` where the smoothed frame's
#: squared curvature is below this fraction of the noise's variance (no structure there).
FLAT_CURVATURE = 0.02


def noise_ratio(
    raw: np.ndarray,
    mean: np.ndarray,
    camera: CameraParams,
    *,
    offset_map: np.ndarray | None = None,
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
    few-electron, discrete counts of photon-counting cameras, the mean is not. A frame larger
    than :data:`NOISE_PIXELS` is sampled in :data:`NOISE_BAND`-row bands spread evenly over
    it (rows are the statistic's unit): as many pixels as a 256x256 frame, which holds the
    statistic well inside :func:`mismatch_band` and keeps its cost flat in the frame size.
    """
    r = np.asarray(raw)
    if r.ndim != 2 or r.shape[1] < 3:
        return float("nan")
    rows, cols = r.shape
    bands = max(1, NOISE_PIXELS // (NOISE_BAND * cols))
    if rows * cols <= NOISE_PIXELS or bands * NOISE_BAND >= rows:
        starts, height = [0], rows
    else:
        starts, height = np.linspace(0, rows - NOISE_BAND, bands).astype(int).tolist(), NOISE_BAND
    total, count = 0.0, 0
    for y in starts:
        part = slice(y, y + height)
        offsets = None if offset_map is None else offset_map[part]
        terms = _noise_terms(r[part], np.asarray(mean)[part], camera, offsets)
        total, count = total + float(terms.sum()), count + terms.size
    return total / count if count else float("nan")


#: Pixels :func:`noise_ratio` looks at, at most (a 256x256 frame's), and the height of the row
#: bands it samples a larger frame with.
NOISE_PIXELS = 256 * 256
NOISE_BAND = 32


def _noise_terms(
    raw: np.ndarray, mean: np.ndarray, camera: CameraParams, offset_map: np.ndarray | None
) -> np.ndarray:
    """:func:`noise_ratio`'s per-pixel terms ``h**2 / E[h**2]`` where the frame is flat, over
    the pixels the smoothing's support lies inside (binomial filters: a level of variance 1,
    the Gaussian of sigma 1 the statistic was designed with, and a curvature smoothing of
    variance 2.5, sigma 1.6)."""
    r = np.asarray(raw, np.float32)
    if offset_map is not None:
        r = r - offset_map
    edge = _CURVATURE_ORDER // 2
    if min(r.shape) <= 2 * edge + 2:
        return np.empty(0, np.float32)
    trim = edge - _LEVEL_ORDER // 2
    level = _pair_sums(np.asarray(mean, np.float32), _LEVEL_ORDER)[trim:-trim, trim:-trim]
    level *= np.float32(0.25**_LEVEL_ORDER)
    inner = (slice(edge, -edge),) * 2
    v = variance_at_mean(level, camera,
                         offset_map=None if offset_map is None else offset_map[inner])  # fmt: skip
    r_in = r[inner]
    h = r_in[:, :-2] - 2 * r_in[:, 1:-1] + r_in[:, 2:]
    vh = v[:, :-2] + 4 * v[:, 1:-1] + v[:, 2:]
    s = _pair_sums(r, _CURVATURE_ORDER)
    s *= np.float32(0.25**_CURVATURE_ORDER)
    hs = s[:, :-2] - 2 * s[:, 1:-1] + s[:, 2:]
    flat = hs * hs < FLAT_CURVATURE * vh
    return h[flat] ** 2 / vh[flat]


_LEVEL_ORDER = 4
_CURVATURE_ORDER = 10


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


_SCHEDULE_KEYS = 65536
"""Keys :class:`CheckSchedule` counts frames for before it forgets them all."""


class CheckSchedule:
    """Which frames get the full check (chi-square and scan) when it cannot run on every frame
    in a live budget: every ``every``-th frame of each key, or with ``every=0`` as often as a
    per-frame budget of ``max(min_ms, ns_per_px * pixels)`` allows (the issue's 5 ms at 512x512
    and 40 ms at 2048x2048), from the median cost per pixel of the last ``window`` checks. The
    first frame of a key is always checked. Pure: feed it the measured costs."""

    def __init__(self, every: int = 0, *, ns_per_px: float = 10.0, min_ms: float = 5.0,
                 window: int = 16) -> None:  # fmt: skip
        if every < 0 or ns_per_px <= 0 or min_ms <= 0 or window < 1:
            raise ValueError(
                f"every must be >= 0 (0: automatic), got {every}; ns_per_px, min_ms and window "
                f"must be > 0, got {ns_per_px}, {min_ms}, {window}"
            )
        self.fixed, self.ns_per_px, self.min_ms = int(every), float(ns_per_px), float(min_ms)
        self._costs: deque[float] = deque(maxlen=window)  # ns per pixel of recent checks
        self._since: dict[Hashable, int] = {}
        self.every = max(self.fixed, 1)
        """The schedule in force: check one frame in ``every`` of each key."""

    def due(self, key: Hashable, pixels: int) -> bool:
        """Whether this frame of ``key`` (of ``pixels`` raw px) gets the full check."""
        if not self.fixed and self._costs:
            budget_ns = max(self.min_ms * 1e6, self.ns_per_px * pixels)
            self.every = max(1, math.ceil(float(np.median(self._costs)) * pixels / budget_ns))
        since = self._since.get(key)
        if since is None and len(self._since) >= _SCHEDULE_KEYS:
            self._since.clear()  # keys come and go over days: every one starts checked again
        if since is None or since + 1 >= self.every:
            self._since[key] = 0
            return True
        self._since[key] = since + 1
        return False

    def record(self, ms: float, pixels: int) -> None:
        """The cost of one full check of a frame of ``pixels`` raw px."""
        if pixels > 0 and math.isfinite(ms) and ms >= 0:
            self._costs.append(ms * 1e6 / pixels)


# -- the localized scan -------------------------------------------------------------------------

#: A scale is filtered on the residual binned by the largest power of two ``d`` with
#: ``sigma / d >= DECIMATE_SIGMA``: every scale then costs about the same per binned pixel,
#: and the whole bank less than twice the smallest scale.
DECIMATE_SIGMA = 0.9


@dataclass(frozen=True)
class Region:
    """One connected region of the scan above its threshold: peak position (raw px, row ``y``
    and column ``x``), the filter's scale (Gaussian sigma, raw px), the peak significance ``z``
    (above the threshold) and ``sign``: +1 the raw frame holds more signal there than the
    output explains (structure removed or missed), -1 less (structure invented)."""

    y: float
    x: float
    scale_px: float
    z: float
    sign: int

    def as_dict(self) -> dict[str, float | int]:
        return {"y": round(self.y, 1), "x": round(self.x, 1), "scale_px": round(self.scale_px, 2),
                "z": round(self.z, 2), "sign": self.sign}  # fmt: skip


@dataclass(frozen=True)
class Scan:
    """A frame's localized scan: the regions above ``threshold`` (strongest first, at most
    :data:`MAX_REGIONS`), the threshold, the largest ``|z|`` over every scale, the scales the
    filters really had (raw px), and optionally a coarse significance map."""

    regions: tuple[Region, ...]
    threshold: float
    max_z: float
    scales: tuple[float, ...]
    map: np.ndarray | None = None
    """The signed significance of largest magnitude over every scale and position in each
    cell of ``map_bin`` raw px (:func:`scan_residual`), float32; None unless asked for."""

    @property
    def flagged(self) -> bool:
        return bool(self.regions)


def default_sigmas(psf_sigma_px: float) -> tuple[float, ...]:
    """The filter bank for a PSF of this Gaussian sigma (raw px): :data:`SCAN_SCALES` times it
    (the PSF never taken below 0.9 px: the smallest filter the raw grid holds)."""
    base = max(float(psf_sigma_px), DECIMATE_SIGMA)
    return tuple(base * k for k in SCAN_SCALES)


@dataclass(frozen=True)
class _Filter:
    """A binomial filter of even ``order`` on the residual binned by ``d``: variance
    ``order / 4`` binned px, ``scale`` its Gaussian sigma on the raw grid (box included)."""

    d: int
    order: int
    scale: float


def _plan(sigma: float) -> _Filter:
    """The binning and binomial order closest to a Gaussian of ``sigma`` raw px (a d x d box
    adds (d**2 - 1)/12 to the variance)."""
    d = 1
    while sigma / (2 * d) >= DECIMATE_SIGMA:
        d *= 2
    box = (d * d - 1) / 12.0

    def scale(order: int) -> float:
        return math.sqrt(d * d * order / 4 + box)

    order = min(range(2, 17, 2), key=lambda n: abs(scale(n) - sigma))
    return _Filter(d, order, scale(order))


def _tail(u: float) -> float:
    return 0.5 * math.erfc(u / math.sqrt(2.0))


def _expected_regions(u: float, shape: tuple[int, int], filters: Sequence[_Filter]) -> float:
    """Expected number of regions of a null scan above ``|z| > u``, summed over the filters.

    Per filter and sign: the expected Euler characteristic of the excursion set of a smooth
    Gaussian field (Worsley et al. 1996, scale-space search), for white noise filtered by a
    Gaussian of sigma ``s`` over an ``H x W`` region: ``Q(u) + (H + W) sqrt(l) e^{-u^2/2} /
    (2 pi) + H W l u e^{-u^2/2} / (2 pi)^{3/2}`` with ``l = 1/(2 s^2)``; never more than the
    positions the filter is evaluated at times ``Q(u)`` (Bonferroni: it wins at the smallest
    scale, where the lattice is coarse next to the field's smoothness). A plain Bonferroni over
    "resels" (``H W / (4 pi s^2)`` independent positions) under-counts a smooth field's maxima
    by about ``u^2`` (~20 at these thresholds): it gave several times the nominal rate.
    Summing over filters (Bonferroni across scales) is conservative: neighbouring scales are
    correlated."""
    total = 0.0
    q, g = _tail(u), math.exp(-0.5 * u * u)
    for f in filters:
        rows, cols = (max(n // f.d - f.order, 0) for n in shape)  # the valid positions
        lam = 1.0 / (2.0 * f.scale * f.scale)
        h, w = rows * f.d, cols * f.d
        ec = q + (h + w) * math.sqrt(lam) * g / (2 * math.pi)
        ec += h * w * lam * u * g / (2 * math.pi) ** 1.5
        total += 2.0 * min(ec, rows * cols * q)  # both signs
    return total


@lru_cache(maxsize=64)
def scan_threshold(shape: tuple[int, int], sigmas: tuple[float, ...], false_alarm: float) -> float:
    """The ``|z|`` threshold at which a null frame of this shape has ``false_alarm`` expected
    regions over all ``sigmas`` (:func:`_expected_regions`): the per-frame false-alarm rate."""
    if not 0 < false_alarm < 1:
        raise ValueError(f"false_alarm must be in (0, 1), got {false_alarm}")
    filters = [_plan(s) for s in sigmas]
    lo, hi = 0.5, 40.0
    for _ in range(50):  # the expectation falls monotonically with u
        mid = 0.5 * (lo + hi)
        if _expected_regions(mid, shape, filters) > false_alarm:
            lo = mid
        else:
            hi = mid
    return hi


def _bin2(a: np.ndarray) -> np.ndarray:
    """2x2 block means (odd edges dropped)."""
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    rows = a[0:h:2, :w] + a[1:h:2, :w]
    out = rows[:, 0::2] + rows[:, 1::2]
    out *= np.float32(0.25)
    return out


def _pair_sums(a: np.ndarray, order: int) -> np.ndarray:
    """The unnormalized binomial filter of ``order`` (weights C(order, j), summing to
    ``4**order`` in 2-D) over the valid positions of ``a``: output ``i`` is centred on input
    ``i + order/2``. Repeated pair sums: ``order`` additions per axis, no multiplications."""
    for _ in range(order):
        a = a[:-1] + a[1:]
    for _ in range(order):
        a = a[:, :-1] + a[:, 1:]
    return a


def _significance(level: np.ndarray, f: _Filter) -> np.ndarray:
    """The binomial filter of ``f`` over the valid positions of ``level`` (the residual binned
    by ``f.d``), as a standard normal under the null: the binomial's weights C(n, j) have
    squared sum C(2n, n) per axis, and a block mean of unit-variance pixels has variance
    1/d**2."""
    a = _pair_sums(level, f.order)
    a *= np.float32(f.d / math.comb(2 * f.order, f.order))
    return a


#: Binned pixels from which a filter runs in two threads, on two strips of rows (numpy's
#: additions release the GIL: about half the time on two cores).
PARALLEL_PIXELS = 512 * 1024


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(2, thread_name_prefix="fidelity-scan")


def _strips(level: np.ndarray, f: _Filter) -> list[tuple[int, np.ndarray]]:
    """(first valid output row, significance) of ``level`` in one piece, or in two strips of
    output rows computed in two threads for a large level (each strip reads ``order`` more
    input rows: the filter's support)."""
    rows = level.shape[0] - f.order
    if level.size < PARALLEL_PIXELS or rows < 2:
        return [(0, _significance(level, f))]
    half = rows // 2
    top = _pool().submit(_significance, level[: half + f.order], f)
    bottom = _significance(level[half:], f)
    return [(0, top.result()), (half, bottom)]


def _binned(a: np.ndarray) -> np.ndarray:
    """:func:`_bin2`, in two threads (two strips of rows) for a large ``a``."""
    if a.size < PARALLEL_PIXELS or a.shape[0] < 4:
        return _bin2(a)
    half = a.shape[0] // 4 * 2
    top = _pool().submit(_bin2, a[:half])
    bottom = _bin2(a[half:])
    return np.concatenate([top.result(), bottom])


#: Peaks per filter and sign looked at (the strongest), at most.
PEAKS = 2 * MAX_REGIONS


def _pixel_skew_bound(noise: tuple[np.ndarray, CameraParams] | None) -> float:
    """The largest skewness (:func:`skew_map`) any pixel of this frame has: as a function of
    the variance ``v`` it peaks at ``v = 3 floor`` (``floor``: read and quantization
    variance), so it is taken there, or at the frame's variance range's nearer end."""
    if noise is None:
        return 0.0
    var, camera = noise
    g = float(camera.gain_adu_per_electron)
    floor = g * g * float(camera.read_noise_electrons) ** 2 + 1 / 12
    v = min(max(3 * floor, float(var.min())), float(var.max()))
    return g * max(v - floor, 0.0) / v**1.5


def _negative_candidate(u: float, f: _Filter, pixel_skew: float) -> float:
    """The smallest ``|z|`` of a negative peak of filter ``f`` whose skew-corrected
    significance (:func:`_regions`) can pass ``u``: shot noise's skew makes the lower tail
    lighter, so the corrected ``|z| + g (z**2 - 1) / 6`` is larger than ``|z|``. ``g`` is at
    most the frame's largest pixel skewness (:func:`_pixel_skew_bound`) over ``d`` for the
    binning, times the binomial's ``sum w**3 / (sum w**2)**1.5``. Below it no peak is looked
    at, so an honest frame costs the filters and their extremes, nothing more."""
    w = [math.comb(f.order, j) for j in range(f.order + 1)]
    shape = sum(c**3 for c in w) ** 2 / math.comb(2 * f.order, f.order) ** 3
    a = pixel_skew / f.d * shape / 6
    return (math.sqrt(1 + 4 * a * (u + a)) - 1) / (2 * a) if a > 0 else u


def skew_map(var: np.ndarray, camera: CameraParams) -> np.ndarray:
    """Each pixel's standardized third cumulant (skewness) of its ADU under the noise model:
    shot noise's ``gain**3 * electrons``, read noise and quantization add none, over
    ``var**1.5`` (:func:`adu_variance`'s variance)."""
    g = float(camera.gain_adu_per_electron)
    floor = g * g * float(camera.read_noise_electrons) ** 2 + 1 / 12
    v = np.asarray(var, np.float32)
    return (g * np.maximum(v - np.float32(floor), 0) / (v * np.sqrt(v))).astype(np.float32)


def _skewness(noise: tuple[np.ndarray, CameraParams], f: _Filter, y: int, x: int) -> float:
    """The skewness of filter ``f``'s output at valid binned position (y, x): the binomial's
    weights cubed against the pixels' skewness (a d x d block mean of unit-variance pixels has
    skewness ``mean / d``), over its squared weights to the power 1.5."""
    n, d = f.order + 1, f.d
    var, camera = noise
    win = var[y * d : (y + n) * d, x * d : (x + n) * d]
    if win.shape != (n * d, n * d):
        return 0.0
    c = skew_map(win, camera).reshape(n, d, n, d).mean(axis=(1, 3)) / d
    w1 = np.array([math.comb(f.order, j) for j in range(n)], np.float64)
    w = np.outer(w1, w1)
    return float((w**3 * c).sum() / (w**2).sum() ** 1.5)


#: Above this many pixels past the threshold a filter's regions are its excursion set's
#: connected components (``ndimage.label``: a pass over the whole frame); below, its peaks
#: (:func:`_peaks`: only those pixels).
LABEL_FROM = 4096


def _peaks(idx: np.ndarray, val: np.ndarray, width: int, radius: float) -> np.ndarray:
    """Indices into ``idx`` (flat positions in rows of ``width``) of the strongest ``val``
    each, greedily: the strongest pixel, then the strongest farther than ``radius`` from every
    one kept, at most :data:`PEAKS`. A smooth field's excursion is a blob about the filter's
    size, so this keeps one peak per blob, as its connected component would."""
    order = np.argsort(-val)
    ys, xs = np.divmod(idx[order], width)
    alive = np.ones(order.size, bool)
    kept: list[int] = []
    for i in range(order.size):
        if not alive[i]:
            continue
        kept.append(int(order[i]))
        if len(kept) >= PEAKS:
            break
        alive &= (ys - ys[i]) ** 2 + (xs - xs[i]) ** 2 > radius * radius
    return np.asarray(kept, dtype=np.intp)


def _normal_equivalent(x: float, g: float) -> float:
    """The standard normal value as far out in its tail as ``x`` is in the tail of a
    distribution of skewness ``g`` (Cornish-Fisher, first order: ``x = z + g (z**2 - 1) / 6``).
    Above the mean the expansion is solved for ``z`` (monotone in ``x``; the linearised
    ``x - g (x**2 - 1) / 6`` turns back down past ``x = 3 / g``, so a strong excess of signal
    would look weak); below it the linearised form, which the false-alarm rate was measured
    with."""
    a = g / 6
    if x <= 0 or a <= 1e-9:
        return x - a * (x * x - 1)
    return (math.sqrt(1 + 4 * a * (x + a)) - 1) / (2 * a)


def _regions(
    z: np.ndarray,
    u: float,
    f: _Filter,
    row: int = 0,
    noise: tuple[np.ndarray, CameraParams] | None = None,
    candidate: float | None = None,
) -> list[Region]:
    """The regions of one filter's significance (valid output rows from ``row`` on), each at
    its peak, negative ones looked at from ``-candidate`` (default ``u``,
    :func:`_negative_candidate`). With ``noise`` (the raw grid's variance and the camera,
    :func:`skew_map`) the peak's significance is Cornish-Fisher corrected for the filtered
    noise's skewness ``g``, ``z - g (z**2 - 1) / 6``, and kept only if still past ``u``.
    (Shifting the threshold instead, ``g (u**2 - 1) / 6``, left 11-22% false alarms at 1.5
    photons per pixel; this form measured 1%, at the price of some power for excess signal.)"""
    found = []
    shift = f.order // 2  # valid output i is centred on binned pixel i + order/2
    for sign in (1, -1):
        mask = z > u if sign > 0 else z < -(u if candidate is None else candidate)
        if not mask.any():
            continue
        signed = z if sign > 0 else -z
        idx = np.flatnonzero(mask)  # few pixels: each peak from them alone
        val = signed.ravel()[idx]
        if idx.size > LABEL_FROM:  # a large excursion: the peaks of its connected components
            lab = ndimage.label(mask)[0].ravel()[idx]
            order = np.lexsort((-val, lab))  # by label, strongest first within each
            first = order[np.r_[True, lab[order][1:] != lab[order][:-1]]]
            first = first[np.argsort(-val[first])][:PEAKS]  # the strongest components
        else:
            first = _peaks(idx, val, z.shape[1], max(2, f.order))
        for y, x in zip(*np.unravel_index(idx[first], z.shape), strict=True):
            value = float(z[y, x])
            if noise is not None:
                value = _normal_equivalent(value, _skewness(noise, f, y + row, x))
            if abs(value) <= u:
                continue
            cy, cx = ((i + shift + 0.5) * f.d - 0.5 for i in (y + row, x))  # on the raw grid
            found.append(Region(float(cy), float(cx), f.scale, abs(value), sign))
    return found


#: Raw pixels per side of a cell of the published significance map.
MAP_BIN = 8


class _MapPool:
    """Pools filter outputs into a coarse map: per cell of ``bin`` raw px, the signed value of
    largest magnitude any filter had at the positions centred in that cell (0 where no filter
    was evaluated over the whole cell: within about two scales of the edge)."""

    def __init__(self, shape: tuple[int, int], bin: int) -> None:
        if bin < 1:
            raise ValueError(f"map_bin must be >= 1, got {bin}")
        self.bin = bin
        self.map = np.zeros((max(shape[0] // bin, 1), max(shape[1] // bin, 1)), np.float32)

    def add(self, z: np.ndarray, f: _Filter, row: int) -> None:
        """Pool one filter's valid outputs from valid row ``row`` on (:func:`_strips`)."""
        top, left = row + f.order // 2, f.order // 2  # the binned px z[0, 0] is centred on
        if f.d < self.bin:  # k x k binned px per cell: reduce whole cells, rows first
            k = self.bin // f.d
            r0, c0 = -top % k, -left % k  # z's first row and column on a cell boundary
            y0, x0 = (top + r0) // k, (left + c0) // k
            rows = min((z.shape[0] - r0) // k, self.map.shape[0] - y0)
            cols = min((z.shape[1] - c0) // k, self.map.shape[1] - x0)
            if rows <= 0 or cols <= 0:
                return
            whole = z[r0 : r0 + rows * k, c0 : c0 + cols * k].reshape(rows, k, cols * k)
            hi, lo = (
                _column_blocks(whole.max(axis=1), k, np.maximum),
                _column_blocks(whole.min(axis=1), k, np.minimum),
            )
            cell = np.where(hi >= -lo, hi, lo)
        else:  # one binned px covers k x k cells
            k = f.d // self.bin
            y0, x0 = top * k, left * k
            cell = np.repeat(np.repeat(z, k, axis=0), k, axis=1)
            rows, cols = (
                min(cell.shape[0], self.map.shape[0] - y0),
                min(cell.shape[1], self.map.shape[1] - x0),
            )
            if rows <= 0 or cols <= 0:
                return
            cell = cell[:rows, :cols]
        target = self.map[y0 : y0 + rows, x0 : x0 + cols]
        np.copyto(target, cell, where=np.abs(cell) > np.abs(target))


def _column_blocks(a: np.ndarray, k: int, op: np.ufunc) -> np.ndarray:
    """``op`` (maximum or minimum) over each run of ``k`` columns of ``a``, by strided slices
    (a reduction over a short last axis is several times slower)."""
    out = a[:, 0::k].copy()
    for j in range(1, k):
        op(out, a[:, j::k], out=out)
    return out


def scan(
    raw: np.ndarray,
    pred: np.ndarray,
    var: np.ndarray,
    *,
    sigmas: Sequence[float],
    false_alarm: float = FALSE_ALARM,
    max_regions: int = MAX_REGIONS,
    camera: CameraParams | None = None,
) -> Scan:
    """Localized excess or missing signal in ``raw`` against its prediction ``pred`` (ADU, the
    raw grid) of variance ``var``: a matched-filter scan whose threshold is set from the noise
    model for a per-frame false-alarm rate (:func:`scan_residual` on the signed residual
    ``(raw - pred) / sqrt(var)``). ``camera``: correct each peak for shot noise's skew
    (:func:`skew_map`): needed at a few photons per pixel, where the upper tail is heavy."""
    r = np.asarray(raw, np.float32) - np.asarray(pred, np.float32)
    r /= np.sqrt(np.asarray(var, np.float32))
    noise = None if camera is None else (np.asarray(var, np.float32), camera)
    return scan_residual(r, sigmas=sigmas, false_alarm=false_alarm, max_regions=max_regions,
                         noise=noise)  # fmt: skip


def scan_residual(
    r: np.ndarray,
    *,
    sigmas: Sequence[float],
    false_alarm: float = FALSE_ALARM,
    max_regions: int = MAX_REGIONS,
    noise: tuple[np.ndarray, CameraParams] | None = None,
    map_bin: int | None = None,
) -> Scan:
    """The scan of a signed, whitened residual ``r`` (unit variance, independent pixels when
    the prediction is right).

    ``r`` is filtered at each of ``sigmas`` (raw px) with a Gaussian-like kernel (a binomial,
    on the residual binned by a power of two for the larger scales, :func:`_plan`) and divided
    by the filter's null standard deviation (``sqrt(sum k**2)``), so each scale's significance
    ``z`` is a standard normal at every position of an honest frame, and for an object of
    about that size its matched filter's SNR. Only positions where the whole kernel lies in
    the frame are scanned (an object within about two scales of the edge is seen by the
    smaller filters only). The threshold (:func:`scan_threshold`) makes the expected number of
    null regions over all positions, scales and both signs ``false_alarm``. Regions: the
    connected components of ``|z|`` above it, per scale and sign, at their peak; a weaker
    region of the same sign within twice the larger scale of a stronger one is the same object
    at another scale and is dropped. ``map_bin``: also pool every scale's signed significance
    into a map of ``map_bin``-pixel cells (:class:`_MapPool`), for viewers."""
    r = np.asarray(r, np.float32)
    sigmas = tuple(float(s) for s in sigmas)
    u = scan_threshold(r.shape, sigmas, float(false_alarm))
    filters = [_plan(s) for s in sigmas]
    skew = _pixel_skew_bound(noise)
    levels = {1: r}
    found: list[Region] = []
    best = 0.0
    pooled = None if map_bin is None else _MapPool(r.shape, map_bin)
    for f in filters:
        while f.d not in levels:
            d = max(levels)
            levels[2 * d] = _binned(levels[d])
        level = levels[f.d]
        if min(level.shape) <= f.order:
            continue
        candidate = _negative_candidate(u, f, skew)
        for row, z in _strips(level, f):
            hi, lo = float(z.max()), float(z.min())
            best = max(best, hi, -lo)
            if hi > u or lo < -candidate:
                found.extend(_regions(z, u, f, row, noise, candidate))
            if pooled is not None:
                pooled.add(z, f, row)
    found.sort(key=lambda g: -g.z)
    kept: list[Region] = []
    for g in found:
        if len(kept) >= max_regions:
            break
        if not any(
            k.sign == g.sign and math.hypot(k.y - g.y, k.x - g.x) <= 2 * max(k.scale_px, g.scale_px)
            for k in kept
        ):
            kept.append(g)
    scales = tuple(f.scale for f in filters)
    return Scan(tuple(kept), u, best, scales, None if pooled is None else pooled.map)
