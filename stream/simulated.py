"""The simulated microscope: real pymmcore-plus (UniMMCore + Python devices) imaging a moving
specimen through the calibration forward model.

The physics (specimens, rigs, scenes) is ``calibration.sim``; this module is only the devices.
Its presets (``calibration.sim.PRESETS``) mirror the rigs scopecast serves:

- ``confocal-20fps``: 256x256 uint16 video-rate bidirectional scan, shot-noise limited;
  :meth:`SimulatedMicroscope.high_quality` renders the same instant as the slow 512x512 scan.
- ``celldiscoverer``: 2048x2048 uint16 brightfield of a well plate, with a focal plane that
  drifts (plate tilt + thermal drift), so frames at a fixed z are sometimes out of focus.

Any useq ``MDASequence`` (time, positions, grid, z, channels) runs on it. The specimen clock
is the simulated time since the microscope was built, ``time_scale`` times real time.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
from pymmcore_plus.experimental.unicore import (
    ShutterDevice,
    SimpleCameraDevice,
    StageDevice,
    StateDevice,
    UniMMCore,
    XYStageDevice,
)

from calibration.sim.presets import get_preset
from calibration.sim.scene import Preset, Scene

if TYPE_CHECKING:
    from collections.abc import Mapping

    from calibration.profile import CalibrationProfile


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
