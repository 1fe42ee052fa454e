"""The simulated microscope: real pymmcore-plus (UniMMCore + Python devices) imaging a moving
specimen through the calibration forward model.

Two presets mirror the rigs scopecast serves:

- ``confocal-20fps``: 256x256 uint16 video-rate bidirectional scan, shot-noise limited;
  :meth:`SimulatedMicroscope.high_quality` renders the same instant as the slow 512x512 scan.
- ``celldiscoverer``: 2048x2048 uint16 brightfield of a well plate, with a focal plane that
  drifts (plate tilt + thermal drift), so frames at a fixed z are sometimes out of focus.

Any useq ``MDASequence`` (time, positions, grid, z, channels) runs on it. The specimen clock
is the simulated time since the microscope was built, ``time_scale`` times real time.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import useq
from pydantic import BaseModel, ConfigDict, Field
from pymmcore_plus.experimental.unicore import (
    ShutterDevice,
    SimpleCameraDevice,
    StageDevice,
    StateDevice,
    UniMMCore,
    XYStageDevice,
)

from calibration import CameraParams, ForwardModel, OpticsParams, ScanParams
from calibration.profile import CalibrationProfile

from .specimen import (
    BeadSlide,
    BrightfieldSpecimen,
    FluorescentSpecimen,
    Specimen,
    UniformSlide,
    View,
)

if TYPE_CHECKING:
    from collections.abc import Mapping


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
    """One channel config: what it images and how bright it is."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    specimen: Literal["filaments-and-nuclei", "nuclei", "brightfield-cells"]
    photons_per_ms: float = Field(gt=0, description="specimen brightness scale per ms exposure")
    wavelength_nm: float


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
        kw: dict[str, Any] = {
            "time_plan": time_plan(duration_s, interval_s or self.frame_interval_s),
            "channels": [{"config": next(iter(self.channels)), "exposure": self.exposure_ms}],
            "stage_positions": self.positions,
            "axis_order": "tpgcz",
        }
        return useq.MDASequence(**{**kw, **overrides})


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="confocal-20fps",
            description="256x256 video-rate bidirectional confocal scan, shot-noise limited",
            engine="confocal-denoise-sr2x",
            shape=(256, 256),
            pixel_size_um=0.1,
            exposure_ms=30.0,
            frame_interval_s=0.05,
            channels={
                "FITC": ChannelSpec(
                    specimen="filaments-and-nuclei", photons_per_ms=1.0, wavelength_nm=520
                ),
                "DAPI": ChannelSpec(specimen="nuclei", photons_per_ms=1.0, wavelength_nm=460),
            },
            camera=CameraParams(
                offset_adu=50,
                gain_adu_per_electron=8.0,
                read_noise_electrons=0.3,
                quantum_efficiency=0.45,
                bit_depth=12,
            ),
            optics=OpticsParams(na=1.2, wavelength_nm=520, refractive_index=1.33),
            scan=ScanParams(downsample=2, bidirectional=True, phase_px=0.6),
            high_quality_factor=2,
            high_quality_dwell=16.0,
        ),
        Preset(
            name="celldiscoverer",
            description="2048x2048 brightfield well plate, multi-position time-lapse, focus drift",
            engine="brightfield-deblur",
            beads_per_100um2=0.005,  # about 25 beads in the 0.7 mm field: isolated out of focus
            shape=(2048, 2048),
            pixel_size_um=0.345,
            exposure_ms=10.0,
            frame_interval_s=2.0,  # 20 simulated minutes between time points
            channels={
                "BF": ChannelSpec(
                    specimen="brightfield-cells", photons_per_ms=0.5, wavelength_nm=550
                ),
            },
            camera=CameraParams(
                offset_adu=100,
                gain_adu_per_electron=0.5,
                read_noise_electrons=1.6,
                quantum_efficiency=0.8,
                bit_depth=16,
            ),
            optics=OpticsParams(na=0.35, wavelength_nm=550, refractive_index=1.0),
            scan=ScanParams(),
            focus=FocusDrift(
                tilt_um_per_mm=(1.5, -1.0), amplitude_um=4.0, period_s=3 * 3600, creep_um_per_h=1.0
            ),
            time_scale=600.0,
            # wells A1, A2, B1 of a 96-well plate (9 mm pitch), centred on A1
            positions=[(0.0, 0.0, 0.0), (9000.0, 0.0, 0.0), (0.0, 9000.0, 0.0)],
        ),
    )
}


