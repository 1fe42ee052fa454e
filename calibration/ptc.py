"""Camera noise from the photon transfer curve (Janesick, "Photon Transfer", SPIE 2007; EMVA 1288).

Dark frames give the offset map and the read noise; flat series at several light levels give the
temporal variance against the mean signal, whose slope is the gain in ADU per electron. Steady,
uniform light in the darks looks exactly like offset plus read noise; it is caught only when it
drifts, carries the flats' illumination pattern, or breaks the PTC intercept check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from .camera import CameraParams
from .errors import CalibrationError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MIN_FRAMES = 2
RECOMMENDED_FRAMES = 8
MIN_LEVELS = 3
MAX_CLIPPED_FRACTION = 1e-3
HOT_SIGMAS = 8.0
DEAD_RESPONSE = 0.5
DEAD_NEIGHBOURHOOD = 7
QUANTIZATION_VARIANCE = 1.0 / 12.0
MIN_R2 = 0.95
MAX_GAIN_REL_SE = 0.05
MIN_FULL_SCALE_ELECTRONS = 100.0
MAX_FULL_SCALE_ELECTRONS = 1e7
MAD_TO_SIGMA = 1.4826
LIGHT_LEAK_SIGMAS = 6.0
LIGHT_LEAK_MIN_ADU = 1.0
DRIFT_SIGMAS = 6.0
DRIFT_MIN_ADU = 0.5
INTERCEPT_SIGMAS = 5.0
INTERCEPT_REL_TOL = 0.1
EXCESS_DARK_VARIANCE = 1.2

_DARK_FIX = "close the shutter / cover the objective (and darken the room), then repeat the darks"


@dataclass
class CameraCalibration:
    """One camera measured by `fit_camera`; maps are per pixel, (H, W).

    `camera.quantum_efficiency` is 1.0: QE cannot be measured without a calibrated light source, so
    gain and read noise refer to electrons and photons_from_adu returns detected photo-electrons.
    """

    camera: CameraParams  # offset = median of offset_map; gain; read noise (e-); bit depth
    offset_map: np.ndarray  # float32: per-pixel mean dark level, ADU
    read_noise_map: np.ndarray  # float32: per-pixel temporal dark std, ADU
    flat_field: np.ndarray  # float32: relative response (PRNU x illumination), mean 1
    hot_pixels: np.ndarray  # bool: dark level or dark noise far above the typical pixel
    dead_pixels: np.ndarray  # bool: response below half that of the pixel's neighbourhood
    ptc: dict[str, list[float]]  # per level and fit results: what plot_ptc shows


@dataclass(frozen=True)
class _Fit:
    slope: float
    intercept: float
    slope_se: float
    intercept_se: float
    r2: float


def fit_camera(
    dark: np.ndarray,
    flats: Sequence[np.ndarray],
    *,
    bit_depth: int,
    exposures_ms: Sequence[float] | None = None,
) -> CameraCalibration:
    """Fit offset, gain, read noise, flat field and defects from dark and flat series (N, H, W).

    `flats` holds one stack per light level, dimmest first (at least 3 levels, uniform field).
    Raises CalibrationError, saying what to change, when the data cannot give a trustworthy fit.
    """
    max_adu = _check_bit_depth(bit_depth)
    _check_exposures(exposures_ms, len(flats))
    dark = _check_stack("dark series", dark)
    stacks = [_check_stack(_label(i, exposures_ms), f) for i, f in enumerate(flats)]
    _check_levels_and_shapes(dark, stacks)
    _check_clipping("the dark series", dark, max_adu, dark=True)
    for i, stack in enumerate(stacks):
        _check_clipping(_label(i, exposures_ms), stack, max_adu, dark=False)

    offset_map = _mean_map(dark)
    read_map = _std_map(dark, offset_map)
    hot = _hot_pixels(offset_map, read_map, len(dark))
    level_maps = [_mean_map(s) - offset_map for s in stacks]
    flat_field, dead = _flat_field(level_maps[-1], _label(len(stacks) - 1, exposures_ms))
    good = ~(hot | dead)

    signals = np.array([float(m[good].mean()) for m in level_maps])
    variances = np.array([_pair_variance(s, good) for s in stacks])
    frames = np.array([len(s) for s in stacks], dtype=np.float64)
    dofs = good.sum() * (frames - 1)
    _check_levels_increase(signals, np.sqrt(variances / (good.sum() * frames)), exposures_ms)

    dark_var = _pair_variance(dark, good)
    dark_dof = float(good.sum() * (len(dark) - 1))
    _check_darks_steady(dark, good, dark_var)
    _check_darks_unlit(offset_map, level_maps[-1] - level_maps[0], good)

    fit = _fit_ptc(signals, variances, dofs)
    _check_fit(fit, max_adu)
    _check_intercept(fit, dark_var, dark_dof)

    read_adu = math.sqrt(max(dark_var - QUANTIZATION_VARIANCE, 0.0))
    camera = CameraParams(
        offset_adu=float(np.median(offset_map)),
        gain_adu_per_electron=fit.slope,
        read_noise_electrons=read_adu / fit.slope,
        quantum_efficiency=1.0,
        bit_depth=bit_depth,
    )
    return CameraCalibration(
        camera=camera,
        offset_map=offset_map.astype(np.float32),
        read_noise_map=read_map.astype(np.float32),
        flat_field=flat_field,
        hot_pixels=hot,
        dead_pixels=dead,
        ptc=_ptc_record(exposures_ms, signals, variances, dofs, dark_var, fit),
    )


def _ptc_record(
    exposures_ms: Sequence[float] | None,
    signals: np.ndarray,
    variances: np.ndarray,
    dofs: np.ndarray,
    dark_var: float,
    fit: _Fit,
) -> dict[str, list[float]]:
    """The PTC points and fit as plain lists (exposure_ms is NaN when no exposures were given)."""
    exposures = (
        [math.nan] * len(signals) if exposures_ms is None else list(map(float, exposures_ms))
    )
    return {
        "exposure_ms": exposures,
        "mean_signal_adu": signals.tolist(),
        "variance_adu": variances.tolist(),
        "variance_se_adu": (variances * np.sqrt(2.0 / dofs)).tolist(),
        "dark_variance_adu": [dark_var],
        "fit_slope": [fit.slope],
        "fit_slope_se": [fit.slope_se],
        "fit_intercept": [fit.intercept],
        "fit_intercept_se": [fit.intercept_se],
        "fit_r2": [fit.r2],
    }


# ---- input checks -------------------------------------------------------------------------


def _label(index: int, exposures_ms: Sequence[float] | None) -> str:
    """How a flat level is named in messages."""
    if exposures_ms is not None and index < len(exposures_ms):
        return f"flat level {index} ({exposures_ms[index]:g} ms)"
    return f"flat level {index}"


def _check_bit_depth(bit_depth: int) -> int:
    """ADC maximum for a plausible bit depth."""
    if isinstance(bit_depth, bool) or not isinstance(bit_depth, int) or not 1 <= bit_depth <= 16:
        raise CalibrationError(
            f"bit_depth must be an integer 1..16, got {bit_depth!r}; "
            "pass the camera's ADC bit depth."
        )
    return 2**bit_depth - 1


def _check_stack(name: str, frames: np.ndarray) -> np.ndarray:
    """A real (N, H, W) stack of finite values with enough frames."""
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.shape[1] < 2 or frames.shape[2] < 2:
        raise CalibrationError(
            f"{name} has shape {frames.shape}; pass a stack of frames shaped (N, H, W)."
        )
    if not (np.issubdtype(frames.dtype, np.integer) or np.issubdtype(frames.dtype, np.floating)):
        raise CalibrationError(f"{name} has dtype {frames.dtype}; pass raw camera values (ADU).")
    if len(frames) < MIN_FRAMES:
        raise CalibrationError(
            f"{name} has {len(frames)} frame(s); temporal noise needs at least {MIN_FRAMES}: "
            f"acquire at least {RECOMMENDED_FRAMES} frames."
        )
    if np.issubdtype(frames.dtype, np.floating) and not np.isfinite(frames).all():
        raise CalibrationError(f"{name} contains NaN or inf; pass the raw camera frames.")
    return frames


def _check_exposures(exposures_ms: Sequence[float] | None, levels: int) -> None:
    """One finite, non-negative exposure per flat level, or None."""
    if exposures_ms is None:
        return
    try:
        values = np.asarray(exposures_ms, dtype=np.float64)
    except (TypeError, ValueError):
        values = np.array([np.nan])
    if values.shape != (levels,) or not np.isfinite(values).all() or (values < 0).any():
        raise CalibrationError(
            f"exposures_ms {exposures_ms!r} must hold one finite value >= 0 per flat level "
            f"({levels} levels); pass one exposure per flat stack, or None."
        )


def _check_levels_and_shapes(dark: np.ndarray, stacks: list[np.ndarray]) -> None:
    """Enough levels and one frame shape for all series."""
    if len(stacks) < MIN_LEVELS:
        raise CalibrationError(
            f"got {len(stacks)} flat level(s); the photon transfer curve needs at least "
            f"{MIN_LEVELS}: acquire flats at 5 or more exposures (or light levels) up to about "
            "half the ADC range."
        )
    shapes = {s.shape[1:] for s in stacks} | {dark.shape[1:]}
    if len(shapes) != 1:
        raise CalibrationError(
            f"frames differ in shape: {sorted(shapes)}; "
            "acquire all series with the same ROI/binning."
        )


def _check_clipping(name: str, stack: np.ndarray, max_adu: int, *, dark: bool) -> None:
    """Frames that hit the ADC limits give biased means and variances."""
    top = float(stack.max())
    if top > max_adu:
        raise CalibrationError(
            f"{name} has values up to {top:g}, above the {max_adu} maximum of a "
            f"{max_adu.bit_length()}-bit ADC; pass the camera's real bit_depth."
        )
    n = stack.size
    at_max = np.count_nonzero(stack >= max_adu) / n
    at_zero = np.count_nonzero(stack <= 0) / n
    if at_max > MAX_CLIPPED_FRACTION:
        fix = _DARK_FIX if dark else "lower the exposure or the light for this level"
        raise CalibrationError(
            f"{name} is saturated: {100 * at_max:.2f}% of pixel values are at the ADC maximum "
            f"{max_adu} (allowed {100 * MAX_CLIPPED_FRACTION:.1f}%); {fix}."
        )
    if at_zero > MAX_CLIPPED_FRACTION:
        raise CalibrationError(
            f"{name} clips at zero: {100 * at_zero:.2f}% of pixel values are 0 "
            f"(allowed {100 * MAX_CLIPPED_FRACTION:.1f}%); the camera offset (bias) is too low: "
            "raise the camera's offset setting so dark frames sit well above 0."
        )


# ---- per-pixel maps -----------------------------------------------------------------------


def _mean_map(stack: np.ndarray) -> np.ndarray:
    """Temporal mean per pixel, float64."""
    # a (H, W) array for the (N, H, W) stacks _check_stack admits; numpy types it "scalar or array"
    return np.asarray(np.mean(stack, axis=0, dtype=np.float64))


def _std_map(
    stack: np.ndarray, mean: np.ndarray, frame_levels: np.ndarray | None = None
) -> np.ndarray:
    """Temporal standard deviation per pixel (ddof=1), float64, one frame at a time.

    `frame_levels`, when given, is subtracted from each frame first (`mean` must then match).
    """
    levels = np.zeros(len(stack)) if frame_levels is None else frame_levels
    acc = np.zeros(mean.shape, np.float64)
    for frame, level in zip(stack, levels, strict=True):
        acc += np.square(frame - (mean + level))
    return np.sqrt(acc / (len(stack) - 1))


def _mad_sigma(values: np.ndarray) -> float:
    """Robust standard deviation: 1.4826 x median absolute deviation."""
    return MAD_TO_SIGMA * float(np.median(np.abs(values - np.median(values))))


def _hot_pixels(offset_map: np.ndarray, read_map: np.ndarray, n_frames: int) -> np.ndarray:
    """Pixels whose dark level or dark noise is far above the typical pixel."""
    typical_read = float(np.median(read_map))
    offset_sigma = max(_mad_sigma(offset_map), typical_read / math.sqrt(n_frames), 1e-6)
    read_sigma = max(_mad_sigma(read_map), typical_read / math.sqrt(2 * (n_frames - 1)), 1e-6)
    bright = offset_map > np.median(offset_map) + HOT_SIGMAS * offset_sigma
    noisy = read_map > typical_read + HOT_SIGMAS * read_sigma
    return bright | noisy


def _flat_field(signal_map: np.ndarray, level: str) -> tuple[np.ndarray, np.ndarray]:
    """Relative response (float32, mean 1) from the brightest level, and dead pixels.

    A pixel is dead below half the response of its neighbourhood (so vignetting is not a defect).
    """
    mean = float(signal_map.mean())
    if not mean > 0:
        raise CalibrationError(
            f"the brightest {level} is {mean:.3g} ADU above the darks: no light reached the "
            "camera; open the shutter, turn on the light, or check the darks were taken dark."
        )
    flat = signal_map / mean
    local = ndimage.median_filter(flat, size=DEAD_NEIGHBOURHOOD, mode="nearest")
    dead = flat < DEAD_RESPONSE * local
    return flat.astype(np.float32), dead


def _pair_variance(stack: np.ndarray, mask: np.ndarray) -> float:
    """Temporal variance from consecutive frame differences, mean of var(f_i - f_j) / 2 (EMVA 1288).

    Fixed-pattern noise cancels in each difference; np.var removes a global level change.
    """
    values = [
        float(np.var(stack[i][mask].astype(np.float64) - stack[i + 1][mask])) / 2.0
        for i in range(len(stack) - 1)
    ]
    return float(np.mean(values))


# ---- consistency checks -------------------------------------------------------------------


def _check_levels_increase(
    signals: np.ndarray, se: np.ndarray, exposures_ms: Sequence[float] | None
) -> None:
    """Every level must carry light, more than the level before (`se`: noise of each mean)."""
    for i, s in enumerate(signals):
        if s < -5 * se[i]:
            raise CalibrationError(
                f"{_label(i, exposures_ms)} is {-s:.3g} ADU darker than the dark series: the darks "
                f"contain light; {_DARK_FIX}."
            )
        if s <= 5 * se[i]:
            raise CalibrationError(
                f"{_label(i, exposures_ms)} is only {s:.3g} ADU above the darks: no usable light; "
                "turn on the light or raise the exposure (and check the darks were dark)."
            )
    for i in range(1, len(signals)):
        if signals[i] - signals[i - 1] <= 5 * math.hypot(se[i], se[i - 1]):
            raise CalibrationError(
                f"flat levels do not increase: {_label(i, exposures_ms)} has mean signal "
                f"{signals[i]:.4g} ADU after {signals[i - 1]:.4g} ADU at "
                f"{_label(i - 1, exposures_ms)}; pass the flats dimmest first, each with a longer "
                "exposure or more light than the one before, and keep the light steady."
            )


def _check_darks_steady(dark: np.ndarray, good: np.ndarray, dark_var: float) -> None:
    """Dark frames must not drift or change pattern over the series (light leaking, flickering)."""
    means = np.array([float(f[good].mean()) for f in dark])
    drift = float(np.std(means, ddof=1))
    expected = math.sqrt(dark_var / good.sum())
    if drift > max(DRIFT_SIGMAS * expected, DRIFT_MIN_ADU):
        raise CalibrationError(
            f"the dark series is not steady: frame means vary by {drift:.3g} ADU (std over "
            f"{len(dark)} frames, range {means.min():.1f}..{means.max():.1f}) where read noise "
            f"alone gives {expected:.2g} ADU; light is reaching the sensor: {_DARK_FIX}."
        )
    levels = means - means.mean()
    per_pixel = float(np.mean(np.square(_std_map(dark, _mean_map(dark), levels)[good])))
    if per_pixel > EXCESS_DARK_VARIANCE * dark_var:
        raise CalibrationError(
            f"the dark series changes over time: per-pixel temporal variance {per_pixel:.3g} ADU^2 "
            f"exceeds the {dark_var:.3g} ADU^2 that frame-to-frame differences give; {_DARK_FIX}."
        )


def _check_darks_unlit(offset_map: np.ndarray, pattern: np.ndarray, good: np.ndarray) -> None:
    """The dark map must not carry the flats' illumination/response pattern (light in the darks)."""
    p = pattern[good]
    dev_p = p / p.mean() - 1.0
    dev_o = offset_map[good] - np.median(offset_map[good])
    dev_o = dev_o - dev_o.mean()
    norm = float(np.dot(dev_p, dev_p))
    if norm <= 0:
        return
    light = float(np.dot(dev_o, dev_p)) / norm
    se = float(np.std(dev_o - light * dev_p)) / math.sqrt(norm)
    if light > max(LIGHT_LEAK_SIGMAS * se, LIGHT_LEAK_MIN_ADU):
        raise CalibrationError(
            f"the dark frames contain light: the dark map follows the flats' illumination pattern "
            f"with about {light:.3g} ± {se:.2g} ADU of signal; {_DARK_FIX}."
        )


