"""The simulator's extension tables: a new specimen kind or rig is one row, and mistakes in a row
(a duplicate name, an unknown specimen kind) are refused with a clear message."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from pydantic import ValidationError

from calibration.sim.presets import PRESETS, get_preset, register_preset
from calibration.sim.scene import ChannelSpec, Scene
from calibration.sim.specimen import (
    SPECIMEN_KINDS,
    UniformSlide,
    View,
    get_specimen_kind,
    register_specimen,
)

KIND = "toy-stripes"
PRESET = "toy-rig"


class Stripes:
    """Vertical fluorescent stripes, two pixels wide at 0.1 um, that do not move."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def render(self, t_s: float, view: View) -> np.ndarray:
        x0, _ = view.origin_um
        xs = x0 + view.pixel_size_um * np.arange(view.shape[1])
        row = np.where(np.floor(xs / 0.2) % 2 == 0, 4.0, 0.5).astype(np.float32)
        return np.broadcast_to(row, view.shape).copy()


@pytest.fixture
def toy() -> Iterator[None]:
    """One specimen-kind row and one preset row, removed again after the test."""
    register_specimen(KIND, Stripes, description="test stripes")
    base = get_preset("confocal-20fps")
    register_preset(
        base.model_copy(
            update={
                "name": PRESET,
                "shape": (32, 32),
                "channels": {
                    "GFP": ChannelSpec(specimen=KIND, photons_per_ms=2.0, wavelength_nm=510)
                },
            }
        )
    )
    yield
    PRESETS.pop(PRESET, None)
    SPECIMEN_KINDS.pop(KIND, None)


@pytest.mark.usefixtures("toy")
def test_a_scene_renders_a_registered_kind_on_a_registered_preset() -> None:
    preset = get_preset(PRESET)
    kind = get_specimen_kind(KIND)
    assert kind.factory is Stripes and not kind.transmitted and kind.flat_level == 1.0
    scene = Scene(preset, seed=3)
    specimen = scene.specimen("GFP")
    assert isinstance(specimen, Stripes) and specimen.seed == 3
    fine = scene.fine_photons(0.0, "GFP", preset.exposure_ms, (0.0, 0.0))
    assert fine.shape == (64, 64)  # the confocal scan's 2x fine grid
    assert set(np.unique(fine)) == {np.float32(0.5 * 2.0 * 30), np.float32(4.0 * 2.0 * 30)}
    frame = np.empty(preset.shape, np.uint16)
    scene.record(frame, t_s=0.0, channel="GFP", exposure_ms=preset.exposure_ms,
                 xyz_um=(0.0, 0.0, 0.0))  # fmt: skip
    assert frame.shape == (32, 32) and frame.mean() > preset.camera.offset_adu
    scene.sample = "Flat"  # calibration slides follow the kind's light: fluorescence here
    flat = scene.specimen("GFP")
    assert isinstance(flat, UniformSlide) and flat.per_area and flat.level == 1.0


def test_the_built_in_kinds_say_which_light_they_are_seen_in() -> None:
    assert not get_specimen_kind("filaments-and-nuclei").transmitted
    assert not get_specimen_kind("nuclei").transmitted
    bright = get_specimen_kind("brightfield-cells")
    assert bright.transmitted and bright.flat_level == 1000.0
    scene = Scene(get_preset("celldiscoverer"))
    scene.sample = "Flat"
    flat = scene.specimen("BF")
    assert isinstance(flat, UniformSlide) and not flat.per_area and flat.level == 1000.0


@pytest.mark.usefixtures("toy")
def test_duplicates_are_refused() -> None:
    with pytest.raises(ValueError, match=f"specimen kind '{KIND}' is already registered"):
        register_specimen(KIND, Stripes)
    with pytest.raises(ValueError, match="specimen kind 'nuclei' is already registered"):
        register_specimen("nuclei", Stripes)
    with pytest.raises(ValueError, match=f"preset '{PRESET}' is already registered"):
        register_preset(get_preset(PRESET))
    with pytest.raises(ValueError, match="preset 'confocal-20fps' is already registered"):
        register_preset(get_preset("confocal-20fps"))
    assert SPECIMEN_KINDS[KIND].factory is Stripes  # the first row stays


def test_unknown_kinds_and_presets_name_the_known_ones() -> None:
    with pytest.raises(ValidationError, match=r"unknown specimen kind 'plankton'.*nuclei"):
        ChannelSpec(specimen="plankton", photons_per_ms=1.0, wavelength_nm=500)
    with pytest.raises(ValueError, match=r"unknown specimen kind 'plankton'; known kinds: .*"
                       "brightfield-cells"):  # fmt: skip
        get_specimen_kind("plankton")
    with pytest.raises(ValueError, match=r"unknown preset 'nope'; choose one of: confocal-20fps"):
        get_preset("nope")
    with pytest.raises(ValueError, match="factory must be callable"):
        register_specimen("not-callable", "Stripes")  # type: ignore[arg-type]
    assert "not-callable" not in SPECIMEN_KINDS


@pytest.mark.parametrize("kind", ["puncta", "membranes"])
def test_shipped_new_kinds_image_through_a_rig(kind: str) -> None:
    base = get_preset("confocal-20fps")
    preset = base.model_copy(update={
        "name": f"toy-{kind}", "shape": (32, 32),
        "channels": {"GFP": ChannelSpec(specimen=kind, photons_per_ms=2.0, wavelength_nm=510)},
    })  # fmt: skip
    scene = Scene(preset, seed=1)
    out = np.empty((32, 32), np.uint16)
    scene.record(out, t_s=1.0, channel="GFP", exposure_ms=preset.exposure_ms, xyz_um=(0, 0, 0))
    assert out.max() > preset.camera.offset_adu
