"""PSF width from images of sub-resolution beads: in focus (Gaussian or Airy) and through focus.

Beads are found as local maxima above a robust noise threshold, kept when isolated, inside the
image and unsaturated, and fitted one by one with a pixel-integrated model plus a constant
background (least squares, sub-pixel centre); the median over beads is the result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, optimize, spatial, special
from skimage.feature import peak_local_max

from .errors import CalibrationError
from .optics import OpticsParams

_SIGMA_LAMBDA_NA = 0.21  # psf_sigma_um = 0.21 λ/NA (calibration.optics)
_AIRY_Z1 = 3.8317059702075125  # first zero of J1: r0 = z1 / (2π) · λ/NA
_AIRY_HALF = 1.6163399483106482  # (2 J1(v) / v)^2 = 1/2
# Airy first-zero radius r0 -> the Gaussian sigma calibration.optics gives the same λ/NA:
# r0 = (z1 / 2π) λ/NA = 0.6098 λ/NA and sigma = 0.21 λ/NA, so sigma = 0.3444 r0.
AIRY_SIGMA_PER_R0 = _SIGMA_LAMBDA_NA * 2 * math.pi / _AIRY_Z1
AIRY_FWHM_PER_R0 = 2 * _AIRY_HALF / _AIRY_Z1
GAUSS_FWHM_PER_SIGMA = 2 * math.sqrt(2 * math.log(2))

_DETECT_SMOOTH_PX = 1.0  # Gaussian pre-filter for detection (a matched-filter stand-in)
_DETECT_NSIGMA = 5.0  # detection threshold in robust noise units
_NEIGHBOUR_FRACTION = 0.05  # a neighbour dimmer than this (an Airy ring) does not spoil a fit
_SUBSAMPLE = 5  # Airy model: sub-pixels per pixel along each axis
_MIN_PLANES = 5


@dataclass(frozen=True, eq=False)
class PsfFit:
    """In-focus PSF width measured from beads; `sigma_*` is the Gaussian-equivalent sigma.

    For the Airy model sigma = 0.3444 r0 (`AIRY_SIGMA_PER_R0`), r0 being the fitted first-zero
    radius, so that `optics()` returns the NA of that Airy pattern.
    """

    model: str
    sigma_px: float
    sigma_um: float
    fwhm_um: float
    n_beads: int
    sigmas_px: np.ndarray

    def optics(self, wavelength_nm: float, refractive_index: float = 1.0) -> OpticsParams:
        """The NA giving this width in calibration.optics (0.21 λ/NA), clipped below the index."""
        na = _SIGMA_LAMBDA_NA * wavelength_nm * 1e-3 / self.sigma_um
        na = min(na, math.nextafter(refractive_index, 0.0))
        return OpticsParams(
            na=na,
            wavelength_nm=wavelength_nm,
            refractive_index=refractive_index,
            psf=self.model,
        )


@dataclass(frozen=True, eq=False)
class DefocusFit:
    """Width through focus fitted with sigma(z) = sqrt(s0^2 + (k (z - z0))^2), as in optics.

    `slope` is k (µm of sigma per µm of defocus); compare with `defocus_sigma_um(optics, 1.0)`.
    Planes whose beads could not be fitted hold NaN in `sigma_um`.
    """

    focus_z_um: float
    sigma_um: np.ndarray
    z_um: np.ndarray
    slope: float
    sigma0_um: float


@dataclass(frozen=True)
class _Detections:
    background: float
    noise: float
    yx: np.ndarray  # (n, 2) integer peak positions
    height: np.ndarray  # smoothed peak height above background


# ---- public API -----------------------------------------------------------------------------


def fit_psf(
    image: np.ndarray,
    *,
    pixel_size_um: float,
    model: str = "gaussian",
    background: float | None = None,
    min_beads: int = 5,
    saturation: float | None = None,
) -> PsfFit:
    """Fit isolated beads with a pixel-integrated Gaussian or Airy spot and take the median width.

    `background` fixes the constant under the beads (else fitted per bead); `saturation` is the
    level counted as clipped (default: the integer dtype's maximum).
    """
    image, pixel_size_um = _check_image(image), _check_pixel(pixel_size_um)
    if model not in ("gaussian", "airy"):
        raise ValueError(f"model must be 'gaussian' or 'airy', got {model!r}.")
    if saturation is None:
        raw = np.asarray(image)
        saturation = float(np.iinfo(raw.dtype).max) if raw.dtype.kind in "ui" else math.inf
    data = np.asarray(image, dtype=np.float64)
    found = _detect(data, background)
    sigma0 = _estimate_sigma(data, found, background)
    half = _window_half(sigma0, model)
    keep, counts = _select(data, found, sigma0, half, saturation)
    widths = np.array(
        [_fit_bead(data, yx, half, sigma0, model, background) for yx in found.yx[keep]]
    )
    widths = _reject_outliers(widths[np.isfinite(widths)])
    if widths.size < min_beads:
        raise CalibrationError(_too_few_message(counts, widths.size, min_beads, sigma0))
    sigma_px = float(np.median(widths))
    fwhm_px = sigma_px * (
        AIRY_FWHM_PER_R0 / AIRY_SIGMA_PER_R0 if model == "airy" else GAUSS_FWHM_PER_SIGMA
    )
    return PsfFit(
        model=model,
        sigma_px=sigma_px,
        sigma_um=sigma_px * pixel_size_um,
        fwhm_um=fwhm_px * pixel_size_um,
        n_beads=int(widths.size),
        sigmas_px=widths,
    )


def fit_defocus(
    stack: np.ndarray,
    z_um: Sequence[float] | np.ndarray,
    *,
    pixel_size_um: float,
    min_beads: int = 5,
) -> DefocusFit:
    """Gaussian bead width per plane (`fit_psf`), then a least-squares fit of the hyperbola in z."""
    stack = np.asarray(stack)
    z = np.asarray(z_um, dtype=np.float64)
    if stack.ndim != 3 or z.shape != (stack.shape[0],):
        raise ValueError(
            f"stack must be (planes, rows, cols) with one z per plane; got stack shape "
            f"{stack.shape} and {z.size} z values."
        )
    if not np.isfinite(z).all() or np.unique(z).size != z.size:
        raise ValueError(f"z_um must be finite and distinct, got {z.tolist()}.")
    if z.size < _MIN_PLANES:
        raise CalibrationError(
            f"a z-series of {z.size} planes cannot locate focus; acquire at least {_MIN_PLANES} "
            "planes spanning the focus."
        )
    order = np.argsort(z)
    z, stack = z[order], stack[order]
    sigma = np.full(z.size, np.nan)
    failures: list[str] = []
    for i, plane in enumerate(stack):
        try:
            sigma[i] = fit_psf(plane, pixel_size_um=pixel_size_um, min_beads=min_beads).sigma_um
        except CalibrationError as err:
            failures.append(str(err))
    ok = np.isfinite(sigma)
    if ok.sum() < _MIN_PLANES:
        raise CalibrationError(_too_few_planes(z, ok, failures))
    s0, k, z0 = _fit_hyperbola(z[ok], sigma[ok])
    if not z[0] <= z0 <= z[-1]:
        raise CalibrationError(
            f"the fitted focus z={z0:.3g} µm lies outside the scanned range "
            f"[{z[0]:g}, {z[-1]:g}] µm; centre the z-series on the sharpest plane."
        )
    return DefocusFit(focus_z_um=z0, sigma_um=sigma, z_um=z, slope=k, sigma0_um=s0)


def defocus_range_um(
    sigma_um: float, na: float, refractive_index: float = 1.0, widen: float = 2.5
) -> float:
    """The +- z range over which an in-focus Gaussian width `sigma_um` grows `widen` times under
    calibration.optics' defocus model (blur sigma = |dz| tan(asin(NA/n)) / 2): a z-series over
    it keeps beads narrow enough to fit while the width still changes well beyond the noise."""
    if not (math.isfinite(sigma_um) and sigma_um > 0 and na > 0 and refractive_index > 0):
        raise ValueError(
            f"need a positive PSF width, NA and index, got {sigma_um}, {na}, {refractive_index}."
        )
    tan = math.tan(math.asin(min(na / refractive_index, 0.999)))
    return 2.0 * math.sqrt(widen**2 - 1.0) * sigma_um / tan


def _too_few_planes(z: np.ndarray, ok: np.ndarray, failures: list[str]) -> str:
    """A short reason for a z-series with too few fitted planes: which planes failed, the
    first failure's reason, and what to change."""
    bad = ", ".join(f"{v:g}" for v in z[~ok])
    if len(bad) > 80:
        bad = f"{z[~ok].size} planes from {z[~ok].min():g} to {z[~ok].max():g}"
    first = failures[0].split(":")[0] if failures else "no beads"
    crowded = sum("too dense" in f for f in failures)
    advice = (
        "out of focus the beads blur into each other: scan a narrower z range around focus, or "
        "image a sparser bead field"
        if crowded >= len(failures) / 2
        else "check that the beads are in the field and the z range spans the focus"
    )
    return (
        f"only {int(ok.sum())} of {z.size} planes gave a bead width, need {_MIN_PLANES}; "
        f"failed at z = {bad} µm ({first}): {advice}."
    )


# ---- detection and selection ----------------------------------------------------------------


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2 or min(image.shape) < 8:
        raise ValueError(f"expected a 2-D bead image of at least 8x8 pixels, got {image.shape}.")
    if not np.isfinite(image).all():
        raise ValueError("the bead image contains NaN or inf; pass the recorded frame as is.")
    return image


def _check_pixel(pixel_size_um: float) -> float:
    if not (math.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise ValueError(f"pixel_size_um must be a finite positive number, got {pixel_size_um}.")
    return float(pixel_size_um)


def _robust_std(values: np.ndarray) -> float:
    """Standard deviation from the median absolute deviation (Gaussian consistency 1.4826)."""
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


def _pixel_noise(image: np.ndarray) -> float:
    """Pixel noise sigma from the finest diagonal Haar detail (Donoho & Johnstone 1994).

    A PSF sampled at about 1 px sigma or wider barely reaches that band, so crowded beads do not
    inflate the estimate the way a plain MAD of the image would.
    """
    a = image[: image.shape[0] // 2 * 2, : image.shape[1] // 2 * 2]
    detail = (a[0::2, 0::2] - a[0::2, 1::2] - a[1::2, 0::2] + a[1::2, 1::2]) / 2
    return 1.4826 * float(np.median(np.abs(detail)))


def _detect(image: np.ndarray, background: float | None) -> _Detections:
    """Local maxima of the smoothed image more than 5 noise sigmas above the background."""
    bg = float(np.median(image)) if background is None else float(background)
    smooth = ndimage.gaussian_filter(image - bg, _DETECT_SMOOTH_PX)
    # White noise after a unit-sum Gaussian of sigma s keeps 1 / (2 sqrt(pi) s) of its sigma.
    noise = _pixel_noise(image) / (2 * math.sqrt(math.pi) * _DETECT_SMOOTH_PX)
    threshold = max(_DETECT_NSIGMA * noise, 1e-3 * float(smooth.max()), 1e-12)
    yx = peak_local_max(smooth, min_distance=1, threshold_abs=threshold, exclude_border=False)
    height = smooth[yx[:, 0], yx[:, 1]] if yx.size else np.empty(0)
    order = np.argsort(height)[::-1]
    return _Detections(bg, noise, yx[order].reshape(-1, 2), height[order])


def _estimate_sigma(image: np.ndarray, found: _Detections, background: float | None) -> float:
    """Gaussian sigma (px) of the brightest few spots: half-maximum area, then two refits."""
    smooth = ndimage.gaussian_filter(image - found.background, _DETECT_SMOOTH_PX)
    estimates = []
    for (y, x), h in zip(found.yx[:7], found.height[:7], strict=False):
        labels, _ = ndimage.label(smooth > 0.5 * h)
        area = float((labels == labels[y, x]).sum())
        sigma = math.sqrt(max(area / math.pi / (2 * math.log(2)) - _DETECT_SMOOTH_PX**2, 0.25))
        for _ in range(2):
            half = _window_half(sigma, "gaussian")
            if not _inside(image.shape, (y, x), half):
                break
            sigma = _fit_bead(image, (y, x), half, sigma, "gaussian", background)
            if not math.isfinite(sigma):
                break
        if math.isfinite(sigma):
            estimates.append(sigma)
    return float(np.median(estimates)) if estimates else 1.0


def _window_half(sigma_px: float, model: str) -> int:
    """Fit-window half width: 3 sigma (Gaussian) or twice the first-zero radius (Airy, ring 1)."""
    if model == "airy":
        return max(3, math.ceil(2.0 * sigma_px / AIRY_SIGMA_PER_R0))
    return max(3, math.ceil(3.0 * sigma_px) + 1)


def _inside(shape: tuple[int, ...], yx: Sequence[int], half: int) -> bool:
    y, x = yx
    return half <= y < shape[0] - half and half <= x < shape[1] - half


def _select(
    image: np.ndarray, found: _Detections, sigma_px: float, half: int, saturation: float
) -> tuple[np.ndarray, dict[str, float]]:
    """Beads with no neighbour within window + 3 sigma, a window inside the image, no clipping."""
    n = len(found.yx)
    radius = half + 3.0 * sigma_px
    crowded = np.zeros(n, dtype=bool)
    pairs = spatial.cKDTree(found.yx).query_pairs(radius, output_type="ndarray") if n else None
    if pairs is not None and len(pairs):
        i, j = pairs[:, 0], pairs[:, 1]
        crowded[i[found.height[j] > _NEIGHBOUR_FRACTION * found.height[i]]] = True
        crowded[j[found.height[i] > _NEIGHBOUR_FRACTION * found.height[j]]] = True
    edge = np.array([not _inside(image.shape, yx, half) for yx in found.yx], dtype=bool)
    saturated = np.array(
        [
            not e and image[y - half : y + half + 1, x - half : x + half + 1].max() >= saturation
            for (y, x), e in zip(found.yx, edge, strict=True)
        ],
        dtype=bool,
    )
    keep = ~crowded & ~edge & ~saturated
    counts = {
        "detected": n,
        "crowded": int(crowded.sum()),
        "edge": int(edge.sum()),
        "saturated": int(saturated.sum()),
        "radius": radius,
        "noise": found.noise,
        "area": float(image.size),
    }
    return np.flatnonzero(keep), counts


def _too_few_message(
    counts: dict[str, float], n_fitted: int, min_beads: int, sigma_px: float
) -> str:
    n = int(counts["detected"])
    head = (
        f"only {n_fitted} beads could be fitted, need min_beads={min_beads}: {n} spots detected "
        f"above noise ({counts['noise']:.3g}), {int(counts['crowded'])} with a neighbour closer "
        f"than {counts['radius']:.1f} px, {int(counts['edge'])} at the edge, "
        f"{int(counts['saturated'])} saturated (PSF sigma about {sigma_px:.2f} px)"
    )
    footprint = math.pi * counts["radius"] ** 2
    if counts["crowded"] >= max(min_beads, 0.5 * n) or n * footprint > counts["area"]:
        return head + "; beads too dense to fit: dilute the beads or image a sparser field."
    if (
        counts["saturated"] > 0
        and 2 * counts["saturated"] >= n - counts["crowded"] - counts["edge"]
    ):
        return head + "; beads are clipped: shorten the exposure or lower the excitation."
    return head + (
        "; too few bright isolated beads: image another field with more beads, use a longer "
        "exposure or brighter beads."
    )


# ---- per-bead models ------------------------------------------------------------------------


def _gauss_1d(centres: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    """Fraction of a unit 1-D Gaussian falling in each unit pixel (pixel-integrated sampling)."""
    scale = 1.0 / (math.sqrt(2.0) * sigma)
    return 0.5 * (
        special.erf((centres + 0.5 - mu) * scale) - special.erf((centres - 0.5 - mu) * scale)
    )


def _gauss_model(p: np.ndarray, coords: np.ndarray, bg: float | None) -> np.ndarray:
    amp, y0, x0, sigma = p[:4]
    b = p[4] if bg is None else bg
    return amp * np.outer(_gauss_1d(coords, y0, sigma), _gauss_1d(coords, x0, sigma)) + b


def _airy_model(p: np.ndarray, coords: np.ndarray, bg: float | None) -> np.ndarray:
    """Peak-normalized Airy pattern (2 J1(v)/v)^2, v = z1 r / r0, averaged over 5x5 sub-pixels."""
    amp, y0, x0, r0 = p[:4]
    b = p[4] if bg is None else bg
    sub = (np.arange(_SUBSAMPLE) + 0.5) / _SUBSAMPLE - 0.5
    fine = (coords[:, None] + sub[None, :]).ravel()
    v = np.hypot(fine[:, None] - y0, fine[None, :] - x0) * (_AIRY_Z1 / r0)
    v = np.maximum(v, 1e-9)
    pattern = (2.0 * special.j1(v) / v) ** 2
    n = coords.size
    return amp * pattern.reshape(n, _SUBSAMPLE, n, _SUBSAMPLE).mean(axis=(1, 3)) + b


def _fit_bead(
    image: np.ndarray,
    yx: Sequence[int],
    half: int,
    sigma_px: float,
    model: str,
    background: float | None,
) -> float:
    """Least-squares fit of one bead window; Gaussian-equivalent sigma in px, NaN if it failed."""
    y, x = int(yx[0]), int(yx[1])
    patch = image[y - half : y + half + 1, x - half : x + half + 1]
    coords = np.arange(-half, half + 1, dtype=np.float64)
    edge = np.concatenate([patch[0], patch[-1], patch[1:-1, 0], patch[1:-1, -1]])
    b0 = float(np.median(edge)) if background is None else float(background)
    signal = patch - b0
    if model == "airy":
        width0, func = sigma_px / AIRY_SIGMA_PER_R0, _airy_model
        amp0 = float(patch[half, half] - b0)
    else:
        width0, func = sigma_px, _gauss_model
        amp0 = float(signal.sum())
    if amp0 <= 0:
        return math.nan
    lo = [0.0, -1.5, -1.5, 0.2 * width0]
    hi = [np.inf, 1.5, 1.5, 5.0 * width0]
    p0 = [amp0, 0.0, 0.0, width0]
    if background is None:
        lo, hi, p0 = [*lo, -np.inf], [*hi, np.inf], [*p0, b0]
    start = np.clip(p0, np.nextafter(lo, np.inf), np.nextafter(hi, -np.inf))
    try:
        fit = optimize.least_squares(
            lambda p: (func(p, coords, background) - patch).ravel(),
            start,
            bounds=(lo, hi),
            x_scale="jac",
        )
    except (ValueError, FloatingPointError):
        return math.nan
    width = float(fit.x[3])
    at_bound = not (1.001 * lo[3] < width < 0.999 * hi[3]) or max(abs(fit.x[1:3])) > 1.49
    if not fit.success or at_bound or fit.x[0] <= 0:
        return math.nan
    return width * AIRY_SIGMA_PER_R0 if model == "airy" else width


def _reject_outliers(widths: np.ndarray) -> np.ndarray:
    """Drop widths more than 3 robust sigmas (at least 5% of the median) off the median."""
    if widths.size < 3:
        return widths
    centre = float(np.median(widths))
    spread = max(_robust_std(widths), 0.05 * centre)
    return widths[np.abs(widths - centre) <= 3.0 * spread]


# ---- through focus --------------------------------------------------------------------------


def _fit_hyperbola(z: np.ndarray, sigma: np.ndarray) -> tuple[float, float, float]:
    """Least-squares (s0, k, z0) of sigma = sqrt(s0^2 + (k (z - z0))^2), as optics.psf_kernel."""
    i = int(np.argmin(sigma))
    s0, z0 = float(sigma[i]), float(z[i])
    far = np.abs(z - z0)
    k0 = float(np.max(np.sqrt(np.maximum(sigma**2 - s0**2, 0)) / np.maximum(far, 1e-9)))
    span = float(z[-1] - z[0])
    fit = optimize.least_squares(
        lambda p: np.hypot(p[0], p[1] * (z - p[2])) - sigma,
        [s0, max(k0, 1e-6), z0],
        bounds=([0.0, 0.0, z[0] - span], [np.inf, np.inf, z[-1] + span]),
        x_scale="jac",
    )
    s0, k, z0 = (float(v) for v in fit.x)
    return s0, k, z0
