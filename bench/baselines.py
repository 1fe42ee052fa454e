"""Classical baselines every engine must beat; no learning, each named for the method it is.

Every baseline takes one raw frame in ADU and returns an estimate ``scale`` times finer in
raw-equivalent ADU (the units of engine outputs and of the bench's truth), as float64:
``BASELINES[name](raw, scale=2, psf_sigma_px=1.0, offset=50.0)``. Restoration happens on the raw
grid; a scale above 1 is then reached by cubic-spline interpolation (:func:`upsample_cubic`).

Two baselines use more than the one frame when they have it: ``vst-nlm`` takes the camera
(``camera=CameraParams``: gain, offset, read noise) to stabilise the Poisson-Gaussian noise, and
``mean2+gaussian`` the previous raw frame (``previous=``). :func:`run_baseline` gives every
baseline what it uses from a stream's frames (oldest first, the last is the one estimated).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage
from skimage.exposure import equalize_adapthist
from skimage.filters import unsharp_mask
from skimage.restoration import denoise_nl_means, richardson_lucy

from calibration.camera import CameraParams

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


def _nlm(image: np.ndarray, sigma: float) -> np.ndarray:
    """scikit-image's fast non-local means at noise ``sigma`` (unchanged when it is 0)."""
    if sigma <= 0:
        return image
    return denoise_nl_means(
        image,
        patch_size=NLM_PATCH_SIZE,
        patch_distance=NLM_PATCH_DISTANCE,
        h=NLM_H_PER_SIGMA * sigma,
        sigma=sigma,
        fast_mode=True,
        preserve_range=True,
    )


def nlm(raw: np.ndarray, *, scale: int, psf_sigma_px: float, offset: float) -> np.ndarray:
    """Non-local means (Buades, Coll & Morel, CVPR 2005; scikit-image fast mode), noise sigma
    from :func:`noise_sigma`, then cubic upsampling.

    One global sigma: shot noise is larger in bright structure than the (background-dominated)
    estimate, so NLM denoises bright regions less than a variance-stabilized variant would.
    """
    image = _checked(raw, scale, psf_sigma_px)
    return upsample_cubic(_nlm(image, noise_sigma(image)), scale)


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


# -- variance-stabilised NLM ------------------------------------------------------------------

_SQRT_3_2 = math.sqrt(1.5)


def gat_read_sigma_electrons(camera: CameraParams) -> float:
    """The Gaussian part of the noise in electrons: read noise plus the ADC's 1/12 ADU^2."""
    g = camera.gain_adu_per_electron
    return math.sqrt(camera.read_noise_electrons**2 + 1 / (12 * g * g))


def gat_forward(adu: np.ndarray, *, gain: float, offset: float, sigma_e: float) -> np.ndarray:
    """Generalized Anscombe transform (Murtagh, Starck & Bijaoui 1995) of raw ADU.

    With electrons ``z = (adu - offset) / gain`` (Poisson) plus Gaussian noise of ``sigma_e``
    electrons, ``2 sqrt(z + 3/8 + sigma_e^2)`` has variance about 1 wherever the signal is not
    vanishingly small; the argument is clipped at 0.
    """
    z = (np.asarray(adu, dtype=np.float64) - offset) / gain
    return 2.0 * np.sqrt(np.maximum(z + 0.375 + sigma_e * sigma_e, 0.0))


def gat_inverse(d: np.ndarray, *, gain: float, offset: float, sigma_e: float) -> np.ndarray:
    """The closed-form approximation of the exact unbiased inverse of :func:`gat_forward`
    (Makitalo & Foi, IEEE TIP 22, 91 (2013), eq. 12), back to ADU: the mean ADU whose transform
    has expectation ``d``, not the algebraic inverse (which is biased low at low counts).
    Electrons are clipped at 0, as in the paper."""
    d = np.maximum(np.asarray(d, dtype=np.float64), 1e-6)
    electrons = (
        0.25 * d**2
        + 0.25 * _SQRT_3_2 / d
        - 1.375 / d**2
        + 0.625 * _SQRT_3_2 / d**3
        - 0.125
        - sigma_e * sigma_e
    )
    return gain * np.maximum(electrons, 0.0) + offset


