"""Classical baselines every engine must beat; no learning, each named for the method it is.

Every baseline takes one raw frame in ADU and returns an estimate ``scale`` times finer in
raw-equivalent ADU (the units of engine outputs and of the bench's truth), as float64:
``BASELINES[name](raw, scale=2, psf_sigma_px=1.0, offset=50.0)``. Restoration happens on the raw
grid; a scale above 1 is then reached by cubic-spline interpolation (:func:`upsample_cubic`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import ndimage
from skimage.exposure import equalize_adapthist
from skimage.filters import unsharp_mask
from skimage.restoration import denoise_nl_means, richardson_lucy

Baseline = Callable[..., np.ndarray]
"""``baseline(raw, *, scale, psf_sigma_px, offset) -> estimate`` (scale x the raw size, ADU)."""

GAUSSIAN_SIGMA_PX = 1.0
RL_ITERATIONS = 20
NLM_PATCH_SIZE = 5
NLM_PATCH_DISTANCE = 6
NLM_H_PER_SIGMA = 0.8  # scikit-image's advice for fast_mode with sigma given
UNSHARP_RADIUS_PX = 1.0
UNSHARP_AMOUNT = 1.0
CLAHE_CLIP_LIMIT = 0.01


def _checked(raw: np.ndarray, scale: int, psf_sigma_px: float) -> np.ndarray:
    """``raw`` as finite 2-D float64; ValueError naming what is wrong otherwise."""
    image = np.asarray(raw, dtype=np.float64)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"a baseline takes one 2-D frame, got shape {image.shape}")
    if not np.isfinite(image).all():
        raise ValueError("the raw frame has NaN or inf values: replace them before a baseline")
    if not (isinstance(scale, (int, np.integer)) and scale >= 1):
        raise ValueError(f"scale must be an integer >= 1, got {scale!r}")
    if not (math.isfinite(psf_sigma_px) and psf_sigma_px > 0):
        raise ValueError(f"psf_sigma_px must be a finite number > 0, got {psf_sigma_px!r}")
    return image


def upsample_nearest(image: np.ndarray, scale: int) -> np.ndarray:
    """Each pixel repeated ``scale x scale`` times (block means equal the input)."""
    image = np.asarray(image, dtype=np.float64)
    if scale == 1:
        return image.copy()
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def upsample_cubic(image: np.ndarray, scale: int) -> np.ndarray:
    """Cubic-spline interpolation (scipy.ndimage.zoom order 3) with pixel areas aligned.

    ``grid_mode=True`` puts each raw pixel over the ``scale x scale`` block it covers, the same
    geometry as the truth and as the fidelity check's binning.
    """
    image = np.asarray(image, dtype=np.float64)
    if scale == 1:
        return image.copy()
    return ndimage.zoom(image, scale, order=3, mode="grid-mirror", grid_mode=True)


def identity(raw: np.ndarray, *, scale: int, psf_sigma_px: float, offset: float) -> np.ndarray:
    """The raw frame itself, nearest-upsampled: what no processing gives."""
    return upsample_nearest(_checked(raw, scale, psf_sigma_px), scale)


def bicubic(raw: np.ndarray, *, scale: int, psf_sigma_px: float, offset: float) -> np.ndarray:
    """Cubic-spline interpolation only (Keys 1981 family): adds no information."""
    return upsample_cubic(_checked(raw, scale, psf_sigma_px), scale)


def gaussian(raw: np.ndarray, *, scale: int, psf_sigma_px: float, offset: float) -> np.ndarray:
    """Gaussian smoothing (sigma 1 raw px), then cubic upsampling: trades resolution for noise."""
    image = _checked(raw, scale, psf_sigma_px)
    return upsample_cubic(ndimage.gaussian_filter(image, GAUSSIAN_SIGMA_PX, mode="reflect"), scale)


def noise_sigma(image: np.ndarray) -> float:
    """Gaussian noise sigma from the median absolute finest diagonal Haar wavelet coefficient
    (Donoho & Johnstone, Biometrika 81, 425 (1994)): skimage's estimate_sigma without PyWavelets."""
    image = np.asarray(image, dtype=np.float64)
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    if h == 0 or w == 0:
        return 0.0
    b = image[:h, :w]
    diagonal = (b[0::2, 0::2] - b[0::2, 1::2] - b[1::2, 0::2] + b[1::2, 1::2]) / 2
    return float(np.median(np.abs(diagonal)) / 0.6744897501960817)  # MAD -> sigma (Gaussian)


