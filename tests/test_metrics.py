"""Image-quality metrics: agreement with scikit-image, known values, and behaviour under blur."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from skimage import data, transform
from skimage.metrics import normalized_root_mse, peak_signal_noise_ratio, structural_similarity

from calibration.metrics import (
    Decorrelation,
    decorrelation_resolution,
    entropy,
    flicker,
    focus_score,
    ms_ssim,
    mutual_information,
    nrmse,
    psnr,
    ssim,
)


def _camera(size: int = 256) -> np.ndarray:
    """The scikit-image camera scene, resampled to size x size, float64 in 0..255."""
    image = data.camera().astype(np.float64)
    return transform.resize(image, (size, size), anti_aliasing=True, preserve_range=True)


def _pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    """A random pair and a structured (camera + noise) pair, both 64 x 80."""
    rng = np.random.default_rng(3)
    random_ref = rng.random((64, 80))
    random_img = random_ref + 0.1 * rng.standard_normal((64, 80))
    scene = _camera(256)[100:164, 60:140]
    return [(random_ref, random_img), (scene, scene + 8.0 * rng.standard_normal(scene.shape))]


def _white_texture_blurred(sigma: float, seed: int = 11) -> np.ndarray:
    """White texture (uniform 0..1, 256 x 256) blurred by a Gaussian of `sigma` px, noise 0.01."""
    rng = np.random.default_rng(seed)
    texture = ndimage.gaussian_filter(rng.random((256, 256)), sigma)
    return texture + 0.01 * rng.standard_normal(texture.shape)


# ---- psnr, ssim, nrmse --------------------------------------------------------------------


@pytest.mark.parametrize("pair", _pairs(), ids=["random", "structured"])
def test_paired_metrics_equal_scikit_image(pair: tuple[np.ndarray, np.ndarray]) -> None:
    ref, img = pair
    rng = float(ref.max() - ref.min())
    assert psnr(ref, img) == pytest.approx(peak_signal_noise_ratio(ref, img, data_range=rng))
    assert psnr(ref, img, data_range=255) == pytest.approx(
        peak_signal_noise_ratio(ref, img, data_range=255)
    )
    expected_ssim = structural_similarity(
        ref, img, data_range=rng, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ssim(ref, img) == pytest.approx(expected_ssim)
    for norm in ("euclidean", "min-max", "mean"):
        expected = normalized_root_mse(ref, img, normalization=norm)
        assert nrmse(ref, img, normalization=norm) == pytest.approx(expected)


def test_identical_images_are_perfect() -> None:
    ref = _camera(64)
    assert psnr(ref, ref) == math.inf
    assert ssim(ref, ref) == pytest.approx(1.0, abs=1e-12)
    assert nrmse(ref, ref) == 0.0


def test_psnr_known_value() -> None:
    ref = np.zeros((16, 16))
    ref[0, 0] = 1.0  # data range 1
    img = ref + 0.1  # mse 0.01 -> 20 dB
    assert psnr(ref, img) == pytest.approx(20.0)


def test_paired_metrics_reject_bad_inputs() -> None:
    a = np.ones((32, 32))
    with pytest.raises(ValueError, match=r"\(32, 32\) vs \(32, 31\)"):
        psnr(a, np.ones((32, 31)))
    with pytest.raises(ValueError, match="2-D"):
        ssim(np.ones((2, 32, 32)), np.ones((2, 32, 32)))
    bad = np.ones((32, 32))
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        nrmse(a, bad)
    with pytest.raises(ValueError, match=r"constant.*data_range"):
        psnr(a, a + 1)
    with pytest.raises(ValueError, match="normalization"):
        nrmse(a, a, normalization="max")
    with pytest.raises(ValueError, match=r"10x40 px.*11 px"):
        ssim(np.ones((10, 40)), np.ones((10, 40)), data_range=1)


# ---- ms_ssim ------------------------------------------------------------------------------


def test_ms_ssim_identical_is_one() -> None:
    ref = _camera(256)
    assert ms_ssim(ref, ref) == pytest.approx(1.0, abs=1e-9)


def test_ms_ssim_single_scale_is_ssim() -> None:
    for ref, img in _pairs():
        assert ms_ssim(ref, img, weights=(1.0,)) == pytest.approx(ssim(ref, img), rel=1e-12)


def test_ms_ssim_coarsest_scale_is_ssim_of_2x2_averaged_images() -> None:
    ref = _camera(256)
    img = ref + 10.0 * np.random.default_rng(0).standard_normal(ref.shape)
    small_ref, small_img = ref, img
    for _ in range(4):
        small_ref = small_ref.reshape(small_ref.shape[0] // 2, 2, -1, 2).mean(axis=(1, 3))
        small_img = small_img.reshape(small_img.shape[0] // 2, 2, -1, 2).mean(axis=(1, 3))
    expected = ssim(small_ref, small_img, data_range=np.ptp(ref))
    assert ms_ssim(ref, img, weights=(0, 0, 0, 0, 1.0)) == pytest.approx(expected, rel=1e-12)


def test_ms_ssim_falls_with_blur() -> None:
    ref = _camera(256)
    scores = [ms_ssim(ref, ndimage.gaussian_filter(ref, s)) for s in (0.5, 1, 2, 4)]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores == sorted(scores, reverse=True)
    assert len(set(scores)) == len(scores)
    assert scores[0] > 0.99 and scores[-1] < 0.9


def test_ms_ssim_too_small_names_the_size() -> None:
    small = _camera(256)[:175, :200]
    with pytest.raises(ValueError, match=r"175x200 px.*176 px"):
        ms_ssim(small, small)
    assert ms_ssim(small, small, weights=(0.3, 0.3, 0.4)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="weights"):
        ms_ssim(small, small, weights=())


# ---- information --------------------------------------------------------------------------


def test_mutual_information_with_itself_is_entropy() -> None:
    image = _camera(128)
    assert mutual_information(image, image) == pytest.approx(entropy(image, bins=64), rel=1e-9)
    assert mutual_information(image, image, bins=16) == pytest.approx(entropy(image, bins=16))


def test_mutual_information_of_independent_noise_is_near_zero() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.random((256, 256)), rng.random((256, 256))
    assert 0.0 <= mutual_information(a, b) < 0.05
    assert mutual_information(a, 3 * a + 1) > 5.0


def test_entropy_known_values() -> None:
    assert entropy(np.arange(256.0).reshape(16, 16)) == pytest.approx(8.0)
    assert entropy(np.full((8, 8), 7.0)) == 0.0
    with pytest.raises(ValueError, match="bins"):
        entropy(np.ones((4, 4)), bins=1)


# ---- decorrelation ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blur_series() -> dict[float, Decorrelation]:
    return {s: decorrelation_resolution(_white_texture_blurred(s)) for s in (1.0, 2.0, 4.0)}


def test_decorrelation_coarsens_with_blur(blur_series: dict[float, Decorrelation]) -> None:
    res = [blur_series[s].resolution_px for s in (1.0, 2.0, 4.0)]
    assert res[0] < res[1] < res[2]
    assert res[2] >= 2.5 * res[0]
    assert all(0 < blur_series[s].kc <= 1 and blur_series[s].amplitude > 0.5 for s in blur_series)


def test_decorrelation_matches_the_noise_crossing(blur_series: dict[float, Decorrelation]) -> None:
    # Signal spectrum 0.2887 * 256 * exp(-2 pi^2 s^2 f^2) meets the noise floor 0.01 * 256 at
    # f = 0.4127 / s cycles/px, i.e. a resolution of 2.42 s px.
    for s in (2.0, 4.0):
        assert blur_series[s].resolution_px == pytest.approx(2.42 * s, rel=0.15)


def test_decorrelation_sharp_image_resolves_near_nyquist() -> None:
    noisy = _camera(256) + 2.0 * np.random.default_rng(2).standard_normal((256, 256))
    result = decorrelation_resolution(noisy)
    assert 2.0 <= result.resolution_px < 3.0  # sigma-1 blur reads about 3.3
    assert result.kc == pytest.approx(2.0 / result.resolution_px)


def test_decorrelation_of_white_noise_has_no_peak() -> None:
    # Descloux et al.: a flat spectrum gives a d(r) rising to Nyquist with no local maximum, so
    # signal and noise cannot be told apart; the result says so instead of claiming 2 px.
    noise = np.random.default_rng(4).standard_normal((256, 256))
    result = decorrelation_resolution(noise, pixel_size_um=0.1)
    assert result.kc == 0.0 and result.amplitude == 0.0
    assert result.resolution_px == math.inf and result.resolution_um == math.inf


def test_decorrelation_pixel_size_and_offset() -> None:
    image = _white_texture_blurred(2.0)
    plain = decorrelation_resolution(image)
    scaled = decorrelation_resolution(image + 1000.0, pixel_size_um=0.065)
    assert plain.resolution_um is None
    assert scaled.resolution_px == pytest.approx(plain.resolution_px)
    assert scaled.resolution_um == pytest.approx(plain.resolution_px * 0.065)


def test_decorrelation_rejects_bad_arguments() -> None:
    image = _white_texture_blurred(2.0)
    with pytest.raises(ValueError, match=r"16x300 px.*32 px"):
        decorrelation_resolution(np.ones((16, 300)))
    with pytest.raises(ValueError, match="n_radii"):
        decorrelation_resolution(image, n_radii=5)
    with pytest.raises(ValueError, match="n_filters"):
        decorrelation_resolution(image, n_filters=2)
    with pytest.raises(ValueError, match="pixel_size_um"):
        decorrelation_resolution(image, pixel_size_um=-1.0)


# ---- focus and flicker --------------------------------------------------------------------


def test_focus_score_falls_with_blur_and_ignores_gain() -> None:
    image = _camera(128) + 10.0
    scores = [focus_score(ndimage.gaussian_filter(image, s)) for s in (0.5, 1, 2, 4)]
    assert focus_score(image) > scores[0]
    assert scores == sorted(scores, reverse=True)
    assert focus_score(7.5 * image) == pytest.approx(focus_score(image), rel=1e-12)
    with pytest.raises(ValueError, match="about 0"):
        focus_score(image - image.mean())


def test_flicker() -> None:
    rng = np.random.default_rng(8)
    base = 100.0 + 10.0 * rng.random((64, 64))
    static = np.repeat(base[None], 5, axis=0)
    assert flicker(static) == 0.0
    quiet = static + rng.standard_normal(static.shape)
    loud = static + 5.0 * rng.standard_normal(static.shape)
    assert 0 < flicker(quiet) < flicker(loud)
    assert flicker(np.array([np.ones((2, 2)), 3 * np.ones((2, 2))])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="T >= 2"):
        flicker(static[:1])
    with pytest.raises(ValueError, match="T >= 2"):
        flicker(base)
