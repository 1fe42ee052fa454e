"""Forward model: camera noise statistics, PSF shapes, scanning and the composed pipeline."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from pydantic import ValidationError

from calibration import (
    CameraParams,
    ForwardModel,
    OpticsParams,
    ScanParams,
    adu_variance,
    bidirectional_shift,
    bin_image,
    blur,
    defocus_sigma_um,
    expected_adu,
    photons_from_adu,
    psf_kernel,
    psf_sigma_um,
    record,
)

CAM = CameraParams()
AIRY = OpticsParams(psf="airy")


def _second_moment_px2(kernel: np.ndarray) -> float:
    x = np.arange(kernel.shape[1]) - kernel.shape[1] // 2
    return float((kernel.sum(axis=0) * x**2).sum())


# ---- camera -----------------------------------------------------------------------------


def test_same_seed_same_frame_different_seed_different() -> None:
    photons = np.full((48, 40), 30.0)
    a = record(photons, CAM, np.random.default_rng(7))
    b = record(photons, CAM, np.random.default_rng(7))
    c = record(photons, CAM, np.random.default_rng(8))
    assert a.dtype == np.uint16 and a.shape == photons.shape
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.5


def test_large_frame_chunked_path_is_seeded_and_writes_out() -> None:
    photons = np.full((600, 500), 20.0, np.float32)
    out = np.zeros((600, 1000), np.uint16)[:, ::2]
    a = record(photons, CAM, np.random.default_rng(1), out=out)
    b = record(photons, CAM, np.random.default_rng(1))
    assert a is out
    np.testing.assert_array_equal(out, b)
    assert abs(b.mean() - expected_adu(photons, CAM).mean()) < 0.1


@pytest.mark.parametrize("flux", [0.0, 3.0, 50.0, 800.0])
def test_flat_field_mean_and_variance_match_noise_model(flux: float) -> None:
    photons = np.full((64, 64), flux)
    rng = np.random.default_rng(123)
    frames = np.stack([record(photons, CAM, rng) for _ in range(8)]).astype(np.float64)
    mean, var = expected_adu(photons, CAM)[0, 0], adu_variance(photons, CAM)[0, 0]
    assert frames.mean() == pytest.approx(mean, rel=0.005, abs=0.05)
    assert frames.var() == pytest.approx(var, rel=0.04)


def test_per_pixel_offset_and_flat_field_standardize_to_unit_normal() -> None:
    rng = np.random.default_rng(5)
    photons = np.tile(np.linspace(5.0, 400.0, 64), (64, 1))
    offset = rng.uniform(90, 110, photons.shape)
    flat = rng.uniform(0.7, 1.3, photons.shape)
    kw = {"offset_map": offset, "flat_field": flat}
    frames = np.stack([record(photons, CAM, rng, **kw) for _ in range(8)]).astype(np.float64)
    z = (frames - expected_adu(photons, CAM, **kw)) / np.sqrt(adu_variance(photons, CAM, **kw))
    assert abs(z.mean()) < 0.03
    assert z.var() == pytest.approx(1.0, rel=0.04)


def test_photons_from_adu_inverts_expected_adu() -> None:
    photons = np.random.default_rng(0).uniform(0, 1e3, (16, 16))
    flat = np.full(photons.shape, 0.9)
    adu = expected_adu(photons, CAM, flat_field=flat)
    assert adu.dtype == np.float32
    np.testing.assert_allclose(
        photons_from_adu(adu, CAM, flat_field=flat), photons, rtol=1e-5, atol=1e-3
    )


def test_clipping_at_max_adu_and_at_zero_for_12_bit() -> None:
    cam = CameraParams(bit_depth=12, offset_adu=0.0, read_noise_electrons=3.0)
    assert cam.max_adu == 4095
    bright = record(np.full((32, 32), 1e6), cam, np.random.default_rng(0))
    assert (bright == 4095).all()
    dark = record(np.zeros((32, 32)), cam, np.random.default_rng(0))
    assert dark.min() == 0 and (dark == 0).mean() > 0.3 and dark.max() < 50


@pytest.mark.parametrize(("bad", "match"), [(-0.5, r"-0\.5"), (np.nan, "NaN"), (np.inf, "inf")])
def test_record_rejects_bad_photons_naming_the_value(bad: float, match: str) -> None:
    photons = np.ones((4, 4))
    photons[1, 2] = bad
    with pytest.raises(ValueError, match=match):
        record(photons, CAM, np.random.default_rng(0))


def test_record_rejects_mismatched_maps_and_out() -> None:
    photons = np.ones((4, 4))
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        record(photons, CAM, rng, offset_map=np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"flat_field.*-1"):
        record(photons, CAM, rng, flat_field=-np.ones((4, 4)))
    with pytest.raises(ValueError, match="float32"):
        record(photons, CAM, rng, out=np.zeros((4, 4), np.float32))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"gain_adu_per_electron": 0},
        {"bit_depth": 17},
        {"bit_depth": 0},
        {"quantum_efficiency": 1.2},
        {"offset_adu": -1},
    ],
)
def test_camera_params_reject_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValidationError):
        CameraParams(**kwargs)


def test_params_are_frozen_and_forbid_extras() -> None:
    with pytest.raises(ValidationError):
        CAM.bit_depth = 12  # type: ignore[misc]
    with pytest.raises(ValidationError):
        CameraParams(gain=3.0)  # type: ignore[call-arg]


# ---- optics -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"na": 1.515}, {"na": 1.6}, {"na": 0}, {"wavelength_nm": 150}, {"wavelength_nm": 2500}],
)
def test_optics_params_reject_bad_values(kwargs: dict) -> None:
    with pytest.raises(ValidationError):
        OpticsParams(**kwargs)


def test_na_error_names_both_values() -> None:
    with pytest.raises(ValidationError, match=r"na=1\.6.*refractive_index=1\.515"):
        OpticsParams(na=1.6)


def test_psf_sigma_matches_zhang_approximation() -> None:
    assert psf_sigma_um(OpticsParams(na=1.0, wavelength_nm=500)) == pytest.approx(0.105)


@pytest.mark.parametrize("dz", [0.0, 0.4])
def test_gaussian_kernel_normalized_with_expected_second_moment(dz: float) -> None:
    optics, pixel = OpticsParams(), 0.03
    kernel = psf_kernel(optics, pixel, dz)
    assert (
        kernel.dtype == np.float64
        and kernel.shape[0] % 2 == 1
        and kernel.shape[0] == kernel.shape[1]
    )
    assert kernel.sum() == pytest.approx(1.0)
    sigma_px = np.hypot(psf_sigma_um(optics), defocus_sigma_um(optics, dz)) / pixel
    assert kernel.shape[0] >= 8 * sigma_px
    assert np.sqrt(_second_moment_px2(kernel)) == pytest.approx(sigma_px, rel=0.01)


def test_airy_first_minimum_near_0_61_lambda_over_na() -> None:
    pixel = 0.005
    kernel = psf_kernel(AIRY, pixel)
    assert kernel.sum() == pytest.approx(1.0)
    profile = kernel[kernel.shape[0] // 2, kernel.shape[0] // 2 :]
    first_min = np.argmax(np.diff(profile) > 0) * pixel
    assert first_min == pytest.approx(0.61 * 0.520 / 1.4, rel=0.03)
    assert profile[0] > 50 * profile.max(
        where=np.arange(profile.size) > first_min / pixel + 2, initial=0
    )


@pytest.mark.parametrize("optics", [OpticsParams(), AIRY], ids=["gaussian", "airy"])
def test_defocus_blur_grows_with_abs_dz_and_is_symmetric(optics: OpticsParams) -> None:
    assert defocus_sigma_um(optics, 0.0) == 0.0
    widths = []
    for dz in (0.0, 0.3, 0.8, 1.5):
        k = psf_kernel(optics, 0.05, dz)
        np.testing.assert_array_equal(k, psf_kernel(optics, 0.05, -dz))
        widths.append(_second_moment_px2(k))
    assert all(b > a * 1.05 for a, b in pairwise(widths))


def test_psf_kernel_rejects_bad_size_and_pixel() -> None:
    with pytest.raises(ValueError, match=r"size.*4"):
        psf_kernel(OpticsParams(), 0.1, size=4)
    with pytest.raises(ValueError, match=r"pixel_size_um.*-0\.1"):
        psf_kernel(OpticsParams(), -0.1)


@pytest.mark.parametrize("optics", [OpticsParams(), AIRY], ids=["gaussian", "airy"])
def test_blur_keeps_flux_and_flat_edges(optics: OpticsParams) -> None:
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 100, (40, 56))
    out = blur(image, optics, 0.03, dz_um=0.3)
    assert out.dtype == np.float32 and out.shape == image.shape and out.min() >= 0
    assert out.sum() == pytest.approx(image.sum(), rel=1e-4)
    assert out.std() < image.std() / 2
    np.testing.assert_allclose(blur(np.full((30, 30), 7.0), optics, 0.03, 1.0), 7.0, rtol=1e-4)


# ---- scan -------------------------------------------------------------------------------


def test_bin_image_sums_blocks_and_rejects_bad_shapes() -> None:
    image = np.arange(6 * 9, dtype=np.float64).reshape(6, 9)
    binned = bin_image(image, 3)
    assert binned.shape == (2, 3)
    assert binned[0, 0] == image[:3, :3].sum()
    assert binned.sum() == pytest.approx(image.sum())
    with pytest.raises(ValueError, match=r"\(6, 9\).*factor 2"):
        bin_image(image, 2)


def test_bidirectional_shift_integer_moves_odd_rows_exactly() -> None:
    image = np.random.default_rng(0).uniform(size=(6, 10)).astype(np.float32)
    out = bidirectional_shift(image, 2.0)
    np.testing.assert_array_equal(out[0::2], image[0::2])
    np.testing.assert_array_equal(out[1::2, 2:], image[1::2, :-2])
    np.testing.assert_array_equal(out[1::2, :2], np.repeat(image[1::2, :1], 2, axis=1))
    back = bidirectional_shift(image, -3.0)
    np.testing.assert_array_equal(back[1::2, :-3], image[1::2, 3:])


def test_bidirectional_shift_subpixel_interpolates_linearly() -> None:
    ramp = np.tile(np.arange(12, dtype=np.float32), (4, 1))
    out = bidirectional_shift(ramp, 0.25)
    np.testing.assert_allclose(out[1, 1:], ramp[1, 1:] - 0.25)
    assert out[1, 0] == 0.0


def test_scan_params_validation() -> None:
    with pytest.raises(ValidationError):
        ScanParams(downsample=0)


# ---- composed model ---------------------------------------------------------------------


@pytest.mark.parametrize("psf", ["gaussian", "airy"])
@pytest.mark.parametrize("z", [None, 0.0, -0.3])
def test_point_source_flux_conserved_through_forward_model(psf: str, z: float | None) -> None:
    model = ForwardModel(
        optics=OpticsParams(psf=psf),
        scan=ScanParams(downsample=4, bidirectional=True, phase_px=0.5),
    )
    fine = np.zeros((128, 128))
    fine[64, 64] = 5000.0
    photons = model.expected_photons(fine, z)
    assert photons.shape == (32, 32) and photons.dtype == np.float32
    assert photons.sum() == pytest.approx(5000.0, rel=1e-4)


def test_defocus_spreads_the_recorded_spot() -> None:
    model = ForwardModel(scan=ScanParams(downsample=2), focus_z_um=1.0)
    fine = np.zeros((64, 64))
    fine[32, 32] = 1000.0
    peaks = [model.expected_photons(fine, z).max() for z in (1.0, 1.5, 2.5)]
    assert model.fine_pixel_size_um == pytest.approx(0.05)
    assert peaks[0] > peaks[1] > peaks[2]
    assert model.expected_photons(fine).max() == peaks[0]


def test_forward_record_seeding_and_mean() -> None:
    model = ForwardModel(scan=ScanParams(downsample=2))
    fine = np.full((64, 64), 10.0)
    a, b = model.record(fine, 3), model.record(fine, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (32, 32) and a.dtype == np.uint16
    assert not np.array_equal(a, model.record(fine, 4))
    frames = np.stack([model.record(fine, s) for s in range(10)])
    assert frames.mean() == pytest.approx(model.expected_adu(fine).mean(), rel=0.005)
    out = np.empty((32, 32), np.uint16)
    assert model.record(fine, 3, out=out) is out


def test_forward_model_rejects_non_2d_and_bad_params() -> None:
    with pytest.raises(ValueError, match=r"\(2, 8, 8\)"):
        ForwardModel().expected_photons(np.zeros((2, 8, 8)))
    with pytest.raises(ValidationError):
        ForwardModel(pixel_size_um=0)
    with pytest.raises(ValidationError):
        ForwardModel(optics={"na": 1.6})
