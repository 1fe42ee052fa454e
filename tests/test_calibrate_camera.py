"""Camera calibration by the photon transfer curve, and the bidirectional scan phase."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from calibration.bidir import correct_phase, estimate_phase
from calibration.camera import CameraParams, record
from calibration.errors import CalibrationError
from calibration.ptc import fit_camera, plot_ptc
from calibration.scan import ScanParams, bidirectional_shift, scan

SHAPE = (64, 64)
FRAMES = 16
EXPOSURES_MS = (1.0, 4.0, 12.0, 30.0, 70.0)
HOT = ((3, 5), (20, 40), (50, 7), (61, 33))
DEAD = ((10, 10), (33, 60), (47, 2))

LOW_NOISE = CameraParams(
    offset_adu=100, gain_adu_per_electron=0.8, read_noise_electrons=1.6, bit_depth=12
)
HIGH_GAIN = CameraParams(
    offset_adu=100, gain_adu_per_electron=2.2, read_noise_electrons=6.0, bit_depth=16
)


@dataclass
class Rig:
    """A simulated camera with its true maps and a light source of `rate` photons per ms."""

    camera: CameraParams
    offset_map: np.ndarray
    flat_field: np.ndarray
    rate: float
    rng: np.random.Generator

    def series(self, photons: float | np.ndarray, frames: int = FRAMES) -> np.ndarray:
        """`frames` recorded frames of a uniform field (or per-frame photons)."""
        levels = np.broadcast_to(np.asarray(photons, np.float32), (frames,))
        return np.stack([self._frame(p) for p in levels])

    def _frame(self, photons: float) -> np.ndarray:
        field = np.full(SHAPE, photons, np.float32)
        return record(
            field, self.camera, self.rng, offset_map=self.offset_map, flat_field=self.flat_field
        )

    def flats(self, exposures_ms: tuple[float, ...] = EXPOSURES_MS) -> list[np.ndarray]:
        """One stack per exposure."""
        return [self.series(self.rate * t) for t in exposures_ms]


def make_rig(camera: CameraParams, rate: float, seed: int = 0) -> Rig:
    """Offset map of std 2 ADU with hot pixels, 3% PRNU with dead pixels."""
    rng = np.random.default_rng(seed)
    offset_map = np.maximum(camera.offset_adu + rng.normal(0, 2.0, SHAPE), 0)
    flat_field = 1 + rng.normal(0, 0.03, SHAPE)
    for y, x in HOT:
        offset_map[y, x] += 60
    for y, x in DEAD:
        flat_field[y, x] = 0.1
    return Rig(camera, offset_map.astype(np.float32), flat_field.astype(np.float32), rate, rng)


def mask_of(pixels: tuple[tuple[int, int], ...]) -> np.ndarray:
    mask = np.zeros(SHAPE, bool)
    mask[tuple(np.array(pixels).T)] = True
    return mask


# The brightest level uses about half the ADC range of each camera.
CAMERAS = {"low-noise-12bit": (LOW_NOISE, 50.0), "high-gain-16bit": (HIGH_GAIN, 250.0)}


@pytest.fixture(scope="module", params=list(CAMERAS))
def measured(request: pytest.FixtureRequest) -> tuple[Rig, object]:
    camera, rate = CAMERAS[request.param]
    rig = make_rig(camera, rate)
    cal = fit_camera(
        rig.series(0.0), rig.flats(), bit_depth=camera.bit_depth, exposures_ms=EXPOSURES_MS
    )
    return rig, cal


# ---- photon transfer curve ----------------------------------------------------------------


def test_fit_recovers_gain_offset_and_read_noise(measured) -> None:
    rig, cal = measured
    true = rig.camera
    assert cal.camera.gain_adu_per_electron == pytest.approx(true.gain_adu_per_electron, rel=0.05)
    assert cal.camera.offset_adu == pytest.approx(true.offset_adu, abs=1.0)
    assert cal.camera.read_noise_electrons == pytest.approx(true.read_noise_electrons, rel=0.10)
    assert cal.camera.quantum_efficiency == 1.0
    assert cal.camera.bit_depth == true.bit_depth


def test_fit_recovers_maps_and_defects(measured) -> None:
    rig, cal = measured
    good = ~(mask_of(HOT) | mask_of(DEAD))
    for name in ("offset_map", "read_noise_map", "flat_field"):
        assert getattr(cal, name).dtype == np.float32 and getattr(cal, name).shape == SHAPE
    np.testing.assert_array_equal(cal.hot_pixels, mask_of(HOT))
    np.testing.assert_array_equal(cal.dead_pixels, mask_of(DEAD))
    read_adu = rig.camera.read_noise_electrons * rig.camera.gain_adu_per_electron
    offset_error = (cal.offset_map - rig.offset_map)[good]
    assert abs(offset_error.mean()) < 0.2
    assert offset_error.std() < 1.2 * np.hypot(read_adu, 0.3) / np.sqrt(FRAMES)
    assert float(np.median(cal.read_noise_map)) == pytest.approx(read_adu, rel=0.1)
    assert float(cal.flat_field.mean()) == pytest.approx(1.0, abs=1e-5)
    true_flat = rig.flat_field / rig.flat_field.mean()
    assert np.abs(cal.flat_field - true_flat)[good].std() < 0.01


def test_ptc_record_holds_what_the_plot_shows(measured) -> None:
    rig, cal = measured
    ptc = cal.ptc
    assert ptc["exposure_ms"] == list(EXPOSURES_MS)
    assert len(ptc["mean_signal_adu"]) == len(ptc["variance_adu"]) == len(EXPOSURES_MS)
    assert np.all(np.diff(ptc["mean_signal_adu"]) > 0)
    assert ptc["fit_slope"] == [cal.camera.gain_adu_per_electron]
    assert ptc["fit_r2"][0] > 0.999
    gain = rig.camera.gain_adu_per_electron
    expected_top = gain * rig.rate * EXPOSURES_MS[-1] * rig.camera.quantum_efficiency
    assert ptc["mean_signal_adu"][-1] == pytest.approx(expected_top, rel=0.02)


def test_fit_without_exposures_labels_levels_by_index() -> None:
    rig = make_rig(LOW_NOISE, 50.0, seed=3)
    cal = fit_camera(rig.series(0.0), rig.flats(), bit_depth=12)
    assert all(np.isnan(cal.ptc["exposure_ms"]))
    assert cal.camera.gain_adu_per_electron == pytest.approx(0.8, rel=0.05)


def test_plot_ptc_writes_a_png(measured, tmp_path: Path) -> None:
    _, cal = measured
    path = plot_ptc(cal, tmp_path / "ptc.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_ptc_module_does_not_import_matplotlib() -> None:
    code = "import sys, calibration.ptc; sys.exit('matplotlib' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parents[1], check=False
    )
    assert result.returncode == 0


# ---- data that cannot give a trustworthy calibration -------------------------------------


@pytest.fixture(scope="module")
def rig() -> Rig:
    return make_rig(LOW_NOISE, 50.0, seed=1)


@pytest.fixture(scope="module")
def dark(rig: Rig) -> np.ndarray:
    return rig.series(0.0)


@pytest.fixture(scope="module")
def flats(rig: Rig) -> list[np.ndarray]:
    return rig.flats()


def _fit(dark: np.ndarray, flats: list[np.ndarray], exposures=EXPOSURES_MS, bit_depth=12):
    return fit_camera(dark, flats, bit_depth=bit_depth, exposures_ms=exposures)


def test_good_data_passes_every_check(dark, flats) -> None:
    assert _fit(dark, flats).camera.gain_adu_per_electron == pytest.approx(0.8, rel=0.05)


def test_too_few_dark_frames(dark, flats) -> None:
    with pytest.raises(CalibrationError, match=r"dark series has 1 frame.*acquire at least 8"):
        _fit(dark[:1], flats)


def test_too_few_frames_in_a_flat_level(dark, flats) -> None:
    short = [flats[0], flats[1][:1], *flats[2:]]
    with pytest.raises(CalibrationError, match=r"flat level 1 \(4 ms\) has 1 frame.*at least 8"):
        _fit(dark, short)


def test_too_few_flat_levels(dark, flats) -> None:
    with pytest.raises(CalibrationError, match=r"got 2 flat level.*at least 3"):
        _fit(dark, flats[:2], EXPOSURES_MS[:2])


def test_saturated_level_is_named(rig, dark, flats) -> None:
    bright = [*flats[:4], rig.series(6000.0)]
    message = r"flat level 4 \(70 ms\) is saturated.*lower the exposure or the light"
    with pytest.raises(CalibrationError, match=message):
        _fit(dark, bright)


def test_frames_clipped_at_zero_ask_for_a_higher_offset() -> None:
    rig = make_rig(LOW_NOISE.model_copy(update={"offset_adu": 0.0}), 50.0)
    with pytest.raises(CalibrationError, match=r"clips at zero.*raise the camera's offset"):
        _fit(rig.series(0.0), rig.flats())


def test_wrong_bit_depth(dark, flats) -> None:
    with pytest.raises(CalibrationError, match=r"above the 255 maximum.*bit_depth"):
        _fit(dark, flats, bit_depth=8)


def test_single_frame_instead_of_a_stack(dark, flats) -> None:
    with pytest.raises(CalibrationError, match=r"shape \(64, 64\).*\(N, H, W\)"):
        _fit(dark[0], flats)


def test_darks_lit_by_the_flat_light(rig, flats) -> None:
    lit = rig.series(20.0)  # the lamp's pattern (PRNU) shows in the "dark" map
    with pytest.raises(CalibrationError, match=r"dark frames contain light.*cover the objective"):
        _fit(lit, flats)


def test_darks_brighter_than_the_dimmest_flat(rig, flats) -> None:
    with pytest.raises(CalibrationError, match=r"darker than the dark series.*close the shutter"):
        _fit(rig.series(100.0), flats)


def test_darks_with_a_light_leak_that_drifts(rig, flats) -> None:
    leak = rig.series(np.linspace(0.0, 20.0, FRAMES))
    with pytest.raises(CalibrationError, match=r"dark series is not steady.*close the shutter"):
        _fit(leak, flats)


def test_darks_noisier_than_the_ptc_intercept(rig, flats) -> None:
    other = Rig(
        LOW_NOISE.model_copy(update={"read_noise_electrons": 3.2}),
        rig.offset_map,
        rig.flat_field,
        rig.rate,
        np.random.default_rng(9),
    )
    message = r"zero signal.*same gain/readout.*close the shutter"
    with pytest.raises(CalibrationError, match=message):
        _fit(other.series(0.0), flats)


def test_levels_that_do_not_increase(dark, flats) -> None:
    with pytest.raises(CalibrationError, match=r"flat levels do not increase.*dimmest first"):
        _fit(dark, flats[::-1], EXPOSURES_MS[::-1])


def test_variance_falling_with_signal_is_a_negative_gain() -> None:
    rng = np.random.default_rng(0)
    dark = np.rint(100 + rng.normal(0, 1.3, (FRAMES, *SHAPE)))
    levels = ((100, 30), (300, 20), (600, 10), (1000, 5), (2000, 2))
    flats = [np.rint(100 + m + rng.normal(0, s, (FRAMES, *SHAPE))) for m, s in levels]
    with pytest.raises(CalibrationError, match=r"negative or zero gain.*camera-side denoising"):
        _fit(dark, flats)


def test_calibration_error_is_a_value_error() -> None:
    assert issubclass(CalibrationError, ValueError)


# ---- bidirectional scan phase -------------------------------------------------------------

PEAK_PHOTONS = 50.0


@pytest.fixture(scope="module")
def specimen() -> np.ndarray:
    """Fine-grid (256 x 256) blurred beads, normalised to 1 at the brightest."""
    rng = np.random.default_rng(11)
    fine = np.zeros((256, 256))
    fine[rng.integers(0, 256, 300), rng.integers(0, 256, 300)] = rng.uniform(0.5, 1.0, 300)
    fine = ndimage.gaussian_filter(fine, 3.0)
    return fine / fine.max()


def scanned(specimen: np.ndarray, phase_px: float) -> np.ndarray:
    """Expected photons per recorded pixel (128 x 128), peak about PEAK_PHOTONS."""
    params = ScanParams(downsample=2, bidirectional=True, phase_px=phase_px)
    return scan(specimen * PEAK_PHOTONS / 4, params)


def mismatch(image: np.ndarray) -> float:
    """Mean squared difference between odd rows and the mean of their even neighbours."""
    odd = image[1:-1:2, 8:-8]
    neighbours = 0.5 * (image[0:-2:2, 8:-8] + image[2::2, 8:-8])
    return float(np.mean((odd - neighbours) ** 2))


@pytest.mark.parametrize("phase_px", [-1.3, -0.4, 0.0, 0.6, 2.2])
def test_estimate_phase_recovers_the_scan_phase(specimen, phase_px: float) -> None:
    clean = scanned(specimen, phase_px)
    assert clean.max() == pytest.approx(PEAK_PHOTONS, rel=0.1)
    rng = np.random.default_rng(int(10 * phase_px) + 100)
    frames = rng.poisson(np.broadcast_to(clean, (4, *clean.shape))).astype(np.uint16)
    assert estimate_phase(frames) == pytest.approx(phase_px, abs=0.1)
    assert estimate_phase(clean) == pytest.approx(phase_px, abs=0.03)


def test_correct_phase_undoes_the_phase(specimen) -> None:
    straight = scanned(specimen, 0.0)
    shifted = bidirectional_shift(straight, 2.2)
    corrected = correct_phase(shifted, estimate_phase(shifted))
    assert corrected.dtype == np.float32
    np.testing.assert_array_equal(corrected[::2], straight[::2])
    assert mismatch(corrected) < 0.1 * mismatch(shifted)
    interior = (slice(None), slice(8, -8))
    assert np.abs(corrected - straight)[interior].max() < 0.05 * straight.max()


def test_correct_phase_on_a_noisy_stack(specimen) -> None:
    rng = np.random.default_rng(5)
    frames = rng.poisson(np.broadcast_to(scanned(specimen, -1.3), (3, 128, 128)))
    corrected = correct_phase(frames, estimate_phase(frames))
    assert corrected.shape == frames.shape
    assert mismatch(corrected.mean(0)) < 0.5 * mismatch(frames.mean(0).astype(np.float32))


def test_flat_image_has_too_little_structure() -> None:
    with pytest.raises(CalibrationError, match="image a field with structure"):
        estimate_phase(np.full((128, 128), 40.0))


def test_pure_noise_has_too_little_structure() -> None:
    noise = np.random.default_rng(2).poisson(30.0, (4, 128, 128))
    with pytest.raises(CalibrationError, match="image a field with structure"):
        estimate_phase(noise)


def test_phase_beyond_the_search_range(specimen) -> None:
    with pytest.raises(CalibrationError, match="raise max_shift_px"):
        estimate_phase(scanned(specimen, 3.0), max_shift_px=2.0)


def test_vignetting_is_not_taken_for_dead_pixels() -> None:
    rig = make_rig(HIGH_GAIN, 250.0, seed=4)
    y, x = np.mgrid[: SHAPE[0], : SHAPE[1]] - 31.5
    rig.flat_field = (rig.flat_field * np.exp(-(x**2 + y**2) / (2 * 25.0**2))).astype(np.float32)
    cal = fit_camera(rig.series(0.0), rig.flats(), bit_depth=16, exposures_ms=EXPOSURES_MS)
    assert cal.flat_field.min() < 0.3  # the corners get under half the mean light
    np.testing.assert_array_equal(cal.dead_pixels, mask_of(DEAD))
    assert cal.camera.gain_adu_per_electron == pytest.approx(2.2, rel=0.05)
