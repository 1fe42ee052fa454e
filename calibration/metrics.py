"""Image-quality and resolution metrics for bench, training validation and engine reports.

Every function takes numpy arrays, computes in float64 and returns plain floats (or the frozen
`Decorrelation` record); scikit-image is used wherever it has the metric.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
"""Per-scale exponents fitted by Wang, Simoncelli & Bovik (2003), finest scale first."""

_SSIM_SIGMA = 1.5
_SSIM_TRUNCATE = 3.5
_SSIM_WINDOW = 2 * int(_SSIM_TRUNCATE * _SSIM_SIGMA + 0.5) + 1  # 11 px, as scikit-image sizes it
_SSIM_K1, _SSIM_K2 = 0.01, 0.03
_NRMSE_NORMALIZATIONS = ("euclidean", "min-max", "mean")
_DECORR_APODIZE_PX = 20
_DECORR_MIN_SIDE = 32
_DECORR_MIN_AMPLITUDE = 0.05
_DECORR_PEAK_MARGIN = 0.001


# ---- input checks -------------------------------------------------------------------------


def _image(array: object, name: str) -> np.ndarray:
    """A finite 2-D float64 copy of `array`; raises ValueError naming `name` otherwise."""
    image = np.asarray(array, dtype=np.float64)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(
            f"{name} must be a non-empty 2-D image, got shape {image.shape}; "
            "pass one plane at a time (index stacks as stack[t])."
        )
    _check_finite(image, name)
    return image


def _check_finite(image: np.ndarray, name: str) -> None:
    bad = int(np.count_nonzero(~np.isfinite(image)))
    if bad:
        raise ValueError(
            f"{name} has {bad} non-finite pixel(s) (NaN or inf); replace or mask them first."
        )


def _pair(reference: object, image: object) -> tuple[np.ndarray, np.ndarray]:
    """Both images as checked float64 arrays of one shape."""
    ref, img = _image(reference, "reference"), _image(image, "image")
    if ref.shape != img.shape:
        raise ValueError(
            f"reference and image shapes differ: {ref.shape} vs {img.shape}; "
            "crop or resample one onto the other's grid first."
        )
    return ref, img


def _data_range(reference: np.ndarray, data_range: float | None) -> float:
    """`data_range` if given, else the reference's max - min; must be finite and positive."""
    value = float(np.ptp(reference)) if data_range is None else float(data_range)
    if not (math.isfinite(value) and value > 0):
        hint = (
            "the reference is constant, so pass data_range (the dtype's or the truth's range)"
            if data_range is None
            else "pass a finite positive range"
        )
        raise ValueError(f"data_range must be finite and > 0, got {value}; {hint}.")
    return value


def _check_min_side(image: np.ndarray, minimum: int, what: str) -> None:
    if min(image.shape) < minimum:
        raise ValueError(
            f"image is {image.shape[0]}x{image.shape[1]} px but {what} needs at least "
            f"{minimum} px per side; use a larger image."
        )


# ---- paired fidelity metrics ----------------------------------------------------------------