# ---- the fit ------------------------------------------------------------------------------


def _fit_ptc(signals: np.ndarray, variances: np.ndarray, dofs: np.ndarray) -> _Fit:
    """Weighted least squares of variance = gain * signal + intercept (intercept free).

    Weights are 1 / var(variance estimate) = dof / (2 variance^2); the covariance is scaled up by
    the reduced chi-square when the points scatter more than their noise.
    """
    weights = dofs / (2.0 * np.square(variances))
    design = np.column_stack([signals, np.ones_like(signals)])
    normal = design.T @ (weights[:, None] * design)
    slope, intercept = np.linalg.solve(normal, design.T @ (weights * variances))
    residuals = variances - (slope * signals + intercept)
    chi2 = float(np.sum(weights * residuals**2))
    cov = np.linalg.inv(normal) * max(1.0, chi2 / max(len(signals) - 2, 1))
    mean_w = float(np.sum(weights * variances) / np.sum(weights))
    total = float(np.sum(weights * (variances - mean_w) ** 2))
    r2 = 1.0 - chi2 / total if total > 0 else 0.0
    return _Fit(
        slope=float(slope),
        intercept=float(intercept),
        slope_se=math.sqrt(cov[0, 0]),
        intercept_se=math.sqrt(cov[1, 1]),
        r2=r2,
    )