def nlm(raw: np.ndarray, *, scale: int, psf_sigma_px: float, offset: float) -> np.ndarray:
    """Non-local means (Buades, Coll & Morel, CVPR 2005; scikit-image fast mode), noise sigma
    from :func:`noise_sigma`, then cubic upsampling.

    One global sigma: shot noise is larger in bright structure than the (background-dominated)
    estimate, so NLM denoises bright regions less than a variance-stabilized variant would.
    """
    image = _checked(raw, scale, psf_sigma_px)
    sigma = noise_sigma(image)
    if sigma > 0:
        image = denoise_nl_means(
            image,
            patch_size=NLM_PATCH_SIZE,
            patch_distance=NLM_PATCH_DISTANCE,
            h=NLM_H_PER_SIGMA * sigma,
            sigma=sigma,
            fast_mode=True,
            preserve_range=True,
        )
    return upsample_cubic(image, scale)


def gaussian_psf(sigma_px: float) -> np.ndarray:
    """A normalized Gaussian kernel spanning +-4 sigma (at least 3x3)."""
    radius = max(1, math.ceil(4 * sigma_px))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (x / sigma_px) ** 2)
    kernel = np.outer(g, g)
    return kernel / kernel.sum()


def richardson_lucy_baseline(
    raw: np.ndarray, *, scale: int, psf_sigma_px: float, offset: float
) -> np.ndarray:
    """Richardson-Lucy deconvolution (Richardson 1972, Lucy 1974; scikit-image), 20 iterations,
    Gaussian PSF of ``psf_sigma_px`` raw px, then cubic upsampling.

    Runs on offset-subtracted, non-negative data (RL assumes Poisson counts), reflect-padded so
    the zero padding of the convolution does not brighten the edges; the offset is added back.
    """
    image = _checked(raw, scale, psf_sigma_px)
    psf = gaussian_psf(psf_sigma_px)
    pad = psf.shape[0]
    counts = np.pad(np.clip(image - offset, 0.0, None), pad, mode="reflect")
    if counts.max() > 0:
        counts = richardson_lucy(counts, psf, num_iter=RL_ITERATIONS, clip=False)
    return upsample_cubic(counts[pad:-pad, pad:-pad] + offset, scale)


def unsharp_clahe(raw: np.ndarray, *, scale: int, psf_sigma_px: float, offset: float) -> np.ndarray:
    """CIEGAN's traditional enhancement: unsharp mask, then CLAHE (Zuiderveld 1994; scikit-image),
    then cubic upsampling.

    Mapping back: both steps work on [0, 1] (the raw min..max), and CLAHE deliberately remaps
    intensities, so its output is put into raw ADU by the affine ``a * e + b`` fitted to the RAW
    frame by least squares (the truth is never used). PSNR then scores the structure the method
    makes, with the best linear intensity scale it could be given.
    """
    image = _checked(raw, scale, psf_sigma_px)
    lo, hi = float(image.min()), float(image.max())
    if hi == lo:
        return upsample_cubic(image, scale)
    unit = (image - lo) / (hi - lo)
    sharp = unsharp_mask(unit, radius=UNSHARP_RADIUS_PX, amount=UNSHARP_AMOUNT, preserve_range=True)
    enhanced = equalize_adapthist(np.clip(sharp, 0.0, 1.0), clip_limit=CLAHE_CLIP_LIMIT)
    e = enhanced.ravel() - enhanced.mean()
    var = float(e @ e)
    a = float(e @ (image.ravel() - image.mean())) / var if var > 0 else 0.0
    mapped = a * (enhanced - enhanced.mean()) + image.mean()
    return upsample_cubic(mapped, scale)


BASELINES: dict[str, Baseline] = {
    "identity": identity,
    "bicubic": bicubic,
    "gaussian": gaussian,
    "nlm": nlm,
    "richardson-lucy": richardson_lucy_baseline,
    "unsharp-clahe": unsharp_clahe,
}
"""Every classical baseline by name, in the order reports show them."""
