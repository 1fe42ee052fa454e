"""The simulated instrument's physics: what a rig is (:class:`Preset`: sensor, optics, scan,
channels, focus drift, timing) and what it records (:class:`Scene`: the specimen on the stage
through the calibration forward model, at any time, stage position, focus and channel).

Torch-free and device-free: ``stream.simulated`` wraps a Scene in pymmcore-plus devices, and
training and the benchmarks render pairs from it (``calibration.sim.pairs``).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from calibration.camera import CameraParams
from calibration.forward import ForwardModel
from calibration.optics import OpticsParams
from calibration.scan import ScanParams

from .specimen import (
    BeadSlide,
    Specimen,
    SpecimenKind,
    UniformSlide,
    View,
    get_specimen_kind,
)

if TYPE_CHECKING:
    import useq

    from calibration.profile import CalibrationProfile


def time_plan(duration_s: float, interval_s: float) -> dict[str, float]:
    """A useq time plan of about ``duration_s`` at ``interval_s`` (at least one time point)."""
    return {"interval": interval_s, "loops": max(1, round(duration_s / interval_s))}


class FocusDrift(BaseModel):
    """Where the true focal plane is: plate tilt plus a slow thermal oscillation and creep."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    tilt_um_per_mm: tuple[float, float] = (0.0, 0.0)
    amplitude_um: float = 0.0
    period_s: float = 7200.0
    creep_um_per_h: float = 0.0

    def focus_z(self, t_s: float, x_um: float, y_um: float) -> float:
        tx, ty = self.tilt_um_per_mm
        return (
            tx * x_um / 1000
            + ty * y_um / 1000
            + self.amplitude_um * math.sin(2 * math.pi * t_s / self.period_s)
            + self.creep_um_per_h * t_s / 3600
        )


class ChannelSpec(BaseModel):
    """One channel config: what it images (a row of ``SPECIMEN_KINDS``) and how bright it is."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    specimen: str = Field(description="specimen kind: a name in calibration.sim.SPECIMEN_KINDS")
    photons_per_ms: float = Field(gt=0, description="specimen brightness scale per ms exposure")
    wavelength_nm: float

    @field_validator("specimen")
    @classmethod
    def _known_kind(cls, name: str) -> str:
        get_specimen_kind(name)  # ValueError naming the bad kind and the known ones
        return name

    @property
    def kind(self) -> SpecimenKind:
        """The specimen kind's row: its factory and whether it is seen in transmitted light."""
        return get_specimen_kind(self.specimen)


class Preset(BaseModel):
    """A simulated rig: sensor, optics, scan, specimen, timing."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    description: str
    shape: tuple[int, int]
    pixel_size_um: float
    exposure_ms: float
    frame_interval_s: float = Field(description="default time-lapse interval")
    channels: dict[str, ChannelSpec]
    camera: CameraParams
    optics: OpticsParams
    scan: ScanParams
    focus: FocusDrift = FocusDrift()
    time_scale: float = Field(1.0, gt=0, description="simulated seconds per real second")
    high_quality_factor: int = Field(1, ge=1, description="slow scan: pixels per side vs fast")
    high_quality_dwell: float = Field(1.0, gt=0, description="slow scan: photons vs fast scan")
    positions: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)]
    engine: str = Field("identity", description="engine `scopecast demo` runs on this rig")
    beads_per_100um2: float = Field(4.0, gt=0, description="bead slide density (calibration)")

    def with_profile(self, profile: CalibrationProfile) -> Preset:
        """This rig with a measured profile's camera, optics, scan and pixel size."""
        return self.model_copy(
            update={
                "camera": profile.camera,
                "optics": profile.optics,
                "scan": profile.scan.model_copy(update={"downsample": self.scan.downsample}),
                "pixel_size_um": profile.pixel_size_um,
            }
        )

    def sequence(
        self, duration_s: float, interval_s: float | None = None, **overrides: Any
    ) -> useq.MDASequence:
        """The preset's default acquisition lasting about ``duration_s``."""
        import useq  # the acquisition side's; the physics does not need it

        kw: dict[str, Any] = {
            "time_plan": time_plan(duration_s, interval_s or self.frame_interval_s),
            "channels": [{"config": next(iter(self.channels)), "exposure": self.exposure_ms}],
            "stage_positions": self.positions,
            "axis_order": "tpgcz",
        }
        return useq.MDASequence(**{**kw, **overrides})


