"""Calibration profiles on disk, and the live fidelity residual on simulated data."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from calibration.camera import CameraParams, adu_variance, expected_adu, photons_from_adu, record
from calibration.errors import CalibrationError
from calibration.fidelity import (
    FALSE_ALARM,
    MismatchMonitor,
    default_sigmas,
    fidelity,
    mismatch_band,
    noise_ratio,
    scan,
)
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


# ---- the offset map in the prediction, and the model-mismatch alarm --------------------------


@pytest.fixture(scope="module")
def columns(scene):
    """The confocal scene on a camera with column (and pixel) offsets: its offset map, the
    noise-free truth (the specimen: scalar offset) and 4 recordings."""
    camera, truth, _ = scene
    rng = np.random.default_rng(11)
    shape = truth.shape
    omap = camera.offset_adu + rng.normal(0, 12, shape[1])[None, :] + rng.normal(0, 1, shape)
    omap = omap.astype(np.float32)
    photons = photons_from_adu(truth, camera)
    raws = [record(photons, camera, rng, offset_map=omap) for _ in range(4)]
    return camera, omap, truth, photons, raws


def test_column_offsets_are_part_of_the_prediction(columns):
    camera, omap, truth, photons, raws = columns
    for raw in raws:
        f = fidelity(truth, raw, camera, offset_map=omap)
        assert 0.9 < f.chi2 < 1.1, f
        # the old prediction (the map in the variance only) equals pattern_in_output here
        old = fidelity(truth, raw, camera, offset_map=omap, pattern_in_output=True)
        assert old.chi2 > 1.4, old
        # an output that carries the map (an electrons engine converts back with it) is honest
        rig = expected_adu(photons, camera, offset_map=omap)
        carried = fidelity(rig, raw, camera, offset_map=omap, pattern_in_output=True)
        assert carried.chi2 == pytest.approx(f.chi2, rel=1e-3)


def _wrong(camera: CameraParams, omap: np.ndarray, **scaled: float):
    """Another rig's profile: the camera with ``scaled`` parameters, its offset map moved."""
    update = {k: getattr(camera, k) * v for k, v in scaled.items()}
    wrong = camera.model_copy(update=update)
    return wrong, np.maximum(omap - camera.offset_adu + wrong.offset_adu, 0)


def _first_alarm(monitor: MismatchMonitor, values) -> int | None:
    for i, v in enumerate(values):
        if monitor.update(v):
            return i + 1
    return None


def _checked(columns, profile_camera, profile_map, *, frames, seed, identity_too=False):
    """Noise ratios and chi-squares of ``frames`` honest frames of the column-offset camera,
    checked with a profile's camera and offset map; ``identity_too``: also check that the
    noise ratio does not depend on the engine (the raw frame as its own output gives the same)."""
    camera, omap, truth, photons, _ = columns
    rng = np.random.default_rng(seed)
    noise, chi2 = [], []
    for _ in range(frames):
        raw = record(photons, camera, rng, offset_map=omap)
        f = fidelity(truth, raw, profile_camera, offset_map=profile_map, noise=True)
        assert f.noise is not None
        if identity_too:
            ratio = noise_ratio(raw, raw, profile_camera, offset_map=profile_map)
            assert ratio == pytest.approx(f.noise, rel=0.03)
        noise.append(f.noise), chi2.append(f.chi2)
    return noise, chi2


def test_a_matching_profile_never_raises_the_alarm(columns):
    camera, omap, truth, _, _ = columns
    band = mismatch_band(truth.size)
    by_noise, by_chi2 = MismatchMonitor(band, run=10), MismatchMonitor(band, run=10)
    noise, chi2 = _checked(columns, camera, omap, frames=200, seed=12, identity_too=True)
    assert _first_alarm(by_noise, noise) is None and by_noise.mismatch is None
    assert _first_alarm(by_chi2, chi2) is None
    lo, hi = band
    assert lo < min(noise) and max(noise) < hi, (min(noise), max(noise), band)


