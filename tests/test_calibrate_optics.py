"""Optics calibration from data: bead PSF width, defocus curve, and cross-system registration."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from skimage.transform import SimilarityTransform, warp

from calibration import (
    CameraParams,
    ForwardModel,
    OpticsParams,
    ScanParams,
    defocus_sigma_um,
    psf_sigma_um,
    record,
)
from calibration.errors import CalibrationError
from calibration.pairfolder import write_pairs
from calibration.psf import fit_defocus, fit_psf
from calibration.register import Similarity, register, registered_pair, warp_to

DOWNSAMPLE = 4
BEAD_PHOTONS = 5000.0
BACKGROUND_PHOTONS = 5.0


def _bead_photons(
    rng: np.random.Generator,
    shape: tuple[int, int],
    n: int,
    *,
    min_distance_px: float,
    photons: float = BEAD_PHOTONS,
    margin_px: float = 8.0,
) -> np.ndarray:
    """Fine-grid photons: n point sources at random sub-pixel positions, min_distance apart."""
    points: list[np.ndarray] = []
    for _ in range(100_000):
        if len(points) == n:
            break
        p = rng.uniform(margin_px, np.array(shape) - margin_px)
        if all(math.dist(p, q) >= min_distance_px for q in points):
            points.append(p)
    assert len(points) == n, "test setup: could not place the beads"
    fine = np.full(
        (shape[0] * DOWNSAMPLE, shape[1] * DOWNSAMPLE), BACKGROUND_PHOTONS / DOWNSAMPLE**2
    )
    for y, x in points:
        fine[int(y * DOWNSAMPLE), int(x * DOWNSAMPLE)] += photons
    return fine


def _rig(optics: OpticsParams, pixel_size_um: float, focus_z_um: float = 0.0) -> ForwardModel:
    return ForwardModel(
        optics=optics,
        scan=ScanParams(downsample=DOWNSAMPLE),
        pixel_size_um=pixel_size_um,
        focus_z_um=focus_z_um,
    )


# ---- in-focus PSF ---------------------------------------------------------------------------


@pytest.mark.parametrize("psf", ["gaussian", "airy"])
def test_fit_psf_recovers_the_width_of_the_simulated_objective(
    psf: Literal["gaussian", "airy"],
) -> None:
    optics = OpticsParams(na=0.8, wavelength_nm=520.0, refractive_index=1.0, psf=psf)
    rng = np.random.default_rng(11)
    frame = _rig(optics, 0.1).record(_bead_photons(rng, (256, 256), 30, min_distance_px=30), rng)

    fit = fit_psf(frame, pixel_size_um=0.1, model=psf)

    truth = psf_sigma_um(optics)
    print(f"{psf}: sigma {fit.sigma_um:.4f} µm (truth {truth:.4f}), {fit.n_beads} beads")
    assert fit.model == psf and fit.n_beads >= 25 and fit.sigmas_px.shape == (fit.n_beads,)
    assert fit.sigma_um == pytest.approx(truth, rel=0.10)
    assert fit.sigma_px == pytest.approx(fit.sigma_um / 0.1)
    fwhm_per_sigma = 0.5145 / 0.21 if psf == "airy" else 2.3548  # Airy FWHM 0.5145 λ/NA
    assert fit.fwhm_um == pytest.approx(fwhm_per_sigma * fit.sigma_um, rel=1e-3)
    back = fit.optics(520.0, refractive_index=1.0)
    assert back.psf == psf and back.na == pytest.approx(0.8, rel=0.10)


def test_optics_clips_an_impossibly_narrow_fit_below_the_refractive_index() -> None:
    optics = OpticsParams(na=0.8, wavelength_nm=520.0, refractive_index=1.0)
    rng = np.random.default_rng(5)
    frame = _rig(optics, 0.1).record(_bead_photons(rng, (128, 128), 8, min_distance_px=30), rng)
    fit = fit_psf(frame, pixel_size_um=0.1)
    assert fit.optics(520.0, refractive_index=1.0).na == pytest.approx(0.8, rel=0.1)
    assert 0.99 < fit.optics(2000.0 / 1.2, refractive_index=1.0).na < 1.0


def test_crowded_beads_raise_and_ask_for_dilution() -> None:
    optics = OpticsParams(na=0.8, wavelength_nm=520.0, refractive_index=1.0)
    rng = np.random.default_rng(3)
    fine = _bead_photons(rng, (64, 64), 500, min_distance_px=0, margin_px=0)
    frame = _rig(optics, 0.1).record(fine, rng)
    with pytest.raises(CalibrationError, match="dilute") as err:
        fit_psf(frame, pixel_size_um=0.1)
    assert "need min_beads=5" in str(err.value) and "too dense" in str(err.value)


def test_too_few_beads_raise_and_ask_for_another_field() -> None:
    optics = OpticsParams(na=0.8, wavelength_nm=520.0, refractive_index=1.0)
    rng = np.random.default_rng(4)
    frame = _rig(optics, 0.1).record(_bead_photons(rng, (128, 128), 3, min_distance_px=30), rng)
    with pytest.raises(CalibrationError, match="only 3 beads could be fitted") as err:
        fit_psf(frame, pixel_size_um=0.1)
    assert "another field" in str(err.value) and "longer exposure" in str(err.value)


def test_saturated_beads_are_not_fitted() -> None:
    optics = OpticsParams(na=0.8, wavelength_nm=520.0, refractive_index=1.0)
    rng = np.random.default_rng(6)
    fine = _bead_photons(rng, (128, 128), 8, min_distance_px=30, photons=50 * BEAD_PHOTONS)
    rig = _rig(optics, 0.1).model_copy(update={"camera": CameraParams(bit_depth=12)})
    frame = rig.record(fine, rng)
    assert frame.max() == 4095
    with pytest.raises(CalibrationError, match="shorten the exposure"):
        fit_psf(frame, pixel_size_um=0.1, saturation=4095)


# ---- defocus --------------------------------------------------------------------------------

DEFOCUS_OPTICS = OpticsParams(na=0.5, wavelength_nm=520.0, refractive_index=1.0)
DEFOCUS_PIXEL_UM = 0.2


def _z_series(z_um: np.ndarray, focus_z_um: float) -> np.ndarray:
    rng = np.random.default_rng(21)
    fine = _bead_photons(rng, (288, 288), 25, min_distance_px=40, photons=30000.0)
    rig = _rig(DEFOCUS_OPTICS, DEFOCUS_PIXEL_UM, focus_z_um)
    return np.stack([rig.record(fine, rng, z_um=float(z)) for z in z_um])


def test_fit_defocus_finds_the_focus_and_the_model_slope() -> None:
    z = np.linspace(-3.0, 3.0, 13)
    fit = fit_defocus(_z_series(z, 0.4), z, pixel_size_um=DEFOCUS_PIXEL_UM)

    slope = defocus_sigma_um(DEFOCUS_OPTICS, 1.0)
    print(
        f"focus {fit.focus_z_um:.3f} µm (truth 0.4), slope {fit.slope:.4f} (model {slope:.4f}), "
        f"sigma0 {fit.sigma0_um:.4f} µm (model {psf_sigma_um(DEFOCUS_OPTICS):.4f})"
    )
    assert abs(fit.focus_z_um - 0.4) < 0.2
    assert fit.slope == pytest.approx(slope, rel=0.15)
    assert fit.sigma0_um == pytest.approx(psf_sigma_um(DEFOCUS_OPTICS), rel=0.10)
    np.testing.assert_array_equal(fit.z_um, z)
    expected = np.hypot(psf_sigma_um(DEFOCUS_OPTICS), slope * (z - 0.4))
    np.testing.assert_allclose(fit.sigma_um, expected, rtol=0.10)


def test_fit_defocus_rejects_a_series_that_misses_focus() -> None:
    z = np.linspace(1.5, 3.5, 5)
    with pytest.raises(CalibrationError, match="outside the scanned range"):
        fit_defocus(_z_series(z, 0.4), z, pixel_size_um=DEFOCUS_PIXEL_UM)


def test_fit_defocus_needs_five_planes() -> None:
    z = np.array([-1.0, 0.0, 1.0])
    with pytest.raises(CalibrationError, match="at least 5 planes"):
        fit_defocus(np.zeros((3, 64, 64)), z, pixel_size_um=DEFOCUS_PIXEL_UM)


# ---- registration ---------------------------------------------------------------------------


def _specimen(seed: int, size: int = 512) -> np.ndarray:
    """Photons of a 'high quality' field: smooth random texture plus cell-like blobs with nuclei."""
    rng = np.random.default_rng(seed)
    texture = ndimage.gaussian_filter(rng.standard_normal((size, size)), 6)
    image = 20 + 60 * (texture - texture.min()) / np.ptp(texture)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    for _ in range(60):
        cy, cx = rng.uniform(0, size, 2)
        a, b = rng.uniform(6, 18, 2)
        t = rng.uniform(0, np.pi)
        u = ((yy - cy) * np.cos(t) + (xx - cx) * np.sin(t)) / a
        v = (-(yy - cy) * np.sin(t) + (xx - cx) * np.cos(t)) / b
        image += 150 * np.exp(-((u * u + v * v) ** 4)) + 250 * np.exp(
            -((u * a) ** 2 + (v * b) ** 2) / 8.0
        )
    return ndimage.gaussian_filter(image, 1.0)


@pytest.fixture(scope="module")
def high() -> np.ndarray:
    return _specimen(0)


def _truth(
    rotation_deg: float,
    scale: float,
    centre_shift_yx: tuple[float, float],
    low_shape: tuple[int, int],
    high_shape: tuple[int, int] = (512, 512),
) -> Similarity:
    """High -> low map turning about the high image's centre, landing centre_shift from low's."""
    theta = math.radians(rotation_deg)
    c, s = scale * math.cos(theta), scale * math.sin(theta)
    cy_h, cx_h = (np.array(high_shape) - 1) / 2
    cy_l, cx_l = (np.array(low_shape) - 1) / 2
    tx = cx_l + centre_shift_yx[1] - (c * cx_h - s * cy_h)
    ty = cy_l + centre_shift_yx[0] - (s * cx_h + c * cy_h)
    return Similarity(rotation_deg, scale, (float(ty), float(tx)))


def _low_view(high: np.ndarray, truth: Similarity, shape: tuple[int, int], seed: int) -> np.ndarray:
    """What the fast system records: blurred, resampled through `truth`, cropped, noisy."""
    blurred = ndimage.gaussian_filter(high, 1.0 / truth.scale)
    photons = warp(
        blurred, np.linalg.inv(truth.matrix()), output_shape=shape, order=3, preserve_range=True
    )
    return record(np.clip(photons, 0, None) * 0.2, CameraParams(), np.random.default_rng(seed))


CASES = [
    pytest.param(7.3, 0.5, (12.4, -7.7), (200, 200), 0.5, id="rot7.3-scale0.5-hint"),
    pytest.param(7.3, 0.5, (12.4, -7.7), (200, 200), None, id="rot7.3-scale0.5-nohint"),
    pytest.param(-23.0, 1.0, (-9.3, 14.2), (300, 300), None, id="rot-23-scale1"),
]


@pytest.mark.parametrize(("rotation", "scale", "centre_shift", "shape", "hint"), CASES)
def test_register_recovers_rotation_scale_and_shift(
    high: np.ndarray,
    rotation: float,
    scale: float,
    centre_shift: tuple[float, float],
    shape: tuple[int, int],
    hint: float | None,
) -> None:
    truth = _truth(rotation, scale, centre_shift, shape)
    low = _low_view(high, truth, shape, seed=1)

    sim = register(low, high, scale_hint=hint)

    centre = np.array([255.5, 255.5, 1.0])
    centre_error = (sim.matrix() @ centre - truth.matrix() @ centre)[:2]
    print(
        f"rotation {sim.rotation_deg:.4f} (truth {rotation}), "
        f"scale {sim.scale:.5f} (truth {scale}), "
        f"shift_yx ({sim.shift_yx[0]:.3f}, {sim.shift_yx[1]:.3f}) "
        f"(truth ({truth.shift_yx[0]:.3f}, {truth.shift_yx[1]:.3f})), score {sim.score:.3f}"
    )
    assert abs(sim.rotation_deg - rotation) < 0.2
    assert sim.scale == pytest.approx(scale, rel=0.01)
    np.testing.assert_allclose(sim.shift_yx, truth.shift_yx, atol=0.5)
    assert np.abs(centre_error).max() < 0.5
    assert sim.score > 0.9

    moved, fixed = registered_pair(low, high, sim)
    assert moved.shape == fixed.shape and min(fixed.shape) > 0.6 * min(shape) / scale
    assert np.isfinite(moved).all()
    assert np.corrcoef(moved.ravel(), fixed.ravel())[0, 1] > 0.9


def test_register_honours_a_rotation_limit(high: np.ndarray) -> None:
    truth = _truth(7.3, 0.5, (12.4, -7.7), (200, 200))
    low = _low_view(high, truth, (200, 200), seed=5)
    sim = register(low, high, scale_hint=0.5, max_rotation_deg=10.0)
    assert abs(sim.rotation_deg - 7.3) < 0.2 and sim.scale == pytest.approx(0.5, rel=0.01)
    np.testing.assert_allclose(sim.shift_yx, truth.shift_yx, atol=0.5)
    with pytest.raises(CalibrationError, match="max_rotation_deg"):
        register(low, high, scale_hint=0.5, max_rotation_deg=0.0)


def test_register_roles_swapped_gives_the_inverse(high: np.ndarray) -> None:
    truth = _truth(7.3, 0.5, (12.4, -7.7), (200, 200))
    low = _low_view(high, truth, (200, 200), seed=2)
    sim = register(high, low, scale_hint=2.0)
    inverse = truth.inverse()
    assert abs(sim.rotation_deg - inverse.rotation_deg) < 0.2
    assert sim.scale == pytest.approx(2.0, rel=0.01)
    np.testing.assert_allclose(sim.shift_yx, inverse.shift_yx, atol=0.5)


def test_fields_that_do_not_overlap_raise(high: np.ndarray) -> None:
    elsewhere = _low_view(_specimen(99), _truth(0.0, 0.5, (0.0, 0.0), (200, 200)), (200, 200), 3)
    with pytest.raises(CalibrationError, match="image fields that overlap more"):
        register(elsewhere, high, scale_hint=0.5)


def test_registered_pair_rejects_a_small_overlap(high: np.ndarray) -> None:
    sim = _truth(0.0, 1.0, (0.0, 0.0), (512, 512))
    shifted = Similarity(0.0, 1.0, (300.0, 300.0))
    with pytest.raises(CalibrationError, match=r"overlap on 17\.1% .*overlap more"):
        registered_pair(high, high, shifted)
    moved, fixed = registered_pair(high, high, sim)
    assert moved.shape == fixed.shape and moved.shape[0] > 500


def test_registered_pair_upsampled_targets_line_up_with_the_fixed_grid(high: np.ndarray) -> None:
    truth = _truth(7.3, 0.5, (12.4, -7.7), (200, 200))
    low = _low_view(high, truth, (200, 200), seed=4)
    moved, fixed = registered_pair(high, low, truth.inverse(), upsample=2)
    assert moved.shape == (2 * fixed.shape[0], 2 * fixed.shape[1]) and np.isfinite(moved).all()
    binned = moved.reshape(fixed.shape[0], 2, fixed.shape[1], 2).mean(axis=(1, 3))
    assert np.corrcoef(binned.ravel(), fixed.ravel().astype(float))[0, 1] > 0.9


def test_featureless_images_raise(high: np.ndarray) -> None:
    flat = np.full((128, 128), 100.0)
    with pytest.raises(CalibrationError, match="too little structure"):
        register(flat, high)


@pytest.mark.parametrize("value", [0.0, 100.0, 0.1, 1 / 3, 1234.5678])
def test_featureless_images_are_refused_before_scikit_image(
    high: np.ndarray, value: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check is the project's own: a constant image (whose smoothed std is 1e-17 rather
    than 0 for some values) never reaches phase_cross_correlation, which in scikit-image 0.26
    raises its own ValueError on featureless input."""
    import calibration.register as reg

    def refuse(*args, **kwargs):
        raise AssertionError("phase_cross_correlation must not see a featureless image")

    monkeypatch.setattr(reg, "phase_cross_correlation", refuse)
    flat = np.full((128, 128), value)
    for moving, fixed in ((flat, high), (high, flat)):
        with pytest.raises(CalibrationError, match="too little structure"):
            register(moving, fixed)
    noise = np.random.default_rng(0).normal(100.0, 5.0, (128, 128))
    with pytest.raises(CalibrationError, match="too little structure"):
        register(noise, high)


