"""True image pairs from the simulated microscope on any field of view: the fast scan, the
slow high-quality scan (or the noise-free image) of the same instant, in raw-equivalent ADU.

Training (``engines.train.data``) and the quality benchmark (``bench.quality``) both render
with this one class; only where and when they draw fields differs. A field smaller than the
full frame is rendered with an even margin (scan-line parity kept) that is cut off again, so
PSF and line-phase edges match the inside of a full frame.
"""

from __future__ import annotations

import math

import numpy as np

from calibration.forward import ForwardModel
from calibration.optics import psf_kernel
from engines.pairs import bin_mean

from .simulated import Preset, Scene
from .specimen import View


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
        self.transmitted = self.spec.specimen == "brightfield-cells"
        self.fast: ForwardModel = self.scene.forward_model(self.channel)
        self.slow: ForwardModel = self.scene.forward_model(self.channel, high_quality=True)
        self.dwell = preset.exposure_ms * self.spec.photons_per_ms
        self.shape = (field, field) if field else preset.shape
        self.margin = 0
        if field:
            size = psf_kernel(self.fast.optics, preset.pixel_size_um, max_defocus_um).shape[0]
            m = size // 2 + 2 + math.ceil(abs(preset.scan.phase_px))
            self.margin = m + m % 2

    def fine(self, t_s: float, xy: tuple[float, float], model: ForwardModel, dwell: float,
             grid: int) -> np.ndarray:  # fmt: skip
        """Photons on ``model``'s fine grid for the field (margin included) at ``grid`` x the
        fast pixel density, exactly as ``Scene.fine_photons`` renders a full frame."""
        d, m = model.scan.downsample, self.margin
        rows, cols = ((n + 2 * m) * grid * d for n in self.shape)
        view = View(shape=(rows, cols), pixel_size_um=model.fine_pixel_size_um, center_um=xy)
        return self.scene.specimen(self.channel).render(t_s, view) * np.float32(dwell)

    def crop(self, image: np.ndarray, grid: int) -> np.ndarray:
        """Cut the margin off an image on a grid ``grid`` x finer than the fast scan."""
        m = self.margin * grid
        return image[m : image.shape[0] - m, m : image.shape[1] - m] if m else image

    def low(self, t_s: float, xy: tuple[float, float], rng: np.random.Generator,
            dz: float = 0.0) -> np.ndarray:  # fmt: skip
        """One noisy fast-scan frame (uint16) at defocus ``dz``."""
        frame = self.fast.record(self.fine(t_s, xy, self.fast, self.dwell, 1), rng, z_um=dz)
        return self.crop(frame, 1)

    def target_gain(self, kind: str, scale: int) -> float:
        """``k`` taking the target's ADU to raw-equivalent ADU: photons per pixel scale with
        pixel area in fluorescence (not in transmitted light) and with the dwell."""
        if kind == "clean":
            return 1.0 if self.transmitted else float(scale**2)
        f = self.preset.high_quality_factor
        return (1 if self.transmitted else f**2) / self.preset.high_quality_dwell

    def target(self, t_s: float, xy: tuple[float, float], scale: int, kind: str,
               rng: np.random.Generator) -> np.ndarray:  # fmt: skip
        """The in-focus target at ``scale`` in raw-equivalent ADU: the slow high-quality scan
        (``kind="high-quality"``), that scan's noise-free expectation (``"expected"``: what a
        perfect estimator of the slow scan returns; ``rng`` unused) or the noise-free image on
        the fast scan's optics at ``scale`` x finer pixels (``"clean"``)."""
        offset, k = self.fast.camera.offset_adu, self.target_gain(kind, scale)
        if kind == "clean":
            model = self.fast.model_copy(update={
                "scan": self.fast.scan.model_copy(update={"bidirectional": False}),
                "pixel_size_um": self.fast.pixel_size_um / scale,
            })  # fmt: skip
            adu = model.expected_adu(self.fine(t_s, xy, model, self.dwell, scale))
            return raw_equivalent(self.crop(adu, scale), offset, k)
        f, dwell = self.preset.high_quality_factor, self.preset.high_quality_dwell
        photons = self.fine(t_s, xy, self.slow, self.dwell * dwell, f)
        if kind == "expected":
            hq = self.slow.expected_adu(photons)
        else:
            hq = self.slow.record(photons, rng)
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