@pytest.mark.parametrize(
    "scaled",
    [
        {"gain_adu_per_electron": 2.0},
        {"gain_adu_per_electron": 0.5},
        {"offset_adu": 2.0},
        {"offset_adu": 0.5},
    ],
)
def test_a_profile_off_by_2x_raises_the_alarm_within_20_frames(columns, scaled):
    camera, omap, truth, _, _ = columns
    wrong, wrong_map = _wrong(camera, omap, **scaled)
    band = mismatch_band(truth.size)
    by_noise, by_chi2 = MismatchMonitor(band, run=10), MismatchMonitor(band, run=10)
    noise, chi2 = _checked(columns, wrong, wrong_map, frames=20, seed=13)
    assert _first_alarm(by_noise, noise) == 10, noise
    assert by_noise.mismatch and ("low" in by_noise.mismatch or "high" in by_noise.mismatch)
    assert _first_alarm(by_chi2, chi2) == 10, chi2


def test_the_monitor_needs_a_run_and_clears_after_one():
    m = MismatchMonitor((0.8, 1.25), run=3)
    assert not any(m.update(v) for v in (0.1, 0.1, 1.0, 0.1, 0.1, float("nan")))
    assert m.mismatch is None
    assert m.update(0.1) is True and "low" in (m.mismatch or "")  # nan: no evidence, no reset
    m = MismatchMonitor((0.8, 1.25), run=3)
    assert [m.update(v) for v in (5, 5, 5, 5)] == [False, False, True, False]
    assert m.mismatch and "high" in m.mismatch and m.fired == 1
    for v in (1.0, 1.0):
        m.update(v)
    assert m.mismatch is not None
    m.update(1.0)
    assert m.mismatch is None
    lo, hi = mismatch_band(256 * 256)
    assert 0.7 < lo < 0.8 and 1.25 < hi < 1.35
    with pytest.raises(ValueError, match="band"):
        MismatchMonitor((1.1, 2.0))


@contextmanager
def _serving(tmp_path, camera: CameraParams) -> Iterator:
    """A running identity EngineServer whose --profile has ``camera`` (tests call its
    ``_fidelity`` with frames of their own)."""
    from stream.acquire import free_endpoint
    from stream.server import EngineServer, ServerConfig

    CalibrationProfile(rig="r", pixel_size_um=0.1, camera=camera).save(tmp_path / "p")
    config = ServerConfig(out_dir=tmp_path / "run", listen=free_endpoint(), publish=None,
                          control=free_endpoint(), profile=tmp_path / "p")  # fmt: skip
    server = EngineServer(config)
    runner = threading.Thread(target=server.run)
    runner.start()
    try:
        yield server
    finally:
        server.stop()
        runner.join(60)


def test_the_server_says_when_the_profile_does_not_match(tmp_path, caplog):
    """Identity engine, a profile whose gain is 2x the camera's: status, log and brief say so."""
    import logging

    from stream.server import MISMATCH_RUN
    from stream.viewer.server import _brief

    true_camera = CameraParams(offset_adu=100.0, gain_adu_per_electron=2.0)
    wrong = true_camera.model_copy(update={"gain_adu_per_electron": 4.0})
    rng = np.random.default_rng(0)
    photons = np.full((64, 64), 20.0, np.float32)
    with _serving(tmp_path, wrong) as server:
        with caplog.at_level(logging.WARNING, logger="stream.server"):
            for _ in range(MISMATCH_RUN):
                assert server.fidelity_mismatch is None
                raw = record(photons, true_camera, rng)
                checked, _ = server._fidelity(
                    raw, raw, "scope", "scope"
                )  # identity: output = input
            assert checked["noise"] < 0.5
            status = server.status()
        assert status.fidelity_mismatch and "does not match this camera" in (
            status.fidelity_mismatch
        )
        assert "scopecast calibrate camera --profile" in status.fidelity_mismatch
        assert _brief(status)["fidelity_mismatch"] == status.fidelity_mismatch
        warned = [r for r in caplog.records if "does not match this camera" in r.getMessage()]
        assert len(warned) == 1 and "calibrate camera --profile DIR" in warned[0].getMessage()


# -- the localized scan ------------------------------------------------------------------------


def _blob(shape, y, x, sigma):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma * sigma)).astype(np.float32)


@pytest.fixture(scope="module")
def dim():
    """The confocal preset's real exposure (a few photons per pixel): truth ADU and photons."""
    scope = SimulatedMicroscope("confocal-20fps", seed=2)
    model = scope.scene.forward_model("FITC")
    photons = model.expected_photons(scope.scene.fine_photons(3.0, "FITC", 30, (0.0, 0.0)))
    photons = photons[64:192, 64:192]
    return model.camera, expected_adu(photons, model.camera), photons