def psnr(reference: np.ndarray, image: np.ndarray, *, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB (scikit-image); inf for identical images.

    data_range defaults to the reference's max - min: pass the dtype's or the truth's range
    when numbers from different images must be comparable.
    """
    ref, img = _pair(reference, image)
    value_range = _data_range(ref, data_range)
    if np.array_equal(ref, img):
        return math.inf
    return float(peak_signal_noise_ratio(ref, img, data_range=value_range))


def ssim(reference: np.ndarray, image: np.ndarray, *, data_range: float | None = None) -> float:
    """Mean structural similarity with the settings of Wang et al., IEEE TIP 13, 600 (2004).

    Gaussian 11x11 window (sigma 1.5), population covariance, K1 = 0.01, K2 = 0.03, via
    scikit-image; data_range as in `psnr`.
    """
    ref, img = _pair(reference, image)
    value_range = _data_range(ref, data_range)
    _check_min_side(ref, _SSIM_WINDOW, f"SSIM's {_SSIM_WINDOW}x{_SSIM_WINDOW} Gaussian window")
    return float(
        structural_similarity(
            ref,
            img,
            data_range=value_range,
            gaussian_weights=True,
            sigma=_SSIM_SIGMA,
            use_sample_covariance=False,
        )
    )


def _ssim_terms(x: np.ndarray, y: np.ndarray, data_range: float) -> tuple[float, float]:
    """Mean contrast-structure and mean full SSIM over the valid window positions.

    Same filtering, constants and border crop as scikit-image's `structural_similarity`, which
    does not expose the contrast-structure term that MS-SSIM needs.
    """

    def blur(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a, _SSIM_SIGMA, truncate=_SSIM_TRUNCATE, mode="reflect")

    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    ux, uy = blur(x), blur(y)
    vx = blur(x * x) - ux * ux
    vy = blur(y * y) - uy * uy
    vxy = blur(x * y) - ux * uy
    cs = (2 * vxy + c2) / (vx + vy + c2)
    luminance = (2 * ux * uy + c1) / (ux * ux + uy * uy + c1)
    pad = (_SSIM_WINDOW - 1) // 2
    inner = (slice(pad, -pad), slice(pad, -pad))
    return float(cs[inner].mean()), float((luminance * cs)[inner].mean())


def _halve(image: np.ndarray) -> np.ndarray:
    """2x2 block average (odd trailing row/column dropped): MS-SSIM's low-pass and downsample."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    return image[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))


def _check_weights(weights: Sequence[float]) -> np.ndarray:
    array = np.asarray(weights, dtype=np.float64)
    if array.ndim != 1 or array.size == 0 or not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(
            f"weights must be a non-empty sequence of finite non-negative exponents, one per "
            f"scale, got {weights!r}; the default is {MS_SSIM_WEIGHTS}."
        )
    return array


def ms_ssim(
    reference: np.ndarray,
    image: np.ndarray,
    *,
    data_range: float | None = None,
    weights: Sequence[float] = MS_SSIM_WEIGHTS,
) -> float:
    """Multi-scale SSIM of Wang, Simoncelli & Bovik, Asilomar 2003, in [0, 1].

    One scale per weight: contrast-structure at each finer scale, full SSIM (with luminance) at
    the coarsest, 2x2 averaging between scales; negative terms are clipped to 0. Pass fewer
    weights for fewer scales on small images.
    """
    ref, img = _pair(reference, image)
    value_range = _data_range(ref, data_range)
    exponents = _check_weights(weights)
    scales = exponents.size
    minimum = _SSIM_WINDOW * 2 ** (scales - 1)
    _check_min_side(
        ref,
        minimum,
        f"MS-SSIM with {scales} scales ({_SSIM_WINDOW} px window after {scales - 1} halvings; "
        "pass fewer weights for fewer scales)",
    )
    terms = []
    for scale in range(scales):
        cs, full = _ssim_terms(ref, img, value_range)
        terms.append(full if scale == scales - 1 else cs)
        ref, img = _halve(ref), _halve(img)
    clipped = np.clip(np.asarray(terms), 0.0, None)
    return float(np.prod(clipped**exponents))


def nrmse(reference: np.ndarray, image: np.ndarray, *, normalization: str = "euclidean") -> float:
    """Normalized root-mean-square error (scikit-image): 'euclidean', 'min-max' or 'mean'."""
    ref, img = _pair(reference, image)
    if normalization not in _NRMSE_NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {_NRMSE_NORMALIZATIONS}, got {normalization!r}."
        )
    denominators = {
        "euclidean": math.sqrt(float(np.mean(ref * ref))),
        "min-max": float(np.ptp(ref)),
        "mean": float(np.mean(ref)),
    }
    if denominators[normalization] == 0:
        raise ValueError(
            f"nrmse with normalization={normalization!r} divides by 0 for this reference "
            f"(all zero, constant or zero-mean); choose another normalization."
        )
    return float(normalized_root_mse(ref, img, normalization=normalization))


# ---- information ----------------------------------------------------------------------------


def _check_bins(bins: int) -> None:
    if not (isinstance(bins, (int, np.integer)) and bins >= 2):
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}.")


def _bits(probabilities: np.ndarray) -> float:
    """Shannon entropy in bits of a probability array (zeros ignored)."""
    p = probabilities[probabilities > 0]
    return float(-(p * np.log2(p)).sum())


def entropy(image: np.ndarray, *, bins: int = 256) -> float:
    """Shannon entropy in bits of the intensity histogram (`bins` over the image's min..max).

    Binned, unlike skimage.measure.shannon_entropy (one bin per distinct value), so float images
    and `mutual_information` share one definition.
    """
    _check_bins(bins)
    counts, _ = np.histogram(_image(image, "image"), bins=bins)
    return _bits(counts / counts.sum())


def mutual_information(a: np.ndarray, b: np.ndarray, *, bins: int = 64) -> float:
    """Mutual information in bits from the joint histogram (`bins` per axis over each range).

    Plug-in estimate: independent images read slightly above 0 (about (bins-1)^2 / (2 N ln 2)).
    """
    _check_bins(bins)
    x, y = _pair(a, b)
    joint, _, _ = np.histogram2d(x.ravel(), y.ravel(), bins=bins)
    p = joint / joint.sum()
    return max(0.0, _bits(p.sum(axis=1)) + _bits(p.sum(axis=0)) - _bits(p))


# ---- resolution: decorrelation analysis -----------------------------------------------------