def test_scikit_image_errors_become_calibration_errors(
    high: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    import calibration.register as reg

    def featureless(*args, **kwargs):
        raise ValueError("NaN values found, please remove NaNs from your input data")

    monkeypatch.setattr(reg, "phase_cross_correlation", featureless)
    with pytest.raises(CalibrationError, match="phase correlation failed"):
        register(high[::2, ::2], high, scale_hint=2.0)


def test_bad_images_are_calibration_errors(high: np.ndarray) -> None:
    for image, message in ((np.zeros((16, 16)), "at least 32x32"),
                           (np.full((64, 64), np.nan), "NaN or inf")):  # fmt: skip
        with pytest.raises(CalibrationError, match=message):
            register(image, high)


def test_similarity_matrix_is_scikit_image_convention() -> None:
    sim = Similarity(12.0, 0.7, (3.0, -4.0))
    expected = SimilarityTransform(scale=0.7, rotation=math.radians(12.0), translation=(-4.0, 3.0))
    np.testing.assert_allclose(sim.matrix(), expected.params, atol=1e-12)
    back = sim.inverse()
    np.testing.assert_allclose(back.matrix() @ sim.matrix(), np.eye(3), atol=1e-12)
    image = np.arange(40 * 40, dtype=np.float64).reshape(40, 40)
    warped = warp_to(image, (40, 40), Similarity(0.0, 1.0, (2.0, 5.0)))
    np.testing.assert_allclose(warped[5:20, 5:20], image[7:22, 10:25], atol=1e-3)
    assert np.isnan(warped[-1, -1]) and np.isnan(warped[5, -1]) and np.isfinite(warped[-5, 5])


def test_write_pairs_round_trip(tmp_path: Path, high: np.ndarray) -> None:
    low = (high[::2, ::2] * 3).astype(np.uint16)
    pairs = [("field-01", low, high.astype(np.float32)), ("field-02", low[:100], high[:200])]
    paths = write_pairs(pairs, tmp_path)
    assert paths == [
        tmp_path / "low" / "field-01.tif",
        tmp_path / "high" / "field-01.tif",
        tmp_path / "low" / "field-02.tif",
        tmp_path / "high" / "field-02.tif",
    ]
    lows = sorted(p.name for p in (tmp_path / "low").iterdir())
    assert lows == sorted(p.name for p in (tmp_path / "high").iterdir())
    for name, lo, hi in pairs:
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "low" / f"{name}.tif"), lo)
        np.testing.assert_array_equal(tifffile.imread(tmp_path / "high" / f"{name}.tif"), hi)
    with pytest.raises(ValueError, match="plain file stems"):
        write_pairs([("../escape", low, high)], tmp_path)
    with pytest.raises(ValueError, match="crop with registered_pair"):
        write_pairs([("nan", low, np.full((4, 4), np.nan))], tmp_path)
