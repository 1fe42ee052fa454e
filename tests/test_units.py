"""ADU <-> electrons (calibration/units.py): one conversion, exact round trips, column offsets,
flat fields, bad pixels and super-resolved grids."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.camera import CameraParams, expected_adu
from calibration.profile import CalibrationProfile
from calibration.units import Electrons

SHAPE = (24, 32)


def _rig_maps(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    columns = rng.uniform(-12, 12, SHAPE[1]).astype(np.float32)  # sCMOS column offsets
    offset_map = (200 + columns[None, :] + rng.normal(0, 1, SHAPE)).astype(np.float32)
    flat = rng.uniform(0.8, 1.2, SHAPE).astype(np.float32)
    return offset_map, flat


def test_scalar_camera_matches_the_camera_model() -> None:
    camera = CameraParams(offset_adu=50, gain_adu_per_electron=8.0, quantum_efficiency=0.5)
    conv = Electrons.from_camera(camera)
    photons = np.random.default_rng(0).uniform(0, 100, SHAPE).astype(np.float32)
    e = conv.to_electrons(expected_adu(photons, camera))
    assert e.dtype == np.float32
    np.testing.assert_allclose(e, photons * 0.5, rtol=1e-5, atol=1e-4)
    assert conv.shape is None and "offset 50 ADU, gain 8 ADU/e-" in conv.describe()
    same = Electrons.from_camera(50, 8.0)
    np.testing.assert_array_equal(same.to_electrons(np.full(SHAPE, 90)), np.full(SHAPE, 5.0))


def test_round_trip_with_column_offsets_and_flat_field() -> None:
    rng = np.random.default_rng(1)
    offset_map, flat = _rig_maps(rng)
    camera = CameraParams(offset_adu=200, gain_adu_per_electron=2.2, quantum_efficiency=1.0)
    profile = CalibrationProfile(pixel_size_um=0.1, camera=camera).with_arrays(
        offset_map=offset_map, flat_field=flat
    )
    conv = Electrons.from_profile(profile)
    photons = rng.uniform(0, 500, SHAPE).astype(np.float32)
    adu = expected_adu(photons, camera, offset_map=offset_map, flat_field=flat)
    e = conv.to_electrons(adu)
    # the fixed pattern and the flat are gone: electrons as if every pixel were average
    np.testing.assert_allclose(e, photons, rtol=1e-4, atol=2e-3)
    np.testing.assert_allclose(conv.to_adu(e), adu, rtol=1e-5, atol=1e-3)
    raw = rng.integers(150, 4000, (3, *SHAPE)).astype(np.uint16)  # a temporal stack
    np.testing.assert_allclose(conv.to_adu(conv.to_electrons(raw)), raw, rtol=1e-5, atol=1e-3)
    assert "profile 'rig'" in conv.describe() and "offset_map" in conv.describe()


def test_super_resolved_grid_repeats_the_maps() -> None:
    rng = np.random.default_rng(2)
    offset_map, flat = _rig_maps(rng)
    conv = Electrons(200, 1.5, offset_map=offset_map, flat_field=flat)
    e = rng.uniform(0, 50, (SHAPE[0] * 2, SHAPE[1] * 2)).astype(np.float32)
    adu = conv.to_adu(e, scale=2)
    up = np.repeat(np.repeat(offset_map, 2, 0), 2, 1)
    fup = np.repeat(np.repeat(flat, 2, 0), 2, 1)
    np.testing.assert_allclose(adu, e * 1.5 * fup + up, rtol=1e-6, atol=1e-3)
    np.testing.assert_allclose(conv.to_electrons(adu, scale=2), e, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="does not fit the calibration maps"):
        conv.to_electrons(adu)  # the output grid without its scale


def test_bad_pixels_take_the_median_of_their_good_neighbours() -> None:
    rng = np.random.default_rng(3)
    hot = np.zeros(SHAPE, bool)
    hot[5, 7] = hot[5, 8] = hot[0, 0] = True
    dead = np.zeros(SHAPE, bool)
    dead[10, 10] = True
    profile = CalibrationProfile(
        pixel_size_um=0.1, camera=CameraParams(offset_adu=100, gain_adu_per_electron=1.0)
    ).with_arrays(hot_pixels=hot, dead_pixels=dead)
    conv = Electrons.from_profile(profile)
    raw = (100 + rng.integers(0, 50, SHAPE)).astype(np.float32)
    raw[5, 7], raw[5, 8], raw[0, 0], raw[10, 10] = 60000, 60000, 60000, 100
    e = conv.to_electrons(raw)
    plain = raw - 100
    for y, x in ((5, 7), (5, 8), (0, 0), (10, 10)):
        ys, xs = slice(max(y - 1, 0), y + 2), slice(max(x - 1, 0), x + 2)
        good = plain[ys, xs][~(hot | dead)[ys, xs]]
        assert e[y, x] == pytest.approx(float(np.median(good)))
    keep = ~(hot | dead)
    np.testing.assert_array_equal(e[keep], plain[keep])
    # a flat field of 0 (a dead pixel measured that way) is a bad pixel, never a division by 0
    flat = np.ones(SHAPE, np.float32)
    flat[3, 3] = 0
    e = Electrons(100, 1.0, flat_field=flat).to_electrons(raw)
    assert np.isfinite(e).all()


def test_inputs_that_cannot_be_converted_are_refused() -> None:
    with pytest.raises(ValueError, match="gain"):
        Electrons(0, 0.0)
    with pytest.raises(ValueError, match="one shape"):
        Electrons(0, 1.0, offset_map=np.zeros((4, 4)), flat_field=np.ones((4, 5)))
    with pytest.raises(ValueError, match="NaN"):
        Electrons(0, 1.0, offset_map=np.full((4, 4), np.nan))