def vst_nlm(raw: np.ndarray, *, scale: int, psf_sigma_px: float, offset: float,
            camera: CameraParams | None = None) -> np.ndarray:  # fmt: skip
    """Variance-stabilised non-local means (Makitalo & Foi 2013's recipe): the generalized
    Anscombe transform with the known camera, NLM at noise sigma 1 (h as :func:`nlm` sets it
    from sigma), the closed-form unbiased inverse, then cubic upsampling.

    With a camera the transformed noise sigma is 1 by construction (the camera's offset is
    used, not ``offset``). Without one (folder data of unknown rig), the transform assumes 1 ADU
    per electron and no read noise on ``offset``-subtracted data, and the transformed sigma is
    estimated (:func:`noise_sigma`); the inverse is then only approximately unbiased.
    """
    image = _checked(raw, scale, psf_sigma_px)
    if camera is not None:
        gain, zero = camera.gain_adu_per_electron, camera.offset_adu
        sigma_e = gat_read_sigma_electrons(camera)
    else:
        gain, zero, sigma_e = 1.0, offset, 0.0
    stable = gat_forward(image, gain=gain, offset=zero, sigma_e=sigma_e)
    stable = _nlm(stable, 1.0 if camera is not None else noise_sigma(stable))
    return upsample_cubic(gat_inverse(stable, gain=gain, offset=zero, sigma_e=sigma_e), scale)


# -- temporal ---------------------------------------------------------------------------------


def mean2_gaussian(raw: np.ndarray, *, scale: int, psf_sigma_px: float, offset: float,
                   previous: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """The mean of this raw frame and the previous one, then :func:`gaussian`: the simplest
    causal temporal denoiser (half the noise variance on a still specimen, a blur along any
    motion). On a stream's first frame (``previous`` None) it is the Gaussian alone."""
    image = _checked(raw, scale, psf_sigma_px)
    if previous is not None:
        before = _checked(previous, scale, psf_sigma_px)
        if before.shape != image.shape:
            raise ValueError(
                f"the previous frame {before.shape} and this frame {image.shape} differ in shape"
            )
        image = 0.5 * (image + before)
    return gaussian(image, scale=scale, psf_sigma_px=psf_sigma_px, offset=offset)


BASELINES: dict[str, Baseline] = {
    "identity": identity,
    "bicubic": bicubic,
    "gaussian": gaussian,
    "nlm": nlm,
    "richardson-lucy": richardson_lucy_baseline,
    "unsharp-clahe": unsharp_clahe,
    "vst-nlm": vst_nlm,
    "mean2+gaussian": mean2_gaussian,
}
"""Every classical baseline by name, in the order reports show them."""

CAMERA_BASELINES = frozenset({"vst-nlm"})
"""Baselines that take ``camera=`` (None: unknown camera, a fallback they document)."""
BASELINE_HISTORY = {"mean2+gaussian": 2}
"""Raw frames (the estimated one included) a temporal baseline uses; others use 1."""


def baseline_history(names: Sequence[str]) -> int:
    """Raw frames the baselines ``names`` use at most, the estimated one included."""
    return max([BASELINE_HISTORY.get(n, 1) for n in names] + [1])


def run_baseline(name: str, frames: Sequence[np.ndarray], *, scale: int, psf_sigma_px: float,
                 offset: float, camera: CameraParams | None = None) -> np.ndarray:  # fmt: skip
    """Baseline ``name`` on the last of ``frames`` (a stream's raw frames, oldest first), given
    the earlier frames it uses and the camera if it takes one. Causal: nothing after the last
    frame exists here."""
    if not frames:
        raise ValueError(f"baseline {name!r} needs at least one frame")
    fn = BASELINES[name]
    extra: dict[str, object] = {}
    if name in CAMERA_BASELINES:
        extra["camera"] = camera
    if BASELINE_HISTORY.get(name, 1) >= 2:
        extra["previous"] = frames[-2] if len(frames) >= 2 else None
    return fn(frames[-1], scale=scale, psf_sigma_px=psf_sigma_px, offset=offset, **extra)
