"""Widefield optics: in-focus PSF (Gaussian or Airy) plus a geometric defocus blur."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage, special

_AIRY_ZEROS = (3.8317, 7.0156, 10.1735, 13.3237, 16.4706)
_SUPERSAMPLE = 5


class OpticsParams(BaseModel):
    """Objective and emission wavelength that set the point-spread function."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    na: float = Field(
        1.4,
        gt=0,
        description="Numerical aperture of the objective; must be below refractive_index.",
    )
    wavelength_nm: float = Field(520.0, gt=200, lt=2000, description="Emission wavelength in nm.")
    refractive_index: float = Field(
        1.515, ge=1, description="Refractive index of the immersion medium."
    )
    psf: Literal["gaussian", "airy"] = Field(
        "gaussian", description="PSF shape: Gaussian approximation or Airy pattern."
    )

    @model_validator(mode="after")
    def _na_below_n(self) -> OpticsParams:
        if self.na >= self.refractive_index:
            raise ValueError(
                f"na={self.na} must be < refractive_index={self.refractive_index}; "
                "lower the NA or use an immersion medium."
            )
        return self


def psf_sigma_um(optics: OpticsParams) -> float:
    """Sigma of the best Gaussian fit to the in-focus widefield PSF: 0.21 λ/NA (Zhang, Zerubia &
    Olivo-Marin 2007)."""
    return 0.21 * optics.wavelength_nm * 1e-3 / optics.na


def defocus_sigma_um(optics: OpticsParams, dz_um: float) -> float:
    """Extra Gaussian sigma at defocus dz: geometric blur radius |dz|·tan(asin(NA/n)), taken as 2
    sigma."""
    return abs(dz_um) * math.tan(math.asin(optics.na / optics.refractive_index)) / 2


def _check_pixel(pixel_size_um: float) -> None:
    if not (math.isfinite(pixel_size_um) and pixel_size_um > 0):
        raise ValueError(
            f"pixel_size_um must be a finite positive number of µm, got {pixel_size_um}."
        )


def _gaussian_sigma_px(optics: OpticsParams, pixel_size_um: float, dz_um: float) -> float:
    return math.hypot(psf_sigma_um(optics), defocus_sigma_um(optics, dz_um)) / pixel_size_um


def psf_kernel(
    optics: OpticsParams, pixel_size_um: float, dz_um: float = 0.0, *, size: int | None = None
) -> np.ndarray:
    """Normalized (sum 1), odd-sized 2-D PSF sampled on pixels of `pixel_size_um` at defocus
    `dz_um`.

    Gaussian kernels are point-sampled (matching `blur`); Airy kernels are averaged over 5x5
    sub-pixels, then blurred by the defocus Gaussian. Default size spans ±4 sigma or five Airy
    rings (+4 defocus sigma).
    """
    _check_pixel(pixel_size_um)
    defocus_px = defocus_sigma_um(optics, dz_um) / pixel_size_um
    if size is None:
        if optics.psf == "gaussian":
            radius = 4 * _gaussian_sigma_px(optics, pixel_size_um, dz_um)
        else:
            lam_um = optics.wavelength_nm * 1e-3
            radius = (
                _AIRY_ZEROS[-1] * lam_um / (2 * math.pi * optics.na * pixel_size_um)
                + 4 * defocus_px
            )
        size = 2 * math.ceil(radius) + 1
    if not (isinstance(size, (int, np.integer)) and size >= 1 and size % 2 == 1):
        raise ValueError(f"size must be a positive odd integer, got {size!r}.")
    half = size // 2
    if optics.psf == "gaussian":
        x = np.arange(-half, half + 1, dtype=np.float64)
        sigma = _gaussian_sigma_px(optics, pixel_size_um, dz_um)
        g = np.exp(-0.5 * (x / sigma) ** 2)
        kernel = np.outer(g, g)
    else:
        sub = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE - 0.5
        x = (np.arange(-half, half + 1)[:, None] + sub[None, :]).ravel()
        v = (
            2
            * math.pi
            * optics.na
            * pixel_size_um
            / (optics.wavelength_nm * 1e-3)
            * np.hypot(x[:, None], x[None, :])
        )
        amplitude = np.ones_like(v)
        np.divide(2 * special.j1(v), v, out=amplitude, where=v > 0)
        kernel = (amplitude**2).reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))
        if defocus_px > 0:
            kernel = ndimage.gaussian_filter(kernel, defocus_px, mode="constant")
    return kernel / kernel.sum()


def blur(
    image: np.ndarray, optics: OpticsParams, pixel_size_um: float, dz_um: float = 0.0
) -> np.ndarray:
    """Convolve an image with the PSF (reflecting edges, so flux is kept and borders don't darken);
    float32."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(
            f"blur expects a 2-D image, got shape {image.shape}; blur each plane separately."
        )
    _check_pixel(pixel_size_um)
    if optics.psf == "gaussian":
        sigma = _gaussian_sigma_px(optics, pixel_size_um, dz_um)
        return ndimage.gaussian_filter(image, sigma, mode="reflect", output=np.float32)
    kernel = psf_kernel(optics, pixel_size_um, dz_um).astype(np.float32)
    half = kernel.shape[0] // 2
    padded = np.pad(image, half, mode="symmetric")
    from scipy import signal  # 0.5 s to import: only where a blur is computed

    blurred = signal.fftconvolve(padded, kernel, mode="valid")
    return np.maximum(blurred, 0, out=blurred).astype(np.float32, copy=False)
