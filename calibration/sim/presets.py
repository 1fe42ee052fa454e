"""The table of simulated rigs (:data:`PRESETS`): a new rig is one :func:`register_preset` row.

- ``confocal-20fps``: 256x256 uint16 video-rate bidirectional scan, shot-noise limited; its
  slow high-quality scan renders the same instant at 512x512.
- ``celldiscoverer``: 2048x2048 uint16 brightfield of a well plate, with a focal plane that
  drifts (plate tilt + thermal drift), so frames at a fixed z are sometimes out of focus.
"""

from __future__ import annotations

from calibration.camera import CameraParams
from calibration.optics import OpticsParams
from calibration.scan import ScanParams

from .scene import ChannelSpec, FocusDrift, Preset

PRESETS: dict[str, Preset] = {}
"""Simulated rigs by name."""


def register_preset(preset: Preset) -> Preset:
    """Add ``preset`` to :data:`PRESETS` under its name; ValueError if the name is taken."""
    if not isinstance(preset, Preset):
        raise ValueError(f"register_preset takes a Preset, got {type(preset).__name__}")
    if preset.name in PRESETS:
        raise ValueError(
            f"preset {preset.name!r} is already registered; choose another name "
            f"(registered: {', '.join(PRESETS)})"
        )
    PRESETS[preset.name] = preset
    return preset


def get_preset(name: str) -> Preset:
    """The named preset, or a ValueError listing the ones there are."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


register_preset(
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
    )
)
register_preset(
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
            "BF": ChannelSpec(specimen="brightfield-cells", photons_per_ms=0.5, wavelength_nm=550),
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
    )
)