def get_preset(name: str) -> Preset:
    """The named preset, or a ValueError listing the ones there are."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


class Scene:
    """The sample and the light path: renders what the camera records at (t, x, y, z, channel)."""

    def __init__(self, preset: Preset, seed: int = 0) -> None:
        self.preset = preset
        self.seed = seed
        self._specimens: dict[tuple[str, str], Specimen] = {}
        self.sample: str = "Specimen"  # which slide is on the stage: see SAMPLES
        self._models: dict[tuple[str, bool], ForwardModel] = {}
        self._rng = np.random.default_rng(seed)
        self._t0 = time.monotonic()

    def now(self) -> float:
        """Simulated seconds since the microscope started."""
        return (time.monotonic() - self._t0) * self.preset.time_scale

    def specimen(self, channel: str) -> Specimen:
        """What ``channel`` sees with the slide in :attr:`sample` on the stage."""
        spec = self._channel(channel)
        key = (self.sample, channel)
        if key not in self._specimens:
            transmitted = spec.specimen == "brightfield-cells"
            if self.sample == "Flat":
                level = BrightfieldSpecimen().illumination_photons if transmitted else 1.0
                self._specimens[key] = UniformSlide(level, per_area=not transmitted)
            elif self.sample == "Beads":
                self._specimens[key] = BeadSlide(
                    self.seed, beads_per_100um2=self.preset.beads_per_100um2
                )
            elif transmitted:
                self._specimens[key] = BrightfieldSpecimen(self.seed)
            else:
                n_fil = 0 if spec.specimen == "nuclei" else 25
                self._specimens[key] = FluorescentSpecimen(self.seed, n_filaments=n_fil)
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


# -- Python devices ---------------------------------------------------------------------------


class SimXYStage(XYStageDevice):
    """XY stage that moves instantly."""

    def __init__(self) -> None:
        super().__init__()
        self._xy = (0.0, 0.0)

    def set_position_um(self, x: float, y: float) -> None:
        self._xy = (float(x), float(y))

    def get_position_um(self) -> tuple[float, float]:
        return self._xy

    def set_origin_x(self) -> None:
        self._xy = (0.0, self._xy[1])

    def set_origin_y(self) -> None:
        self._xy = (self._xy[0], 0.0)

    def home(self) -> None:
        self._xy = (0.0, 0.0)

    def stop(self) -> None:
        pass


class SimZStage(StageDevice):
    """Focus drive that moves instantly."""

    def __init__(self) -> None:
        super().__init__()
        self._z = 0.0

    def set_position_um(self, val: float) -> None:
        self._z = float(val)

    def get_position_um(self) -> float:
        return self._z

    def home(self) -> None:
        self._z = 0.0

    def stop(self) -> None:
        pass

    def set_origin(self) -> None:
        self._z = 0.0


class SimShutter(ShutterDevice):
    """Light-source shutter; open by default. Closed, the camera records dark frames."""

    def __init__(self) -> None:
        super().__init__()
        self._open = True

    def get_open(self) -> bool:
        return self._open

    def set_open(self, open: bool) -> None:
        self._open = bool(open)


class SimFilterWheel(StateDevice):
    """Selects the channel: one state per channel of the preset."""

    def __init__(self, labels: list[str]) -> None:
        super().__init__(dict(enumerate(labels)))
        self._state = 0

    def get_state(self) -> int:
        return self._state

    def set_state(self, position: int) -> None:
        self._state = int(position)


SAMPLES = ("Specimen", "Flat", "Beads")


class SimSample(StateDevice):
    """The slide on the stage: the preset's specimen, a flat-field slide (uniform fluorescence,
    or an empty well in transmitted light) or sub-resolution beads, for calibration."""

    def __init__(self, scene: Scene) -> None:
        super().__init__(dict(enumerate(SAMPLES)))
        self.scene = scene

    def get_state(self) -> int:
        return SAMPLES.index(self.scene.sample)

    def set_state(self, position: int) -> None:
        self.scene.sample = SAMPLES[int(position)]


class SimCamera(SimpleCameraDevice):
    """Camera that renders the scene at the current stage position, channel and time.

    A snap takes at least the exposure time, as a real sensor integrates for that long.
    """

    def __init__(
        self, scene: Scene, xy: SimXYStage, z: SimZStage, shutter: SimShutter, wheel: SimFilterWheel
    ) -> None:
        super().__init__()
        self.scene, self._xy, self._z, self._shutter, self._wheel = scene, xy, z, shutter, wheel
        self._exposure = scene.preset.exposure_ms

    def sensor_shape(self) -> tuple[int, int]:
        return self.scene.preset.shape

    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16)

    def get_exposure(self) -> float:
        return self._exposure

    def set_exposure(self, exposure: float) -> None:
        if not exposure > 0:
            raise ValueError(f"exposure {exposure} ms must be > 0")
        self._exposure = float(exposure)

    def snap(self, buffer: np.ndarray) -> Mapping:
        start = time.monotonic()
        t = self.scene.now()
        x, y = self._xy.get_position_um()
        channel = self._wheel.get_property_value("Label")
        self.scene.record(
            buffer,
            t_s=t,
            channel=channel,
            exposure_ms=self._exposure,
            xyz_um=(x, y, self._z.get_position_um()),
            lit=self._shutter.get_open(),
        )
        if (left := self._exposure / 1000 - (time.monotonic() - start)) > 0:
            time.sleep(left)
        return {"SimulatedTime_s": f"{t:.4f}", "Channel": channel}


class SimulatedMicroscope:
    """A ready-to-run UniMMCore with the simulated camera, stages, shutter and filter wheel."""

    def __init__(
        self,
        preset: str | Preset = "confocal-20fps",
        *,
        seed: int = 0,
        profile: CalibrationProfile | None = None,
    ) -> None:
        """``profile`` (a measured rig's calibration) replaces the preset's camera, optics and
        scan, so the simulator images with that rig's noise and resolution."""
        logging.getLogger("pymmcore-plus").setLevel(logging.CRITICAL)  # no Micro-Manager needed
        self.preset = get_preset(preset) if isinstance(preset, str) else preset
        if profile is not None:
            self.preset = self.preset.with_profile(profile)
        self.scene = Scene(self.preset, seed)
        channels = list(self.preset.channels)
        self.xy, self.z, self.shutter = SimXYStage(), SimZStage(), SimShutter()
        self.wheel = SimFilterWheel(channels)
        self.sample = SimSample(self.scene)
        self.camera = SimCamera(self.scene, self.xy, self.z, self.shutter, self.wheel)
        core = UniMMCore()
        for label, dev in (
            ("Camera", self.camera),
            ("XY", self.xy),
            ("Z", self.z),
            ("Shutter", self.shutter),
            ("Filter", self.wheel),
            ("Sample", self.sample),
        ):
            core.loadPyDevice(label, dev)
        core.initializeAllDevices()
        core.setCameraDevice("Camera")
        core.setXYStageDevice("XY")
        core.setFocusDevice("Z")
        core.setShutterDevice("Shutter")
        core.setAutoShutter(False)  # UniMMCore does not drive Python shutters around snaps
        for ch in channels:
            core.defineConfig("Channel", ch, "Filter", "Label", ch)
        core.setChannelGroup("Channel")
        core.setConfig("Channel", channels[0])
        core.definePixelSizeConfig("sim")
        core.setPixelSizeUm("sim", self.preset.pixel_size_um)
        core.setExposure(self.preset.exposure_ms)
        self.core = core

    def high_quality(
        self,
        t_s: float,
        channel: str | None = None,
        xy_um: tuple[float, float] = (0.0, 0.0),
        *,
        seed: int | None = None,
    ) -> np.ndarray:
        """The slow high-quality scan of the same scene at simulated time ``t_s`` (true pair)."""
        channel = channel or next(iter(self.preset.channels))
        model = self.scene.forward_model(channel, high_quality=True)
        fine = self.scene.fine_photons(
            t_s, channel, self.preset.exposure_ms, xy_um, high_quality=True
        )
        return model.record(fine, np.random.default_rng(seed))
