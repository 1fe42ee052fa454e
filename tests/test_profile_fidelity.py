"""Calibration profiles on disk, and the live fidelity residual on simulated data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from calibration.camera import CameraParams, expected_adu, record
from calibration.errors import CalibrationError
from calibration.fidelity import fidelity
from calibration.profile import CalibrationProfile
from calibration.scan import ScanParams, bidirectional_shift
from stream.simulated import SimulatedMicroscope


def test_profile_round_trips_with_arrays_and_never_pickles(tmp_path):
    offset = np.random.default_rng(0).normal(100, 2, (8, 8)).astype(np.float32)
    p = CalibrationProfile(
        rig="scope-a", pixel_size_um=0.1, camera=CameraParams(gain_adu_per_electron=2.0)
    )
    p = p.with_arrays(offset_map=offset, hot_pixels=offset > 104)
    p.save(tmp_path)
    q = CalibrationProfile.load(tmp_path)
    assert q.camera.gain_adu_per_electron == 2.0 and q.rig == "scope-a"
    assert np.array_equal(q.array("offset_map"), offset)
    assert q.array("hot_pixels").dtype == bool
    assert q.array("flat_field") is None
    assert q.forward_model().camera == q.camera
    # an object array would need pickle: refused on load
    np.savez(tmp_path / "arrays.npz", offset_map=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        CalibrationProfile.load(tmp_path)


def test_profile_errors_say_what_to_do(tmp_path):
    with pytest.raises(CalibrationError, match="scopecast calibrate camera"):
        CalibrationProfile.load(tmp_path / "none")
    (tmp_path / "profile.json").write_text(json.dumps({"version": 1, "pixel_size_um": -1}))
    with pytest.raises(CalibrationError, match="pixel_size_um"):
        CalibrationProfile.load(tmp_path)


@pytest.fixture(scope="module")
def scene():
    """A confocal frame's true mean (ADU) and one noisy recording of it."""
    scope = SimulatedMicroscope("confocal-20fps", seed=1)
    model = scope.scene.forward_model("FITC")
    fine = scope.scene.fine_photons(3.0, "FITC", 30 * 20, (0.0, 0.0))  # bright: 20x the dwell
    camera = model.camera
    photons = model.expected_photons(fine)
    truth = expected_adu(photons, camera)
    raw = record(photons, camera, np.random.default_rng(5))
    return camera, truth, raw


def test_noise_consistent_output_scores_near_one(scene):
    camera, truth, raw = scene
    f = fidelity(truth, raw, camera)
    assert 0.85 < f.chi2 < 1.15
    # a x2 output that bins back to the truth is just as consistent
    f2 = fidelity(np.kron(truth, np.ones((2, 2), np.float32)), raw, camera, scale=2)
    assert f2.chi2 == pytest.approx(f.chi2, rel=1e-4)


def test_an_invented_object_stands_out(scene):
    camera, truth, raw = scene
    fake = truth.copy()
    yy, xx = np.mgrid[: fake.shape[0], : fake.shape[1]]
    fake[(yy - 200) ** 2 + (xx - 60) ** 2 < 5**2] += 8 * camera.gain_adu_per_electron * 10
    honest, invented = fidelity(truth, raw, camera), fidelity(fake, raw, camera)
    assert invented.worst_block > 5 * honest.worst_block
    assert invented.chi2 > honest.chi2


def test_line_phase_is_part_of_the_prediction():
    camera = CameraParams(
        gain_adu_per_electron=1.0, read_noise_electrons=1.0, quantum_efficiency=1.0
    )
    rng = np.random.default_rng(0)
    clean = np.tile(100 + 80 * np.sin(np.arange(64) / 2.0), (64, 1)).astype(np.float32)
    raw = record(bidirectional_shift(clean, 1.5), camera, rng)
    enhanced = expected_adu(clean, camera)  # what a perfect engine after phase correction gives
    scan = ScanParams(bidirectional=True, phase_px=1.5)
    assert fidelity(enhanced, raw, camera, scan=scan).chi2 < 1.3
    assert fidelity(enhanced, raw, camera).chi2 > 3


def test_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="times scale 2"):
        fidelity(np.zeros((10, 10)), np.zeros((10, 10)), CameraParams(), scale=2)


def test_the_simulator_images_with_a_profiles_parameters():
    camera = CameraParams(offset_adu=300.0, gain_adu_per_electron=3.0, read_noise_electrons=2.0)
    profile = CalibrationProfile(rig="other", pixel_size_um=0.08, camera=camera)
    scope = SimulatedMicroscope("confocal-20fps", profile=profile)
    assert scope.preset.camera == camera and scope.core.getPixelSizeUm() == 0.08
    scope.shutter.set_open(False)
    scope.core.snapImage()
    assert abs(scope.core.getImage().mean() - 300.0) < 1