def _check_fit(fit: _Fit, max_adu: int) -> None:
    """A positive, plausible, well-determined gain on a straight PTC."""
    if not fit.slope > 0:
        raise CalibrationError(
            f"the temporal variance does not grow with the signal (PTC slope {fit.slope:.3g} "
            "ADU/e-, a negative or zero gain): the flats are not raw frames of a steady field; "
            "turn off camera-side denoising/averaging and keep the light source steady."
        )
    full_scale = max_adu / fit.slope
    if not MIN_FULL_SCALE_ELECTRONS <= full_scale <= MAX_FULL_SCALE_ELECTRONS:
        raise CalibrationError(
            f"the fitted gain {fit.slope:.3g} ADU/e- is implausible (a full ADC range of "
            f"{full_scale:.3g} electrons); check that the flats are raw, unscaled camera frames "
            "and that bit_depth is right."
        )
    if fit.slope_se > MAX_GAIN_REL_SE * fit.slope:
        raise CalibrationError(
            f"the gain {fit.slope:.3g} ± {fit.slope_se:.2g} ADU/e- is poorly determined "
            f"(more than {100 * MAX_GAIN_REL_SE:.0f}%); spread the flat levels up to about half "
            "the ADC range and acquire more frames per level."
        )
    if fit.r2 < MIN_R2:
        raise CalibrationError(
            f"the photon transfer curve is not a straight line (weighted r^2 = {fit.r2:.3f}); "
            "keep every level below saturation, keep the light steady and the field uniform."
        )


