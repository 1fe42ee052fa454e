"""Moving the stage between frames, and domain randomization over the rig: what simulated
training sequences (``engines.train.data``) and the quality benchmark's motion sweep
(``bench.quality``) share. Torch-free.

:class:`StageMotion` moves the field of view between the frames of a sequence: a translation
along a direction at a constant step per frame and a rotation about the field's centre; frame
``k`` (0: the scored, newest frame; negative: earlier ones) is seen at ``center(xy, k)``, turned
by ``angle(k)``, so the scored frame and its target sit where they would without motion.
:func:`render_posed` renders a specimen through such a turned view.

:class:`MotionRanges` and :class:`RigRanges` are the opt-in training-config sections
(``motion:``, ``rig:``) that draw one :class:`StageMotion` per sequence and one
:class:`RigDraw` (camera gain, read noise, offset and column pattern, PSF width, photon budget,
bidirectional line phase) per sample, from seeded generators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from scipy import ndimage

from calibration.camera import CameraParams
from calibration.forward import ForwardModel
from calibration.units import Electrons

from .specimen import Specimen, View

Range = tuple[float, float]


# -- motion -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageMotion:
    """A field of view moving ``step_um`` per frame along the unit ``direction`` (x, y) and
    turning ``rotation_rad`` per frame about its centre."""

    step_um: float = 0.0
    direction: tuple[float, float] = (1.0, 0.0)
    rotation_rad: float = 0.0

    def center(self, xy: tuple[float, float], k: float) -> tuple[float, float]:
        """The field centre ``k`` frames after ``xy`` (negative: before)."""
        dx, dy = self.direction
        return xy[0] + k * self.step_um * dx, xy[1] + k * self.step_um * dy

    def angle(self, k: float) -> float:
        """The field's rotation ``k`` frames after the reference frame, in radians."""
        return k * self.rotation_rad


def render_posed(specimen: Specimen, t_s: float, view: View, angle_rad: float = 0.0) -> np.ndarray:
    """``specimen`` through ``view`` turned by ``angle_rad`` about its centre (counter-clockwise
    from x towards y): rendered on a larger axis-aligned view with the same pixel grid and
    resampled linearly. ``angle_rad == 0`` is exactly ``specimen.render(t_s, view)``."""
    if angle_rad == 0:
        return specimen.render(t_s, view)
    rows, cols = view.shape
    pad = math.ceil(0.5 * (math.hypot(rows, cols) - min(rows, cols))) + 2
    big = View((rows + 2 * pad, cols + 2 * pad), view.pixel_size_um, view.center_um)
    image = np.asarray(specimen.render(t_s, big), np.float32)
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    matrix = np.array([[c, s], [-s, c]])
    centre_out = np.array([(rows - 1) / 2, (cols - 1) / 2])
    centre_in = np.array([(rows - 1) / 2 + pad, (cols - 1) / 2 + pad])
    out = ndimage.affine_transform(image, matrix, centre_in - matrix @ centre_out,
                                   output_shape=(rows, cols), order=1, mode="nearest")  # fmt: skip
    return np.maximum(out, 0, out=out).astype(np.float32, copy=False)


def _check_range(name: str, v: Range | None, low: float, high: float = math.inf) -> Range | None:
    if v is None:
        return None
    lo, hi = v
    if not (math.isfinite(lo) and math.isfinite(hi) and low <= lo <= hi <= high):
        raise ValueError(f"{name}={v} must be a range (low, high) with {low:g} <= low <= high"
                         + (f" <= {high:g}" if math.isfinite(high) else ""))  # fmt: skip
    return (float(lo), float(hi))


class MotionRanges(BaseModel):
    """``motion:`` of a training config: each simulated sequence moves at a speed uniform in
    ``[0, max_speed_px]`` output px per frame (raw px / scale) in a uniform random direction,
    and turns ``rotation_deg`` per frame, uniform in ``[-max_rotation_deg, max_rotation_deg]``;
    with chance ``still`` it stands still instead (a live field often does, and a temporal
    engine should use its history there)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    max_speed_px: float = Field(8.0, ge=0, le=64, allow_inf_nan=False)
    max_rotation_deg: float = Field(1.0, ge=0, le=45, allow_inf_nan=False)
    still: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)

    def draw(self, rng: np.random.Generator, pixel_size_um: float, scale: int) -> StageMotion:
        """One sequence's motion; ``pixel_size_um`` of the raw (fast-scan) pixels."""
        if self.still and float(rng.uniform()) < self.still:  # no draw at all when 0
            return StageMotion()
        speed = float(rng.uniform(0.0, self.max_speed_px))
        heading = float(rng.uniform(0.0, 2 * math.pi))
        turn = float(rng.uniform(-self.max_rotation_deg, self.max_rotation_deg))
        return StageMotion(speed * pixel_size_um / scale, (math.cos(heading), math.sin(heading)),
                           math.radians(turn))  # fmt: skip


