"""Camera model: expected photons per pixel -> noisy, quantized ADU (EMVA 1288 style)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class CameraParams(BaseModel):
    """Linear camera with shot noise, Gaussian read noise, offset and a finite ADC."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    offset_adu: float = Field(
        100.0,
        ge=0,
        allow_inf_nan=False,
        description="Dark offset (bias) added to every pixel, in ADU.",
    )
    gain_adu_per_electron: float = Field(
        2.0, gt=0, allow_inf_nan=False, description="System gain: ADU per photo-electron."
    )
    read_noise_electrons: float = Field(
        1.5, ge=0, allow_inf_nan=False, description="RMS read noise, in electrons."
    )
    quantum_efficiency: float = Field(
        0.8, gt=0, le=1, description="Fraction of incident photons converted to electrons."
    )
    bit_depth: int = Field(
        16,
        ge=1,
        le=16,
        description="ADC bit depth; recorded values are clipped to [0, 2**bit_depth - 1].",
    )

    @property
    def max_adu(self) -> int:
        """Largest value the ADC can report."""
        return 2**self.bit_depth - 1


def _check_map(
    name: str, values: np.ndarray | None, shape: tuple[int, ...], *, positive: bool
) -> np.ndarray | None:
    if values is None:
        return None
    values = np.asarray(values, dtype=np.float32)
    if values.shape != shape:
        raise ValueError(
            f"{name} has shape {values.shape} but the image has shape {shape}; "
            "pass a map of the same shape."
        )
    if not np.isfinite(values).all():
        raise ValueError(
            f"{name} contains NaN or inf; replace them with finite calibration values."
        )
    lo = float(values.min()) if values.size else 0.0
    if positive and lo <= 0:
        raise ValueError(
            f"{name} must be > 0 everywhere (relative pixel sensitivity), got minimum {lo}."
        )
    if not positive and lo < 0:
        raise ValueError(f"{name} must be >= 0 everywhere, got minimum {lo}.")
    return values


def _check_photons(photons: np.ndarray) -> np.ndarray:
    photons = np.asarray(photons)
    if photons.size == 0:
        return photons
    lo, hi = photons.min(), photons.max()
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(
            f"photons contain NaN or inf (range {lo}..{hi}); expected finite photon counts."
        )
    if lo < 0:
        raise ValueError(
            f"photons must be >= 0 (expected photon counts), got minimum {lo}; "
            "clip the input first."
        )
    return photons


def _mean_electrons(
    photons: np.ndarray, camera: CameraParams, flat_field: np.ndarray | None
) -> np.ndarray:
    electrons = np.asarray(photons, dtype=np.float32) * np.float32(camera.quantum_efficiency)
    return electrons * flat_field if flat_field is not None else electrons