def test_the_scan_keeps_its_false_alarm_rate_on_honest_frames(dim):
    camera, truth, photons = dim
    rng = np.random.default_rng(3)
    sigmas = default_sigmas(0.91)
    flagged = sum(
        fidelity(truth, record(photons, camera, rng), camera, sigmas=sigmas).scan.flagged  # type: ignore[union-attr]
        for _ in range(100)
    )
    assert flagged <= 2 * 100 * FALSE_ALARM


@pytest.mark.parametrize("sign", [-1, 1])
def test_a_planted_object_of_snr_8_is_found(dim, sign):
    """Invented (added to the output: the raw frame lacks it, sign -1) or removed (taken out of
    the output: the raw frame has more, sign +1), radius 2 px, matched-filter SNR 8."""
    camera, truth, photons = dim
    rng = np.random.default_rng(4)
    var = adu_variance(photons, camera)
    found = 0
    for _ in range(40):
        y, x = rng.uniform(20, 108, 2)
        shape = _blob(truth.shape, y, x, 2.0)
        amp, v = 0.0, var
        for _ in range(4):  # SNR against the variance the output claims (it sets the check's)
            amp = 8.0 / float(np.sqrt((shape**2 / v).sum()))
            enhanced = truth - sign * amp * shape
            v = adu_variance(np.maximum(photons_from_adu(enhanced, camera), 0), camera)
        f = fidelity(enhanced, record(photons, camera, rng), camera, sigmas=default_sigmas(0.91))
        assert f.scan is not None
        found += any(
            g.sign == sign and np.hypot(g.y - y, g.x - x) < 2 * g.scale_px for g in f.scan.regions
        )
    # measured 40/40 invented and 37/40 removed: the skew correction costs the excess side
    # some power at a few photons per pixel (the target is 95%)
    assert found >= 36


def test_the_scan_is_normalized():
    rng = np.random.default_rng(0)
    r = rng.standard_normal((512, 512)).astype(np.float32)
    s = scan(r, np.zeros_like(r), np.ones_like(r), sigmas=default_sigmas(1.0))
    assert not s.flagged and 3 < s.max_z < s.threshold


def test_the_server_publishes_flagged_regions_and_counts_them(tmp_path):
    camera = CameraParams(offset_adu=100.0, gain_adu_per_electron=2.0)
    rng = np.random.default_rng(0)
    photons = np.full((64, 64), 20.0, np.float32)
    with _serving(tmp_path, camera) as server:
        truth = expected_adu(photons, camera)
        honest, _ = server._fidelity(truth, record(photons, camera, rng), "scope", "scope")
        assert honest["flagged"] == []
        invented = truth + 30 * _blob(truth.shape, 30, 40, 2.0)
        checked, significance = server._fidelity(
            invented, record(photons, camera, rng), "scope", "scope"
        )
        (region,) = checked["flagged"]
        assert region["sign"] == -1 and abs(region["y"] - 30) < 3 and abs(region["x"] - 40) < 3
        assert set(region) == {"y", "x", "scale_px", "z", "sign"}
        status = server.status()
        assert status.frames_flagged == 1 and status.frames_checked == 2
        assert status.fidelity_every == 1  # a 64x64 check is far within 5 ms
        # the coarse map for PUB: 8x8 raw px cells, most negative in the invented blob's cell
        assert significance is not None and significance.shape == (8, 8)
        assert np.unravel_index(significance.argmin(), significance.shape) == (30 // 8, 40 // 8)
        assert significance.min() < -checked["threshold"] + 1


def test_check_schedule_fixed_and_automatic():
    from calibration.fidelity import CheckSchedule

    fixed = CheckSchedule(3)
    assert [fixed.due("a", 100) for _ in range(7)] == [True, False, False, True, False, False, True]
    assert fixed.due("b", 100)  # another key starts checked
    auto = CheckSchedule()
    assert auto.due("a", 512 * 512) and auto.every == 1  # nothing measured yet
    auto.record(20.0, 512 * 512)  # 20 ms a check at 512x512, against a 5 ms budget
    assert not auto.due("a", 512 * 512) and auto.every == 4
    big = CheckSchedule()
    big.record(100.0, 2048 * 2048)  # 100 ms a check at 2048x2048, against 41.9 ms (10 ns/px)
    assert big.due("c", 2048 * 2048) and big.every == 3
    with pytest.raises(ValueError, match="every must be >= 0"):
        CheckSchedule(-1)