@dataclass(frozen=True)
class Decorrelation:
    """Result of `decorrelation_resolution`; kc = 0 (resolution inf) when no peak was found."""

    resolution_px: float
    resolution_um: float | None
    kc: float
    amplitude: float


def _apodize(image: np.ndarray, width: int) -> np.ndarray:
    """Mean-subtracted image with a raised-cosine taper over `width` px at each edge.

    Removes the edge discontinuity whose cross-shaped spectrum would bias the analysis.
    """

    def taper(n: int) -> np.ndarray:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(width) + 0.5) / width)
        profile = np.ones(n)
        profile[:width], profile[n - width :] = ramp, ramp[::-1]
        return profile

    return (image - image.mean()) * np.outer(taper(image.shape[0]), taper(image.shape[1]))


class _Spectrum:
    """Fourier transform of an apodized image, sorted by normalized radius for fast masks."""

    def __init__(self, image: np.ndarray) -> None:
        rows, cols = (n - 1 + n % 2 for n in image.shape)
        odd = image[:rows, :cols]  # odd sides put k = 0 on a pixel and make the grid symmetric
        spectrum = np.fft.fftshift(np.fft.fft2(odd))
        spectrum[odd.shape[0] // 2, odd.shape[1] // 2] = 0  # DC: the offset is not resolution
        ky = np.linspace(-1.0, 1.0, odd.shape[0])[:, None]
        kx = np.linspace(-1.0, 1.0, odd.shape[1])[None, :]
        radius2 = (ky * ky + kx * kx).ravel()
        inside = radius2 < 1.0  # Nyquist circle
        order = np.argsort(radius2[inside], kind="stable")
        self.radius2 = radius2[inside][order]
        self.magnitude = np.abs(spectrum.ravel()[inside][order])
        self.normalized_weight = (self.magnitude > 0).astype(np.float64)  # |In|^2

    def curve(self, radii: np.ndarray, highpass_g: float | None) -> np.ndarray:
        """d(r) for each radius, of the spectrum optionally high-passed with 1 - exp(-2 g^2 k^2).

        Re(I In*) = |I| w(k) since In = I/|I| and the filter w is real and non-negative.
        """
        weighted = self.magnitude
        if highpass_g is not None:
            weighted = weighted * -np.expm1(-2.0 * highpass_g**2 * self.radius2)
        norm = math.sqrt(float(np.sum(weighted * weighted)))
        numerator = np.concatenate(([0.0], np.cumsum(weighted)))
        count = np.concatenate(([0.0], np.cumsum(self.normalized_weight)))
        index = np.searchsorted(self.radius2, radii * radii, side="left")
        with np.errstate(divide="ignore", invalid="ignore"):
            d = numerator[index] / (norm * np.sqrt(count[index]))
        return np.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0)


def _peak_index(d: np.ndarray) -> int:
    """Index of the tallest maximum of d that stands out from its tail, or 0 if there is none.

    A peak must rise _DECORR_PEAK_MARGIN above the lowest point after it (the Fiji plugin's
    rule): a curve still rising at Nyquist, or a ripple on a flat tail, is no cut-off.
    """
    tail_min = np.append(np.minimum.accumulate(d[::-1])[::-1][1:], np.inf)
    significant = d - tail_min > _DECORR_PEAK_MARGIN
    if not significant.any():
        return 0
    return int(np.argmax(np.where(significant, d, -np.inf)))


def _peak(spectrum: _Spectrum, radii: np.ndarray, g: float | None) -> tuple[float, float]:
    """(kc, amplitude) of one decorrelation curve; (0, 0) without a peak."""
    d = spectrum.curve(radii, g)
    index = _peak_index(d)
    return (float(radii[index]), float(d[index])) if index else (0.0, 0.0)


def _refined_filters(g: np.ndarray, best: int, size: int, n_filters: int) -> np.ndarray:
    """Filter widths between the best filter and its stronger neighbour (best = -1: no filter)."""
    if best < 0:
        low, high = float(size), float(g[0])
    elif best >= g.size - 1:
        low, high = float(g[-2]), float(g[-1])
    else:
        low, high = float(g[best]), float(g[best + 1])
    return np.exp(np.linspace(math.log(low), math.log(high), n_filters))


def _check_decorrelation_args(image: np.ndarray, n_radii: int, n_filters: int) -> None:
    _check_min_side(image, _DECORR_MIN_SIDE, "decorrelation analysis")
    if not (isinstance(n_radii, (int, np.integer)) and n_radii >= 10):
        raise ValueError(f"n_radii must be an integer >= 10 (50 is typical), got {n_radii!r}.")
    if not (isinstance(n_filters, (int, np.integer)) and n_filters >= 5):
        raise ValueError(f"n_filters must be an integer >= 5 (10 is typical), got {n_filters!r}.")