def record(
    photons: np.ndarray,
    camera: CameraParams,
    rng: np.random.Generator,
    *,
    offset_map: np.ndarray | None = None,
    flat_field: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Simulate one exposure: Poisson shot noise, Gaussian read noise, gain, offset, rounding and
    clipping.

    `offset_map` replaces the scalar offset per pixel; `flat_field` scales the sensitivity per
    pixel. Returns uint16 (written into `out` when given). Large frames are split into fixed
    chunks, each with its own generator seeded from `rng`, and drawn on threads: output depends
    only on the seed and shape.
    """
    photons = _check_photons(photons)
    offset_map = _check_map("offset_map", offset_map, photons.shape, positive=False)
    flat_field = _check_map("flat_field", flat_field, photons.shape, positive=True)
    if out is not None and (out.dtype != np.uint16 or out.shape != photons.shape):
        raise ValueError(
            f"out must be a uint16 array of shape {photons.shape}, got {out.dtype} {out.shape}; "
            "allocate a matching buffer."
        )
    result = (
        out if out is not None and out.flags.c_contiguous else np.empty(photons.shape, np.uint16)
    )
    photons_v = np.ravel(photons)
    offset_v = None if offset_map is None else offset_map.reshape(-1)
    flat_v = None if flat_field is None else flat_field.reshape(-1)
    result_v = result.reshape(-1)
    n = -(-photons.size // _CHUNK)
    bounds = np.linspace(0, photons.size, n + 1).astype(int) if n > 1 else (0, photons.size)
    rngs = [rng] if n <= 1 else [np.random.default_rng(s) for s in rng.integers(0, 2**63, size=n)]

    def work(i: int) -> None:
        chunk = slice(bounds[i], bounds[i + 1])
        _record_chunk(
            photons_v[chunk],
            None if offset_v is None else offset_v[chunk],
            None if flat_v is None else flat_v[chunk],
            result_v[chunk],
            camera,
            rngs[i],
        )

    if n <= 1:
        work(0)
    else:
        list(_pool().map(work, range(n)))
    if out is not None and result is not out:
        out[...] = result
        return out
    return result


_CHUNK = 1 << 18


@cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(
        max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="scopecast-camera"
    )


os.register_at_fork(after_in_child=_pool.cache_clear)


def _record_chunk(
    photons: np.ndarray,
    offset_map: np.ndarray | None,
    flat_field: np.ndarray | None,
    out: np.ndarray,
    camera: CameraParams,
    rng: np.random.Generator,
) -> None:
    adu = rng.poisson(_mean_electrons(photons, camera, flat_field)).astype(np.float32)
    if camera.read_noise_electrons > 0:
        noise = rng.standard_normal(adu.shape, dtype=np.float32)
        noise *= np.float32(camera.read_noise_electrons)
        adu += noise
    adu *= np.float32(camera.gain_adu_per_electron)
    adu += offset_map if offset_map is not None else np.float32(camera.offset_adu)
    np.rint(adu, out=adu)
    np.clip(adu, 0, camera.max_adu, out=adu)
    np.copyto(out, adu, casting="unsafe")


def expected_adu(
    photons: np.ndarray,
    camera: CameraParams,
    *,
    offset_map: np.ndarray | None = None,
    flat_field: np.ndarray | None = None,
) -> np.ndarray:
    """Noiseless mean ADU (float32, not rounded or clipped): offset + gain * qe * flat * photons."""
    photons = np.asarray(photons)
    offset_map = _check_map("offset_map", offset_map, photons.shape, positive=False)
    flat_field = _check_map("flat_field", flat_field, photons.shape, positive=True)
    adu = _mean_electrons(photons, camera, flat_field) * np.float32(camera.gain_adu_per_electron)
    return adu + (offset_map if offset_map is not None else np.float32(camera.offset_adu))


def adu_variance(
    photons: np.ndarray,
    camera: CameraParams,
    *,
    offset_map: np.ndarray | None = None,
    flat_field: np.ndarray | None = None,
) -> np.ndarray:
    """Variance of recorded ADU (float32): gain^2 * (qe * flat * photons + read_noise^2) + 1/12
    quantization.

    Ignores clipping. `offset_map` is accepted for symmetry with `expected_adu`; it does not change
    the variance.
    """
    photons = np.asarray(photons)
    _check_map("offset_map", offset_map, photons.shape, positive=False)
    flat_field = _check_map("flat_field", flat_field, photons.shape, positive=True)
    electrons_var = _mean_electrons(photons, camera, flat_field) + np.float32(
        camera.read_noise_electrons**2
    )
    return electrons_var * np.float32(camera.gain_adu_per_electron**2) + np.float32(1 / 12)


def variance_at_mean(
    mean_adu: np.ndarray, camera: CameraParams, *, offset_map: np.ndarray | None = None
) -> np.ndarray:
    """Variance of recorded ADU (float32) whose expectation is ``mean_adu``, the same as
    ``adu_variance(max(photons_from_adu(mean_adu), 0))`` in fewer passes: the mean electrons
    are ``(mean - offset) / gain`` whatever the quantum efficiency and the flat field, so the
    variance is ``gain * max(mean - offset, 0) + gain**2 * read_noise**2 + 1/12``. For live
    checks on large frames; ``offset_map`` (the image's shape) replaces the scalar offset and
    is not re-validated."""
    mean = np.asarray(mean_adu, dtype=np.float32)
    if offset_map is not None and np.shape(offset_map) != mean.shape:
        raise ValueError(
            f"offset_map has shape {np.shape(offset_map)} but the image has shape {mean.shape}; "
            "pass a map of the same shape."
        )
    offset = offset_map if offset_map is not None else np.float32(camera.offset_adu)
    g = float(camera.gain_adu_per_electron)
    var = np.subtract(mean, offset, dtype=np.float32)
    np.maximum(var, 0, out=var)
    var *= np.float32(g)
    var += np.float32(g * g * float(camera.read_noise_electrons) ** 2 + 1 / 12)
    return var


def photons_from_adu(
    adu: np.ndarray,
    camera: CameraParams,
    *,
    offset_map: np.ndarray | None = None,
    flat_field: np.ndarray | None = None,
) -> np.ndarray:
    """Invert `expected_adu`: estimated incident photons per pixel (float32; may be negative in the
    dark)."""
    adu = np.asarray(adu, dtype=np.float32)
    offset_map = _check_map("offset_map", offset_map, adu.shape, positive=False)
    flat_field = _check_map("flat_field", flat_field, adu.shape, positive=True)
    photons = adu - (offset_map if offset_map is not None else np.float32(camera.offset_adu))
    photons /= np.float32(camera.gain_adu_per_electron * camera.quantum_efficiency)
    return photons / flat_field if flat_field is not None else photons
