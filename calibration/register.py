"""Align low- and high-quality images of one field from two systems, for paired training data.

Rotation and scale come from the log-polar Fourier magnitude (Reddy & Chatterji 1996), the shift
from masked phase correlation (Padfield 2012), and all four are refined by maximizing normalized
cross-correlation on the overlap.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, optimize
from skimage.filters import difference_of_gaussians, window
from skimage.registration import phase_cross_correlation
from skimage.transform import warp, warp_polar

from .errors import CalibrationError

_MIN_SIDE = 32
_MIN_STRUCTURE = 0.5  # smoothed std over pixel noise; white noise alone gives about 0.14
_POLAR_ROWS = 720  # angle samples over 360 degrees
_UPSAMPLE = 20  # sub-sample factor for the log-polar phase correlation
_REFINE_OVERLAP = 0.25  # the refinement ignores poses covering less of the smaller field
_BAND = (1.0, 8.0)  # difference-of-Gaussians band (px of the compared grid)


@dataclass(frozen=True)
class Similarity:
    """Similarity map from fixed to moving pixel coordinates: p_moving = scale · R · p_fixed + t.

    Points are (x, y) = (column, row) with pixel centres at integers (scikit-image's convention);
    R turns +x towards +y by `rotation_deg` (clockwise on screen, rows pointing down); `scale` is
    moving pixels per fixed pixel (fixed pixel size / moving pixel size); `shift_yx` is t as
    (row, column) in moving pixels; `score` is the normalized cross-correlation after alignment,
    over the overlap, of both images band-passed (difference of Gaussians) at matched sampling.
    """

    rotation_deg: float
    scale: float
    shift_yx: tuple[float, float]
    score: float = math.nan

    def matrix(self) -> np.ndarray:
        """3x3 homogeneous matrix taking fixed (x, y, 1) to moving (x, y, 1)."""
        theta = math.radians(self.rotation_deg)
        c, s = self.scale * math.cos(theta), self.scale * math.sin(theta)
        ty, tx = self.shift_yx
        return np.array([[c, -s, tx], [s, c, ty], [0.0, 0.0, 1.0]])

    def inverse(self) -> Similarity:
        """The same alignment with the roles swapped (moving -> fixed)."""
        return _from_matrix(np.linalg.inv(self.matrix()), self.score)


# ---- public API -----------------------------------------------------------------------------


def register(
    moving: np.ndarray,
    fixed: np.ndarray,
    *,
    scale_hint: float | None = None,
    max_rotation_deg: float = 180.0,
    min_score: float = 0.5,
) -> Similarity:
    """Similarity taking `fixed` pixel coordinates to `moving` ones (see `Similarity`).

    `scale_hint` is the expected `scale` (fixed pixel size / moving pixel size): the finer image is
    low-passed and resampled by it first, so only a residual scale is searched.
    """
    moving, fixed = _check_image("moving", moving), _check_image("fixed", fixed)
    _check_structure("moving", moving)
    _check_structure("fixed", fixed)
    if scale_hint is not None and not (math.isfinite(scale_hint) and scale_hint > 0):
        raise ValueError(f"scale_hint must be a finite positive ratio, got {scale_hint}.")
    if not 0 <= max_rotation_deg <= 180:
        raise ValueError(f"max_rotation_deg must be within [0, 180], got {max_rotation_deg}.")
    hint = 1.0 if scale_hint is None else float(scale_hint)
    mov_r, to_mov_r = _reduce(moving, min(1.0, 1.0 / hint))
    fix_r, to_fix_r = _reduce(fixed, min(1.0, hint))
    mov_n, fix_n = _normalize(mov_r), _normalize(fix_r)
    residual = None if scale_hint is None else to_mov_r[0, 0] * hint / to_fix_r[0, 0]
    angle, log_scale = _rotation_scale(mov_n, fix_n, residual)
    if scale_hint is None and abs(log_scale) > 100 * math.log(1.1):
        # Compare at matched sampling: resample the finer image by the coarse scale and redo.
        return register(
            moving,
            fixed,
            scale_hint=math.exp(log_scale / 100),
            max_rotation_deg=max_rotation_deg,
            min_score=min_score,
        )
    mov_s, fix_s = _band(mov_r), _band(fix_r)
    best = None
    for theta in _candidate_angles(angle, max_rotation_deg):
        pose = _translate(mov_s, fix_s, theta, log_scale)
        ncc = _ncc(mov_s, fix_s, pose)
        if best is None or ncc > best[0]:
            best = (ncc, pose)
    assert best is not None
    pose = _refine(mov_s, fix_s, best[1], max_rotation_deg)
    score = _ncc(mov_s, fix_s, pose)
    if not score >= min_score:
        raise CalibrationError(
            f"registration score (normalized cross-correlation) {score:.3f} is below min_score="
            f"{min_score}: the images share too little structure; image fields that overlap more "
            "or carry more texture, or check scale_hint and max_rotation_deg."
        )
    reduced = _pose_matrix(pose, mov_n.shape, fix_n.shape)
    return _from_matrix(np.linalg.inv(to_mov_r) @ reduced @ to_fix_r, score)


def warp_to(moving: np.ndarray, fixed_shape: tuple[int, int], sim: Similarity) -> np.ndarray:
    """`moving` resampled (cubic, float32) on the fixed pixel grid; NaN where it has no data.

    A moving image finer than the fixed grid (scale > 1) is low-passed first (sigma (scale-1)/2).
    """
    return _warp_matrix(moving, tuple(fixed_shape), sim.matrix(), sim.scale)


def registered_pair(
    moving: np.ndarray,
    fixed: np.ndarray,
    sim: Similarity,
    *,
    min_overlap: float = 0.5,
    upsample: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """(moving on the fixed grid, fixed), cropped to the largest rectangle inside the overlap.

    With `upsample` u > 1 the moving image is resampled on a u-times finer copy of the fixed grid
    (e.g. high-quality targets for a 2x super-resolution model trained on the fixed low images).
    Overlap is the fraction of the smaller field that the other covers.
    """
    moving, fixed = _check_image("moving", moving), np.asarray(fixed)
    if fixed.ndim != 2:
        raise ValueError(f"fixed must be a 2-D image, got shape {fixed.shape}.")
    if not (isinstance(upsample, int) and upsample >= 1):
        raise ValueError(f"upsample must be a positive integer, got {upsample!r}.")
    u = upsample
    fine = (fixed.shape[0] * u, fixed.shape[1] * u)
    fine_to_fixed = _pixel_scale(1.0 / u)
    warped = _warp_matrix(moving, fine, sim.matrix() @ fine_to_fixed, sim.scale / u)
    valid = np.isfinite(warped).reshape(fixed.shape[0], u, fixed.shape[1], u).all(axis=(1, 3))
    overlap = _overlap(moving.shape, fixed.shape, sim)
    if overlap < min_overlap:
        raise CalibrationError(
            f"the images overlap on {overlap:.1%} of the smaller field, below min_overlap="
            f"{min_overlap:.0%}; image fields that overlap more (or check the registration)."
        )
    r0, r1, c0, c1 = _largest_rectangle(valid)
    return warped[r0 * u : r1 * u, c0 * u : c1 * u], fixed[r0:r1, c0:c1].copy()


# ---- geometry helpers -----------------------------------------------------------------------


def _from_matrix(m: np.ndarray, score: float) -> Similarity:
    scale = math.hypot(m[0, 0], m[1, 0])
    rotation = math.degrees(math.atan2(m[1, 0], m[0, 0]))
    return Similarity(rotation, scale, (float(m[1, 2]), float(m[0, 2])), float(score))


def _pixel_scale(a: float) -> np.ndarray:
    """Matrix of resampling by a: pixel edges stay put, so p' = a (p + 0.5) - 0.5."""
    return np.array([[a, 0.0, 0.5 * a - 0.5], [0.0, a, 0.5 * a - 0.5], [0.0, 0.0, 1.0]])


def _pose_matrix(
    pose: np.ndarray, moving_shape: tuple[int, ...], fixed_shape: tuple[int, ...]
) -> np.ndarray:
    """Pose (deg, 100 ln scale, u_y, u_x) about the image centres -> fixed-to-moving matrix."""
    theta, scale = math.radians(pose[0]), math.exp(pose[1] / 100.0)
    c, s = scale * math.cos(theta), scale * math.sin(theta)
    cy_f, cx_f = (np.asarray(fixed_shape) - 1) / 2
    cy_m, cx_m = (np.asarray(moving_shape) - 1) / 2
    tx = cx_m + pose[3] - (c * cx_f - s * cy_f)
    ty = cy_m + pose[2] - (s * cx_f + c * cy_f)
    return np.array([[c, -s, tx], [s, c, ty], [0.0, 0.0, 1.0]])


def _warp_matrix(
    image: np.ndarray, shape: tuple[int, ...], matrix: np.ndarray, scale: float, order: int = 3
) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if scale > 1:
        image = ndimage.gaussian_filter(image, (scale - 1) / 2)
    return warp(
        image, matrix, output_shape=shape, order=order, cval=np.nan, clip=False, preserve_range=True
    ).astype(np.float32, copy=False)


def _overlap(moving_shape: tuple[int, ...], fixed_shape: tuple[int, ...], sim: Similarity) -> float:
    """Fraction of the smaller field (area on the fixed grid) that the other one covers."""
    inside = warp(np.ones(moving_shape), sim.matrix(), output_shape=fixed_shape, order=0, cval=0.0)
    footprint = float(np.prod(moving_shape)) / sim.scale**2
    return float(inside.sum()) / min(float(np.prod(fixed_shape)), footprint)


def _largest_rectangle(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Largest all-True axis-aligned rectangle (rows r0:r1, cols c0:c1), by row histograms."""
    best, box = 0, (0, 0, 0, 0)
    heights = np.zeros(mask.shape[1] + 1, dtype=np.int64)
    for row in range(mask.shape[0]):
        heights[:-1] = np.where(mask[row], heights[:-1] + 1, 0)
        stack: list[int] = []
        for col, h in enumerate(heights):
            while stack and heights[stack[-1]] >= h:
                top = stack.pop()
                left = stack[-1] + 1 if stack else 0
                area = int(heights[top]) * (col - left)
                if area > best:
                    best, box = area, (row - int(heights[top]) + 1, row + 1, left, col)
            stack.append(col)
    if best == 0:
        raise CalibrationError(
            "the registered images share no pixel; image fields that overlap more."
        )
    return box


# ---- image preparation ----------------------------------------------------------------------


def _check_image(name: str, image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2 or min(image.shape) < _MIN_SIDE:
        raise CalibrationError(
            f"{name} must be a 2-D image of at least {_MIN_SIDE}x{_MIN_SIDE} pixels, "
            f"got shape {image.shape}."
        )
    if image.dtype.kind not in "biuf":
        raise CalibrationError(f"{name} must hold real numbers, got dtype {image.dtype}.")
    if not np.isfinite(image).all():
        raise CalibrationError(
            f"{name} contains NaN or inf; register the recorded frames themselves."
        )
    return image


def _check_structure(name: str, image: np.ndarray) -> None:
    """Texture above noise: 2-px-smoothed std against the Haar-detail noise (Donoho 1994).

    Decided here, before any scikit-image call, so a featureless image (blank, constant, pure
    noise) is always this CalibrationError, whatever scikit-image does with one (0.26 raises its
    own ValueError inside phase_cross_correlation). A smoothed std within rounding of the
    image's magnitude counts as none: a constant image smooths to 1e-17, not always 0."""
    data = image.astype(np.float64)
    a = data[: data.shape[0] // 2 * 2, : data.shape[1] // 2 * 2]
    detail = (a[0::2, 0::2] - a[0::2, 1::2] - a[1::2, 0::2] + a[1::2, 1::2]) / 2
    noise = 1.4826 * float(np.median(np.abs(detail)))
    structure = float(ndimage.gaussian_filter(data, 2.0).std())
    rounding = 1e-9 * max(float(np.abs(data).max()), np.finfo(np.float64).tiny)
    if not structure > rounding or structure < _MIN_STRUCTURE * noise:
        shown = 0.0 if structure <= rounding else structure
        raise CalibrationError(
            f"{name} has too little structure to register: smoothed std {shown:.3g} vs pixel "
            f"noise {noise:.3g} (need a ratio of at least {_MIN_STRUCTURE}); image a textured "
            "field or average more frames."
        )


def _reduce(image: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased resampling by `factor` <= 1; returns the image and original->reduced matrix."""
    image = np.asarray(image, dtype=np.float64)
    to_reduced = _pixel_scale(factor)
    if factor >= 0.999:
        return image, np.eye(3)
    smooth = ndimage.gaussian_filter(image, (1.0 / factor - 1.0) / 2.0)
    shape = tuple(max(_MIN_SIDE, int(n * factor)) for n in image.shape)
    reduced = warp(smooth, np.linalg.inv(to_reduced), output_shape=shape, order=1, mode="edge")
    return reduced, to_reduced


def _normalize(image: np.ndarray) -> np.ndarray:
    std = float(image.std())
    if not (math.isfinite(std) and std > 0):  # _check_structure keeps these out; never NaN
        raise CalibrationError(
            "an image has no contrast left after resampling: image a textured field."
        )
    return (image - image.mean()) / std


def _band(image: np.ndarray) -> np.ndarray:
    """Difference of Gaussians (1 and 8 px): drops noise and shading that would fake a match."""
    return _normalize(difference_of_gaussians(image, _BAND[0], _BAND[1]))


# ---- the three stages -----------------------------------------------------------------------


def _log_polar_magnitude(image: np.ndarray, size: int) -> np.ndarray:
    """Log-polar resampled Fourier magnitude of the band-passed, Hann-windowed image (half turn)."""
    band = difference_of_gaussians(image, *_BAND) * window("hann", image.shape)
    magnitude = np.fft.fftshift(np.abs(np.fft.fft2(band, s=(size, size))))
    polar = warp_polar(
        magnitude,
        center=(size // 2, size // 2),
        radius=size // 2,
        output_shape=(_POLAR_ROWS, size),
        scaling="log",
        order=1,
    )
    return polar[: _POLAR_ROWS // 2]


def _rotation_scale(
    moving: np.ndarray, fixed: np.ndarray, hint: float | None
) -> tuple[float, float]:
    """Rotation (deg, modulo 180) and 100 ln(scale) from the log-polar spectra (Reddy-Chatterji)."""
    size = 2 * math.ceil(max(*moving.shape, *fixed.shape) / 2)
    lp_fixed = _log_polar_magnitude(fixed, size)
    lp_moving = _log_polar_magnitude(moving, size)
    shift = _phase_correlation(lp_moving, lp_fixed, upsample_factor=_UPSAMPLE, normalization=None)
    angle = float(shift[0]) * 360.0 / _POLAR_ROWS
    # Moving features are `scale` times larger, so its spectrum is 1/scale times narrower.
    log_scale = -float(shift[1]) * math.log(size // 2) / size
    if hint is not None and abs(log_scale - math.log(hint)) > math.log(1.5):
        log_scale = math.log(hint)  # a far-off peak is noise; the refinement starts at the hint
    return angle, 100.0 * log_scale


def _phase_correlation(reference: np.ndarray, moving: np.ndarray, **options) -> np.ndarray:
    """scikit-image's phase correlation; its own errors (versions differ in what they refuse)
    become a CalibrationError, so callers see one typed error whatever is installed."""
    try:
        return np.asarray(phase_cross_correlation(reference, moving, **options)[0])
    except ValueError as e:
        raise CalibrationError(
            f"phase correlation failed ({e}); the images share too little structure: image "
            "a textured field."
        ) from e


def _candidate_angles(angle: float, max_rotation_deg: float) -> list[float]:
    """The spectrum fixes rotation modulo 180 degrees: both turns, limited to the allowed range."""
    wrapped = [((a + 180.0) % 360.0) - 180.0 for a in (angle, angle + 180.0)]
    allowed = [a for a in wrapped if abs(a) <= max_rotation_deg + 5.0]
    return allowed or [float(np.clip(wrapped[0], -max_rotation_deg, max_rotation_deg))]


def _translate(moving: np.ndarray, fixed: np.ndarray, angle: float, log_scale: float) -> np.ndarray:
    """Shift by masked normalized cross-correlation of the de-rotated, de-scaled moving image."""
    pose = np.array([angle, log_scale, 0.0, 0.0])
    warped = _warp_matrix(
        moving, fixed.shape, _pose_matrix(pose, moving.shape, fixed.shape), 1.0, order=1
    )
    valid = np.isfinite(warped)
    if valid.sum() < 0.1 * fixed.size:
        return pose
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # masked mode has no RMS error to report
        shift = _phase_correlation(
            fixed,
            np.where(valid, warped, 0.0),
            reference_mask=np.ones(fixed.shape, dtype=bool),
            moving_mask=valid,
            overlap_ratio=_REFINE_OVERLAP,
        )
    # fixed(p) = warped(p - d): the moving point for fixed p is the one warped puts at p - d.
    m = _pose_matrix(pose, moving.shape, fixed.shape)
    dy, dx = float(shift[0]), float(shift[1])
    uy_ux = m[:2, :2] @ np.array([-dx, -dy])
    return np.array([angle, log_scale, uy_ux[1], uy_ux[0]])


def _ncc(moving: np.ndarray, fixed: np.ndarray, pose: np.ndarray) -> float:
    """Normalized cross-correlation on the overlap; -1 when the overlap is too small."""
    matrix = _pose_matrix(pose, moving.shape, fixed.shape)
    warped = _warp_matrix(moving, fixed.shape, matrix, 1.0, order=1)
    valid = np.isfinite(warped)
    smaller = min(fixed.size, moving.size / math.exp(pose[1] / 50.0))
    if valid.sum() < _REFINE_OVERLAP * smaller:
        return -1.0
    a, b = warped[valid].astype(np.float64), fixed[valid]
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else -1.0


def _refine(
    moving: np.ndarray, fixed: np.ndarray, pose: np.ndarray, max_rotation_deg: float
) -> np.ndarray:
    """Powell search of (deg, 100 ln scale, u_y, u_x) maximizing the overlap's NCC."""
    start = pose.copy()
    start[0] = np.clip(start[0], -max_rotation_deg, max_rotation_deg)

    def cost(p: np.ndarray) -> float:
        excess = abs(p[0]) - max_rotation_deg  # a penalty, not bounds: bounded Powell stalls
        if max_rotation_deg < 180 and excess > 0:
            return 1.0 + excess
        return -_ncc(moving, fixed, p)

    result = optimize.minimize(
        cost, start, method="Powell", options={"xtol": 5e-3, "ftol": 1e-8, "maxfev": 4000}
    )
    return result.x if result.fun <= cost(start) else start
