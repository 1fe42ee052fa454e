"""Bidirectional (resonant) scan phase: measure and undo the shift of backward vs forward lines.

Convention of `calibration.scan.bidirectional_shift`: odd (backward) rows are shifted right by
`phase_px`; `correct_phase(image, estimate_phase(image))` undoes it.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar

from .errors import CalibrationError

MIN_CORRELATION = 0.1
MAX_PHASE_SE_PX = 0.05
JACKKNIFE_GROUPS = 8
GRID_STEP_PX = 0.05
MIN_WIDTH_PX = 16
SMOOTHING_PX = 1.0
FLAT_ENERGY = 1e-12
RIVAL_RATIO = 0.9


def estimate_phase(images: np.ndarray, *, max_shift_px: float = 4.0) -> float:
    """Sub-pixel shift of the backward (odd) lines against the forward (even) lines, in the sign
    convention of calibration.scan.bidirectional_shift: correct(scan(x, p)) ~ x for
    p = estimate_phase(scan(x, p)).

    `images` is one frame (H, W) or a stack (N, H, W) whose evidence is pooled. Each odd row is
    compared along x with the mean of its two even neighbours (half a line above and below); the
    cross-spectra summed over rows and frames give a band-limited cross-correlation whose peak is
    the phase. Raises CalibrationError when the field cannot give a trustworthy phase.
    """
    stack = _as_stack(images, "images")
    _check_size(stack.shape, max_shift_px)
    width = stack.shape[2]
    spectra, energy = _row_cross_spectra(stack)
    total = spectra.sum(axis=0)
    phase = _peak(total, width, max_shift_px)
    has_x_structure = energy > FLAT_ENERGY * float(np.sum(stack * stack))
    correlation = _correlation(total, width, phase) / energy if has_x_structure else 0.0
    if not correlation >= MIN_CORRELATION:
        raise CalibrationError(
            f"too little structure: forward and backward lines correlate at only "
            f"r = {correlation:.3g} (need {MIN_CORRELATION}); image a field with structure "
            "(beads, a stained sample) with more signal, or average more frames."
        )
    if abs(phase) > max_shift_px - 2 * GRID_STEP_PX:
        raise CalibrationError(
            f"the phase peaks at the search limit ({phase:.2f} px of ±{max_shift_px} px); raise "
            "max_shift_px."
        )
    se = _jackknife_se(spectra, width, max_shift_px)
    if se > MAX_PHASE_SE_PX:
        raise CalibrationError(
            f"the phase {phase:.3f} px is uncertain by ±{se:.2g} px (need ±{MAX_PHASE_SE_PX}); "
            "image a field with structure (beads, a stained sample) with more signal, or average "
            "more frames."
        )
    rival = _rival_peak(total, width, max_shift_px, phase)
    if rival is not None:
        raise CalibrationError(
            f"the phase is ambiguous: the correlation peaks at {phase:.2f} px and almost as "
            f"high at {rival:.2f} px (periodic structure); lower max_shift_px below the period "
            "or image an irregular field."
        )
    return phase


def correct_phase(image: np.ndarray, phase_px: float) -> np.ndarray:
    """Undo a bidirectional phase: shift the odd lines back by phase_px (float32 out)."""
    if not math.isfinite(phase_px):
        raise CalibrationError(f"phase_px must be finite, got {phase_px}; estimate it first.")
    array = np.asarray(image, dtype=np.float32)
    if array.ndim not in (2, 3):
        raise CalibrationError(
            f"correct_phase expects an image (H, W) or a stack (N, H, W), got shape {array.shape}."
        )
    out = array.copy()
    out[..., 1::2, :] = _shift_x(array[..., 1::2, :], -phase_px)
    return out


def _as_stack(images: np.ndarray, name: str) -> np.ndarray:
    """A finite (N, H, W) float64 stack from one frame or a stack."""
    stack = np.asarray(images, dtype=np.float64)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3 or stack.size == 0:
        raise CalibrationError(
            f"{name} has shape {np.shape(images)}; pass one frame (H, W) or a stack (N, H, W)."
        )
    if not np.isfinite(stack).all():
        raise CalibrationError(f"{name} contains NaN or inf; pass raw frames.")
    return stack


def _check_size(shape: tuple[int, ...], max_shift_px: float) -> None:
    """Enough rows and width for the search range."""
    if not (math.isfinite(max_shift_px) and max_shift_px > 0):
        raise CalibrationError(f"max_shift_px must be finite and > 0, got {max_shift_px}.")
    min_width = max(MIN_WIDTH_PX, 4 * max_shift_px)
    if shape[1] < 3 or shape[2] < min_width:
        raise CalibrationError(
            f"frames of shape {shape[1:]} are too small to measure a phase of up to "
            f"{max_shift_px} px; use frames at least 3 rows high and {min_width:g} pixels wide."
        )


def _row_cross_spectra(stack: np.ndarray) -> tuple[np.ndarray, float]:
    """Cross-spectra odd x conj(even-neighbour mean) per row, and sqrt(energy_odd * energy_even).

    Rows have their mean removed and a Hann window along x; zero padding to 2W avoids wrap-around.
    A Gaussian smoothing of the correlation (symmetric, so the peak stays put) damps pixel noise.
    """
    n_odd = (stack.shape[1] - 1) // 2
    odd = stack[:, 1 : 2 * n_odd : 2]
    ref = 0.5 * (stack[:, 0 : 2 * n_odd : 2] + stack[:, 2 : 2 * n_odd + 1 : 2])
    window = np.hanning(stack.shape[2] + 2)[1:-1]
    a = (odd - odd.mean(axis=-1, keepdims=True)) * window
    b = (ref - ref.mean(axis=-1, keepdims=True)) * window
    a = a.reshape(-1, stack.shape[2])
    b = b.reshape(-1, stack.shape[2])
    n = 2 * stack.shape[2]
    freqs = np.arange(n // 2 + 1) / n
    smoothing = np.exp(-2.0 * (np.pi * SMOOTHING_PX * freqs) ** 2)
    spectra = np.fft.rfft(a, n=n) * np.conj(np.fft.rfft(b, n=n)) * smoothing
    return spectra, math.sqrt(float(np.sum(a * a)) * float(np.sum(b * b)))


def _correlation(spectrum: np.ndarray, width: int, shift: float) -> float:
    """Band-limited cross-correlation sum_x a(x) b(x - shift) from the summed cross-spectrum."""
    n = 2 * width
    freqs = np.arange(len(spectrum))
    weights = np.full(len(spectrum), 2.0)
    weights[0] = 1.0
    weights[-1] = 1.0
    phasor = np.exp(2j * np.pi * freqs * shift / n)
    return float(np.sum(weights * (spectrum * phasor).real)) / n


def _peak(spectrum: np.ndarray, width: int, max_shift_px: float) -> float:
    """Shift of the correlation maximum within ±max_shift_px: grid search, then refinement."""
    grid = np.arange(-max_shift_px, max_shift_px + GRID_STEP_PX / 2, GRID_STEP_PX)
    values = [_correlation(spectrum, width, s) for s in grid]
    best = float(grid[int(np.argmax(values))])
    lo, hi = max(best - GRID_STEP_PX, -max_shift_px), min(best + GRID_STEP_PX, max_shift_px)
    result = minimize_scalar(
        lambda s: -_correlation(spectrum, width, s),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(result.x)


def _rival_peak(spectrum: np.ndarray, width: int, max_shift_px: float, best: float) -> float | None:
    """Another local maximum, over 1 px from `best`, nearly as high as the best one; else None."""
    grid = np.arange(-max_shift_px, max_shift_px + GRID_STEP_PX / 2, GRID_STEP_PX)
    values = np.array([_correlation(spectrum, width, s) for s in grid])
    top = _correlation(spectrum, width, best)
    inner = (values[1:-1] > values[:-2]) & (values[1:-1] >= values[2:])
    for i in np.flatnonzero(inner) + 1:
        if abs(grid[i] - best) > 1.0 and values[i] > RIVAL_RATIO * top:
            return float(grid[i])
    return None


def _jackknife_se(spectra: np.ndarray, width: int, max_shift_px: float) -> float:
    """Standard error of the phase from leave-one-group-of-rows-out estimates."""
    groups = min(JACKKNIFE_GROUPS, len(spectra))
    if groups < 2:
        return math.inf
    parts = np.array([g.sum(axis=0) for g in np.array_split(spectra, groups)])
    total = parts.sum(axis=0)
    estimates = np.array([_peak(total - part, width, max_shift_px) for part in parts])
    return math.sqrt((groups - 1) / groups * float(np.sum((estimates - estimates.mean()) ** 2)))


def _shift_x(rows: np.ndarray, shift: float) -> np.ndarray:
    """Shift along the last axis by `shift` px (cubic convolution, Keys a=-0.5; edges repeated)."""
    width = rows.shape[-1]
    src = np.arange(width, dtype=np.float64) - shift
    base = np.floor(src)
    t = src - base
    out = np.zeros(rows.shape, np.float64)
    for k, weight in zip((-1, 0, 1, 2), _keys_weights(t), strict=True):
        index = np.clip(base + k, 0, width - 1).astype(np.intp)
        out += rows[..., index] * weight
    return out.astype(np.float32)


def _keys_weights(t: np.ndarray) -> tuple[np.ndarray, ...]:
    """Keys cubic-convolution weights of the samples at offsets -1, 0, 1, 2 from floor(position)."""
    t2, t3 = t * t, t * t * t
    return (
        -0.5 * t3 + t2 - 0.5 * t,
        1.5 * t3 - 2.5 * t2 + 1.0,
        -1.5 * t3 + 2.0 * t2 + 0.5 * t,
        0.5 * t3 - 0.5 * t2,
    )