class Scene:
    """The sample and the light path: renders what the camera records at (t, x, y, z, channel)."""

    def __init__(self, preset: Preset, seed: int = 0) -> None:
        self.preset = preset
        self.seed = seed
        self._specimens: dict[tuple[str, str], Specimen] = {}
        self.sample: str = "Specimen"  # which slide is on the stage: Specimen, Flat or Beads
        self._models: dict[tuple[str, bool], ForwardModel] = {}
        self._rng = np.random.default_rng(seed)
        self._t0 = time.monotonic()

    def now(self) -> float:
        """Simulated seconds since the microscope started."""
        return (time.monotonic() - self._t0) * self.preset.time_scale

    def specimen(self, channel: str) -> Specimen:
        """What ``channel`` sees with the slide in :attr:`sample` on the stage."""
        kind = self._channel(channel).kind
        key = (self.sample, channel)
        if key not in self._specimens:
            if self.sample == "Flat":
                self._specimens[key] = UniformSlide(kind.flat_level, per_area=not kind.transmitted)
            elif self.sample == "Beads":
                self._specimens[key] = BeadSlide(
                    self.seed, beads_per_100um2=self.preset.beads_per_100um2
                )
            else:
                self._specimens[key] = kind.factory(self.seed)
        return self._specimens[key]

    def forward_model(self, channel: str, *, high_quality: bool = False) -> ForwardModel:
        """The light path of ``channel``: the fast scan, or the slow high-quality one."""
        if (channel, high_quality) not in self._models:
            p, spec = self.preset, self._channel(channel)
            factor = p.high_quality_factor if high_quality else 1
            scan = p.scan.model_copy(update={"bidirectional": False}) if high_quality else p.scan
            self._models[channel, high_quality] = ForwardModel(
                camera=p.camera,
                optics=p.optics.model_copy(update={"wavelength_nm": spec.wavelength_nm}),
                scan=scan,
                pixel_size_um=p.pixel_size_um / factor,
            )
        return self._models[channel, high_quality]

    def fine_photons(
        self,
        t_s: float,
        channel: str,
        exposure_ms: float,
        xy_um: tuple[float, float],
        *,
        high_quality: bool = False,
    ) -> np.ndarray:
        """Expected photons on the forward model's fine grid (before blur, scan and camera)."""
        model = self.forward_model(channel, high_quality=high_quality)
        factor = self.preset.high_quality_factor if high_quality else 1
        rows, cols = (s * factor * model.scan.downsample for s in self.preset.shape)
        view = View(shape=(rows, cols), pixel_size_um=model.fine_pixel_size_um, center_um=xy_um)
        dwell = exposure_ms * self._channel(channel).photons_per_ms
        if high_quality:
            dwell *= self.preset.high_quality_dwell
        return self.specimen(channel).render(t_s, view) * np.float32(dwell)

    def record(
        self,
        out: np.ndarray,
        *,
        t_s: float,
        channel: str,
        exposure_ms: float,
        xyz_um: tuple[float, float, float],
        lit: bool = True,
    ) -> None:
        """Fill ``out`` with the frame the camera records."""
        x, y, z = xyz_um
        model = self.forward_model(channel)
        if lit:
            fine = self.fine_photons(t_s, channel, exposure_ms, (x, y))
            # the specimen's plate tilts and drifts; calibration slides lie flat at z = 0
            focus = self.preset.focus.focus_z(t_s, x, y) if self.sample == "Specimen" else 0.0
        else:
            fine = np.zeros([s * model.scan.downsample for s in self.preset.shape], np.float32)
            focus = z
        model.record(fine, self._rng, z_um=z - focus, out=out)

    def _channel(self, channel: str) -> ChannelSpec:
        try:
            return self.preset.channels[channel]
        except KeyError:
            raise ValueError(
                f"channel {channel!r} is not in preset {self.preset.name!r}; "
                f"use one of {sorted(self.preset.channels)}"
            ) from None
