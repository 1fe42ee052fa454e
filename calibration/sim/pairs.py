"""True image pairs from the simulated microscope, and what training (``engines.train.data``)
and the benchmarks (``bench.quality``, ``bench.real_images``) share about image pairs: block
means, the paired intensity fit, degrading a clean image with a forward model, and the simulated
time span training draws from (so held-out data can avoid it). Torch-free.

:class:`PairRig` renders the fast scan and the slow high-quality scan (or the noise-free image)
of the same instant on any field of view, in raw-equivalent ADU. Training and the quality
benchmark both render with this one class; only where and when they draw fields differs. A field
smaller than the full frame is rendered with an even margin (scan-line parity kept) that is cut
off again, so PSF and line-phase edges match the inside of a full frame.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from calibration import camera as _camera
from calibration.forward import ForwardModel
from calibration.optics import psf_kernel

from .randomize import RigDraw, render_posed
from .scene import Preset, Scene
from .specimen import View

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
            rng: np.random.Generator,
            offset_map: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """A noisy low frame (uint16) of a raw-equivalent clean image on the target grid.

    ``model``'s fine grid is the target grid (``scan.downsample == scale``); the clean image's
    ADU above the camera offset become fine-grid photons ``(clean - offset) / (gain * qe *
    scale**2)``, recorded at defocus ``dz`` from the model's focal plane, with ``offset_map``
    (column and pixel offsets of the low frame) in place of the scalar offset when given.
    """
    cam = model.camera
    photons = np.asarray(clean, np.float32) - np.float32(cam.offset_adu)
    np.maximum(photons, 0, out=photons)
    photons *= np.float32(1 / (cam.gain_adu_per_electron * cam.quantum_efficiency * scale**2))
    return model.record(photons, rng, z_um=model.focus_z_um + dz, offset_map=offset_map)


def raw_equivalent(adu: np.ndarray, offset: float, k: float) -> np.ndarray:
    """``offset + k * (adu - offset)`` as float32."""
    out = np.asarray(adu, np.float32) - np.float32(offset)
    out *= np.float32(k)
    out += np.float32(offset)
    return out


class PairRig:
    """One channel of a simulated rig, rendering any field of view with its full physics."""

    def __init__(
        self,
        preset: Preset,
        *,
        channel: str | None = None,
        seed: int = 0,
        field: int | None = None,
        max_defocus_um: float = 0.0,
        max_psf_scale: float = 1.0,
        max_phase_px: float = 0.0,
    ) -> None:
        self.preset = preset
        self.channel = channel or next(iter(preset.channels))
        if self.channel not in preset.channels:
            raise ValueError(
                f"channel {self.channel!r} is not in preset {preset.name!r}: use one of "
                f"{sorted(preset.channels)}"
            )
        self.scene = Scene(preset, seed)
        self.spec = preset.channels[self.channel]
        self.transmitted = self.spec.kind.transmitted
        self.fast: ForwardModel = self.scene.forward_model(self.channel)
        self.slow: ForwardModel = self.scene.forward_model(self.channel, high_quality=True)
        self.dwell = preset.exposure_ms * self.spec.photons_per_ms
        self.shape = (field, field) if field else preset.shape
        self.margin = 0
        if field:  # a randomized rig (max_psf_scale, max_phase_px) may blur and shift further
            optics = self.fast.optics
            if max_psf_scale > 1:
                wavelength = optics.wavelength_nm * max_psf_scale
                optics = optics.model_copy(update={"wavelength_nm": wavelength})
            size = psf_kernel(optics, preset.pixel_size_um, max_defocus_um).shape[0]
            phase = max(abs(preset.scan.phase_px), abs(max_phase_px))
            m = size // 2 + 2 + math.ceil(phase)
            self.margin = m + m % 2

    def fine(self, t_s: float, xy: tuple[float, float], model: ForwardModel, dwell: float,
             grid: int, angle: float = 0.0) -> np.ndarray:  # fmt: skip
        """Photons on ``model``'s fine grid for the field (margin included) at ``grid`` x the
        fast pixel density, exactly as ``Scene.fine_photons`` renders a full frame; the field
        turned by ``angle`` radians about its centre (``randomize.render_posed``)."""
        d, m = model.scan.downsample, self.margin
        rows, cols = ((n + 2 * m) * grid * d for n in self.shape)
        view = View(shape=(rows, cols), pixel_size_um=model.fine_pixel_size_um, center_um=xy)
        specimen = self.scene.specimen(self.channel)
        return render_posed(specimen, t_s, view, angle) * np.float32(dwell)

    def crop(self, image: np.ndarray, grid: int) -> np.ndarray:
        """Cut the margin off an image on a grid ``grid`` x finer than the fast scan."""
        m = self.margin * grid
        return image[m : image.shape[0] - m, m : image.shape[1] - m] if m else image

    def low(self, t_s: float, xy: tuple[float, float], rng: np.random.Generator,
            dz: float = 0.0, *, angle: float = 0.0, rig: RigDraw | None = None,
            brightness: float = 1.0) -> np.ndarray:  # fmt: skip
        """One noisy fast-scan frame (uint16) at defocus ``dz``, the field turned by ``angle``;
        with ``rig``, recorded by that rig (its camera, column offsets, PSF width and line
        phase) in its ADU, the specimen ``brightness`` times as bright."""
        if rig is None:
            fine = self.fine(t_s, xy, self.fast, self.dwell, 1, angle)
            return self.crop(self.fast.record(fine, rng, z_um=dz), 1)
        model = rig.model(self.fast)
        photons = model.expected_photons(
            self.fine(t_s, xy, model, self.dwell * brightness, 1, angle), dz
        )
        frame = _camera.record(photons, model.camera, rng, offset_map=rig.offset_map(photons.shape))
        return self.crop(frame, 1)

    def brightness(self, t_s: float, xy: tuple[float, float], rig: RigDraw,
                   dz: float = 0.0) -> float:  # fmt: skip
        """The factor on the specimen's brightness that gives the rig's ``peak_photons`` at the
        brightest pixel of the fast scan's expected photons at (t, xy); 1 without a budget."""
        if rig.peak_photons is None:
            return 1.0
        model = rig.model(self.fast)
        peak = float(self.crop(model.expected_photons(self.fine(t_s, xy, model, self.dwell, 1),
                                                      dz), 1).max())  # fmt: skip
        return rig.peak_photons / peak if peak > 0 else 1.0

    def target_gain(self, kind: str, scale: int) -> float:
        """``k`` taking the target's ADU to raw-equivalent ADU: photons per pixel scale with
        pixel area in fluorescence (not in transmitted light) and with the dwell."""
        if kind == "clean":
            return 1.0 if self.transmitted else float(scale**2)
        f = self.preset.high_quality_factor
        return (1 if self.transmitted else f**2) / self.preset.high_quality_dwell

    def target(self, t_s: float, xy: tuple[float, float], scale: int, kind: str,
               rng: np.random.Generator, *, angle: float = 0.0, rig: RigDraw | None = None,
               brightness: float = 1.0) -> np.ndarray:  # fmt: skip
        """The in-focus target at ``scale`` in raw-equivalent ADU: the slow high-quality scan
        (``kind="high-quality"``), that scan's noise-free expectation (``"expected"``: what a
        perfect estimator of the slow scan returns; ``rng`` unused) or the noise-free image on
        the fast scan's optics at ``scale`` x finer pixels (``"clean"``). ``angle``, ``rig`` and
        ``brightness`` as for :meth:`low`; with a rig the ADU are that rig's camera's (scalar
        offset: the slow scan gets no column pattern)."""
        fast = self.fast if rig is None else rig.model(self.fast)
        slow = self.slow if rig is None else rig.model(self.slow, scan=False)
        dwell0 = self.dwell if rig is None else self.dwell * brightness
        offset, k = fast.camera.offset_adu, self.target_gain(kind, scale)
        if kind == "clean":
            model = fast.model_copy(update={
                "scan": fast.scan.model_copy(update={"bidirectional": False}),
                "pixel_size_um": fast.pixel_size_um / scale,
            })  # fmt: skip
            adu = model.expected_adu(self.fine(t_s, xy, model, dwell0, scale, angle))
            return raw_equivalent(self.crop(adu, scale), offset, k)
        f, dwell = self.preset.high_quality_factor, self.preset.high_quality_dwell
        photons = self.fine(t_s, xy, slow, dwell0 * dwell, f, angle)
        hq = slow.expected_adu(photons) if kind == "expected" else slow.record(photons, rng)
        return raw_equivalent(bin_mean(self.crop(hq, f), f // scale), offset, k)

    def clean(self, t_s: float, xy: tuple[float, float], scale: int) -> np.ndarray:
        """The specimen itself (no blur, no noise) on the target grid, raw-equivalent ADU."""
        model = self.fast.model_copy(
            update={"scan": self.fast.scan.model_copy(update={"downsample": scale})}
        )
        photons = self.fine(t_s, xy, model, self.dwell, 1)
        k = self.fast.scan.downsample**2 if self.transmitted else scale**2
        cam = self.fast.camera
        photons *= np.float32(k * cam.gain_adu_per_electron * cam.quantum_efficiency)
        return photons + np.float32(cam.offset_adu)