# -- the rig ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RigDraw:
    """One sampled rig: applied to a preset's forward models (camera, PSF width, line phase),
    a per-column offset pattern, and the photons at the brightest pixel of the scored frame."""

    camera: CameraParams
    psf_scale: float = 1.0
    bidirectional: bool | None = None
    phase_px: float | None = None
    column_sd_adu: float = 0.0
    column_seed: int = 0
    peak_photons: float | None = None

    def model(self, base: ForwardModel, *, scan: bool = True) -> ForwardModel:
        """``base`` with this camera and PSF width (the wavelength scaled: sigma ~ lambda / NA);
        with ``scan`` also this line phase (the slow scan keeps its own unidirectional scan)."""
        optics = base.optics.model_copy(
            update={"wavelength_nm": base.optics.wavelength_nm * self.psf_scale}
        )
        update: dict[str, object] = {"camera": self.camera, "optics": optics}
        if scan:
            s = base.scan
            bidirectional = s.bidirectional if self.bidirectional is None else self.bidirectional
            phase = s.phase_px if self.phase_px is None else self.phase_px
            update["scan"] = s.model_copy(update={"bidirectional": bidirectional,
                                                  "phase_px": phase})  # fmt: skip
        return base.model_copy(update=update)

    def offset_map(self, shape: tuple[int, int]) -> np.ndarray | None:
        """The camera's offset with a fixed per-column pattern (None without one), anchored at
        the frame's centre: column ``j`` of a frame ``w`` wide is the pattern's column
        ``j - w // 2``, so a field rendered with a margin and cropped has the same pattern as
        the field itself (an even margin on each side)."""
        if self.column_sd_adu == 0:
            return None
        width = shape[1]
        if width > _PATTERN_COLUMNS:
            raise ValueError(f"frames wider than {_PATTERN_COLUMNS} px have no column pattern")
        rng = np.random.default_rng([self.column_seed, 11])
        columns = rng.normal(0, self.column_sd_adu, _PATTERN_COLUMNS)
        start = _PATTERN_COLUMNS // 2 - width // 2
        row = np.maximum(self.camera.offset_adu + columns[start : start + width], 0)
        return np.broadcast_to(row.astype(np.float32), shape).copy()

    def electrons(self, shape: tuple[int, int]) -> Electrons:
        """ADU <-> electrons of this rig's frames of ``shape`` (column offsets included)."""
        return Electrons(self.camera.offset_adu, self.camera.gain_adu_per_electron,
                         offset_map=self.offset_map(shape), source="randomized rig")  # fmt: skip


_PATTERN_COLUMNS = 16384
"""Columns of the fixed pattern a drawn rig's frames take their centre columns from."""


class RigRanges(BaseModel):
    """``rig:`` of a training config: each simulated sample is recorded by a rig drawn from these
    ranges (null: the preset's or profile's own value). Gain and photons are drawn
    log-uniformly, the rest uniformly; ``bidirectional`` is the chance the fast scan is
    bidirectional, with a line phase uniform in ``phase_px``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    gain_adu_per_electron: Range | None = (0.5, 10.0)
    read_noise_e: Range | None = (0.3, 3.0)
    offset_adu: Range | None = (20.0, 500.0)
    column_offset_sd_adu: Range | None = (0.0, 5.0)
    psf_scale: Range | None = Field((0.8, 1.5), description="PSF sigma x (via the wavelength)")
    peak_photons: Range | None = Field((5.0, 500.0), description="at the brightest pixel")
    bidirectional: float | None = Field(0.5, ge=0, le=1, description="chance of a 2-way scan")
    phase_px: Range | None = Field((-1.0, 1.0), description="line phase when bidirectional")

    @field_validator("gain_adu_per_electron", "psf_scale", "peak_photons")
    @classmethod
    def _positive(cls, v: Range | None) -> Range | None:
        r = _check_range("range", v, 0.0)
        if r is not None and r[0] <= 0:
            raise ValueError(f"range {v} must be above 0")
        return r

    @field_validator("read_noise_e", "offset_adu", "column_offset_sd_adu")
    @classmethod
    def _non_negative(cls, v: Range | None) -> Range | None:
        return _check_range("range", v, 0.0)

    @field_validator("phase_px")
    @classmethod
    def _phase(cls, v: Range | None) -> Range | None:
        return _check_range("phase_px", v, -8.0, 8.0)

    @property
    def max_psf_scale(self) -> float:
        return 1.0 if self.psf_scale is None else max(1.0, self.psf_scale[1])

    @property
    def max_phase_px(self) -> float:
        return 0.0 if self.phase_px is None else max(abs(v) for v in self.phase_px)

    def draw(self, rng: np.random.Generator, camera: CameraParams) -> RigDraw:
        """One sample's rig around the preset's ``camera``; always draws the same number of
        values from ``rng``, so one setting does not shift the others' draws."""
        u = rng.uniform(size=8)

        def pick(i: int, r: Range | None, default: float, log: bool = False) -> float:
            if r is None:
                return default
            lo, hi = (math.log(r[0]), math.log(r[1])) if log else r
            v = lo + (hi - lo) * float(u[i])
            return math.exp(v) if log else v

        cam = camera.model_copy(update={
            "gain_adu_per_electron": pick(0, self.gain_adu_per_electron,
                                          camera.gain_adu_per_electron, log=True),
            "read_noise_electrons": pick(1, self.read_noise_e, camera.read_noise_electrons),
            "offset_adu": pick(2, self.offset_adu, camera.offset_adu),
        })  # fmt: skip
        bidirectional = None if self.bidirectional is None else bool(u[6] < self.bidirectional)
        return RigDraw(
            camera=cam,
            psf_scale=pick(4, self.psf_scale, 1.0),
            bidirectional=bidirectional,
            phase_px=None if self.phase_px is None or not bidirectional else pick(7, self.phase_px,
                                                                                  0.0),
            column_sd_adu=pick(3, self.column_offset_sd_adu, 0.0),
            column_seed=int(rng.integers(2**31)),
            peak_photons=None if self.peak_photons is None else pick(5, self.peak_photons, 0.0,
                                                                     log=True),
        )  # fmt: skip


__all__ = ["MotionRanges", "RigDraw", "RigRanges", "StageMotion", "render_posed"]