def _check_pixel_size(pixel_size_um: float | None) -> None:
    if pixel_size_um is not None and not (math.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise ValueError(
            f"pixel_size_um must be a finite positive number of µm or None, got {pixel_size_um}."
        )


def _significant(peaks: list[tuple[float, float]]) -> list[float]:
    """The kc of each (kc, amplitude) peak, or 0 where the amplitude is below the paper's 0.05."""
    return [kc if amplitude >= _DECORR_MIN_AMPLITUDE else 0.0 for kc, amplitude in peaks]


def _refined_peaks(
    spectrum: _Spectrum, g: np.ndarray, peaks: list[tuple[float, float]], size: int, n_radii: int
) -> list[tuple[float, float]]:
    """Second pass: finer filter widths and radii around the highest cut-off of the first pass."""
    kcs = _significant(peaks)
    best = max(range(len(kcs)), key=lambda i: (kcs[i], i)) - 1  # last maximum; -1 means d0
    step = 1.0 / (n_radii - 1)
    radii = np.linspace(max(kcs[best + 1] - step, 0.0), min(kcs[best + 1] + 0.3, 1.0), n_radii)
    widths = _refined_filters(g, best, size, g.size - 1)
    return [_peak(spectrum, radii, float(width)) for width in widths]


def decorrelation_resolution(
    image: np.ndarray,
    *,
    pixel_size_um: float | None = None,
    n_radii: int = 50,
    n_filters: int = 10,
) -> Decorrelation:
    """Resolution from one image by decorrelation analysis (Descloux, Grussmayer & Radenovic,
    Nat Methods 16, 918 (2019)); kc is the highest cut-off over high-pass filtered curves.

    kc is in normalized frequency (Nyquist = 1). Pure noise (a flat spectrum) or a featureless
    image has no peak: kc = 0, amplitude 0 and resolution inf.
    """
    img = _image(image, "image")
    _check_decorrelation_args(img, n_radii, n_filters)
    _check_pixel_size(pixel_size_um)
    spectrum = _Spectrum(_apodize(img, min(_DECORR_APODIZE_PX, min(img.shape) // 4)))

    radii = np.linspace(0.0, 1.0, n_radii)
    kc0, amplitude0 = _peak(spectrum, radii, None)
    g_max = 2.0 / kc0 if kc0 > 0 else max(img.shape) / 2.0
    g = np.concatenate(([img.shape[0] / 4.0], np.geomspace(g_max, 0.15, n_filters)))
    first = [(kc0, amplitude0), *(_peak(spectrum, radii, float(width)) for width in g)]
    second = _refined_peaks(spectrum, g, first, img.shape[0], n_radii)

    kc = max(_significant(first + second))
    resolution_px = 2.0 / kc if kc > 0 else math.inf
    resolution_um = None if pixel_size_um is None else resolution_px * pixel_size_um
    return Decorrelation(resolution_px, resolution_um, kc, amplitude0)


# ---- single-image and temporal scores -------------------------------------------------------


def _nonzero_mean(values: np.ndarray, name: str, what: str) -> float:
    """Mean of `values`, refused when it is 0 up to rounding (a ratio to it would be noise)."""
    mean = float(values.mean())
    if abs(mean) <= 1e-9 * float(np.abs(values).max()) or mean == 0:
        raise ValueError(
            f"{name} has mean {mean:.3g} (about 0), so {what} is undefined; "
            "pass raw (not background-subtracted) intensities."
        )
    return mean


def focus_score(image: np.ndarray) -> float:
    """Sharpness: variance of the Laplacian over the squared mean (Pech-Pacheco et al., ICPR 2000,
    normalized so gain does not matter); higher is sharper.
    """
    img = _image(image, "image")
    mean = _nonzero_mean(img, "image", "the scale-invariant focus score")
    laplacian = ndimage.laplace(img, mode="reflect")
    return float(laplacian.var() / mean**2)


def flicker(frames: np.ndarray) -> float:
    """Temporal flicker of a (T, H, W) sequence: mean |f_t - f_{t-1}| over the mean intensity.

    0 for a static sequence; compares engines on how much they make a still scene shimmer.
    """
    stack = np.asarray(frames, dtype=np.float64)
    if stack.ndim != 3 or stack.shape[0] < 2 or stack.shape[1] == 0 or stack.shape[2] == 0:
        raise ValueError(
            f"frames must be a (T, H, W) sequence with T >= 2, got shape {stack.shape}."
        )
    _check_finite(stack, "frames")
    mean = _nonzero_mean(stack, "frames", "relative flicker")
    return float(np.abs(np.diff(stack, axis=0)).mean() / abs(mean))