def _check_intercept(fit: _Fit, dark_var: float, dark_dof: float) -> None:
    """The PTC at zero signal must give the darks' temporal variance, else the darks are suspect."""
    dark_se = dark_var * math.sqrt(2.0 / dark_dof)
    tol = INTERCEPT_SIGMAS * math.hypot(fit.intercept_se, dark_se) + INTERCEPT_REL_TOL * dark_var
    if abs(fit.intercept - dark_var) > tol:
        raise CalibrationError(
            f"the PTC extrapolated to zero signal gives variance {fit.intercept:.3g} ± "
            f"{fit.intercept_se:.2g} ADU^2 but the dark frames have {dark_var:.3g} ADU^2 "
            f"(tolerance {tol:.2g}): the darks were not taken dark or not with the flats' camera "
            f"settings; take them with the same gain/readout/exposure and {_DARK_FIX}."
        )


# ---- plot ---------------------------------------------------------------------------------


def plot_ptc(cal: CameraCalibration, path: Path) -> Path:
    """Write a PNG: PTC points and fit (log-log), fit residuals, offset map and its histogram."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plot_ptc needs matplotlib: pip install matplotlib") from exc

    path = Path(path)
    fig = Figure(figsize=(11, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    _plot_curve(axes[0, 0], cal)
    _plot_residuals(axes[0, 1], cal)
    _plot_offset(fig, axes[1, 0], axes[1, 1], cal)
    fig.savefig(path, format="png", dpi=100)
    return path


def _plot_curve(ax: Axes, cal: CameraCalibration) -> None:
    """PTC points, the fitted line and the dark variance, log-log."""
    ptc = cal.ptc
    signal = np.asarray(ptc["mean_signal_adu"])
    slope, intercept = ptc["fit_slope"][0], ptc["fit_intercept"][0]
    xs = np.geomspace(signal.min() / 3, signal.max() * 1.5, 200)
    ax.errorbar(signal, ptc["variance_adu"], yerr=ptc["variance_se_adu"], fmt="o", label="flats")
    ax.plot(xs, slope * xs + intercept, "-", label=f"fit: gain {slope:.3g} ADU/e-")
    ax.axhline(ptc["dark_variance_adu"][0], ls=":", c="gray", label="dark variance")
    ax.set(xscale="log", yscale="log", xlabel="mean signal above offset (ADU)")
    ax.set(ylabel="temporal variance (ADU²)", title=f"photon transfer, r² = {ptc['fit_r2'][0]:.5f}")
    ax.legend(fontsize=8)


def _plot_residuals(ax: Axes, cal: CameraCalibration) -> None:
    """Relative residuals of the PTC fit with their one-sigma bars."""
    ptc = cal.ptc
    signal = np.asarray(ptc["mean_signal_adu"])
    model = ptc["fit_slope"][0] * signal + ptc["fit_intercept"][0]
    rel = 100 * (np.asarray(ptc["variance_adu"]) - model) / model
    err = 100 * np.asarray(ptc["variance_se_adu"]) / model
    ax.errorbar(signal, rel, yerr=err, fmt="o")
    ax.axhline(0, c="gray", lw=1)
    ax.set(xscale="log", xlabel="mean signal above offset (ADU)", ylabel="residual (%)")
    ax.set(title="fit residuals")


def _plot_offset(fig: Figure, ax_img: Axes, ax_hist: Axes, cal: CameraCalibration) -> None:
    """Offset map with defects marked, and its histogram."""
    offset = cal.offset_map
    lo, hi = np.percentile(offset, [0.5, 99.5])
    image = ax_img.imshow(offset, cmap="gray", vmin=lo, vmax=hi)
    fig.colorbar(image, ax=ax_img, label="ADU")
    for mask, colour, name in ((cal.hot_pixels, "r", "hot"), (cal.dead_pixels, "c", "dead")):
        ys, xs = np.nonzero(mask)
        label = f"{name} {len(xs)}"
        ax_img.scatter(xs, ys, s=12, facecolors="none", edgecolors=colour, label=label)
    ax_img.set(title=f"offset map (median {cal.camera.offset_adu:.1f} ADU)")
    ax_img.legend(fontsize=8, loc="upper right")
    ax_hist.hist(offset.ravel(), bins=100, log=True)
    ax_hist.set(xlabel="offset (ADU)", ylabel="pixels", title="offset histogram")
