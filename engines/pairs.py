"""What training (engines.train.data) and the benchmarks (bench.quality, bench.real_images)
share about image pairs, without torch: block means, the paired intensity fit, degrading a
clean image with a forward model, and the simulated time span training draws from (so held-out
data can avoid it)."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from calibration.forward import ForwardModel

#: simulated pairs are drawn from this much acquisition time (x the preset's time_scale)
TRAIN_SPAN_S = 300.0
FIT_SIGMA = 4.0  # smoothing (low pixels) before the paired intensity fit
MIN_FIT_CORRELATION = 0.5


def bin_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks of the last two axes (keeps the per-pixel level)."""
    image = np.asarray(image, np.float32)
    if factor == 1:
        return image
    *lead, h, w = image.shape
    blocks = image.reshape(*lead, h // factor, factor, w // factor, factor)
    return blocks.mean(axis=(-3, -1), dtype=np.float32)


def match_intensity(
    low: np.ndarray, high: np.ndarray, scale: int, name: str
) -> tuple[float, float]:
    """(a, b) with ``low ~ a * binned(high) + b``, fitted on smoothed images (last two axes) so
    blur or noise differences between the two do not bias it; ValueError if they do not
    correspond."""
    sigma = (0.0,) * (np.ndim(low) - 2) + (FIT_SIGMA, FIT_SIGMA)
    lo = ndimage.gaussian_filter(np.asarray(low, np.float64), sigma)
    hb = ndimage.gaussian_filter(bin_mean(high, scale).astype(np.float64), sigma)
    lo, hb = lo.ravel() - lo.mean(), hb.ravel() - hb.mean()
    var_h, var_l = float(hb @ hb), float(lo @ lo)
    r = float(lo @ hb) / math.sqrt(var_h * var_l) if var_h > 0 and var_l > 0 else 0.0
    if not r >= MIN_FIT_CORRELATION:
        raise ValueError(
            f"high image of {name} does not follow its low image (correlation {r:.2f} of the "
            f"smoothed images, need >= {MIN_FIT_CORRELATION}): check that the pair shows the "
            "same field and is registered, or turn intensity matching off"
        )
    a = float(lo @ hb) / var_h
    b = float(np.mean(low, dtype=np.float64)) - a * float(np.mean(bin_mean(high, scale)))
    return a, b


def degrade(model: ForwardModel, clean: np.ndarray, scale: int, dz: float,
            rng: np.random.Generator) -> np.ndarray:  # fmt: skip
    """A noisy low frame (uint16) of a raw-equivalent clean image on the target grid.

    ``model``'s fine grid is the target grid (``scan.downsample == scale``); the clean image's
    ADU above the camera offset become fine-grid photons ``(clean - offset) / (gain * qe *
    scale**2)``, recorded at defocus ``dz`` from the model's focal plane.
    """
    cam = model.camera
    photons = np.asarray(clean, np.float32) - np.float32(cam.offset_adu)
    np.maximum(photons, 0, out=photons)
    photons *= np.float32(1 / (cam.gain_adu_per_electron * cam.quantum_efficiency * scale**2))
    return model.record(photons, rng, z_um=model.focus_z_um + dz)
