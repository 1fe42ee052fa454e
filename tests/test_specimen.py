"""Tests for the simulated specimens: determinism, motion, flux, division, tiling, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from calibration.sim.specimen import BrightfieldSpecimen, FluorescentSpecimen, Specimen, View


def _periodic_centroid(image: np.ndarray, view: View, period: float) -> np.ndarray:
    """Intensity centroid (x, y) on a periodic field, via the circular mean of each axis."""
    rows, cols = view.shape
    x0, y0 = view.origin_um
    xs = x0 + view.pixel_size_um * np.arange(cols)
    ys = y0 + view.pixel_size_um * np.arange(rows)
    weight = image.astype(np.float64) - image.min()
    out = []
    for coords, profile in ((xs, weight.sum(axis=0)), (ys, weight.sum(axis=1))):
        angle = 2.0 * math.pi * coords / period
        mean_angle = math.atan2((profile * np.sin(angle)).sum(), (profile * np.cos(angle)).sum())
        out.append(mean_angle * period / (2 * math.pi))
    return np.array(out)


def _periodic_distance(a: np.ndarray, b: np.ndarray, period: float) -> float:
    d = (a - b + 0.5 * period) % period - 0.5 * period
    return float(np.hypot(*d))


# --- View -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"shape": (0, 10), "pixel_size_um": 0.1}, "(0, 10)"),
        ({"shape": (10, -3), "pixel_size_um": 0.1}, "(10, -3)"),
        ({"shape": (10,), "pixel_size_um": 0.1}, "(10,)"),
        ({"shape": (10.5, 10), "pixel_size_um": 0.1}, "10.5"),
        ({"shape": (10, 10), "pixel_size_um": 0.0}, "0.0"),
        ({"shape": (10, 10), "pixel_size_um": -0.25}, "-0.25"),
        ({"shape": (10, 10), "pixel_size_um": float("nan")}, "nan"),
        ({"shape": (10, 10), "pixel_size_um": 0.1, "center_um": (0.0, float("inf"))}, "inf"),
    ],
)
def test_bad_view_raises_naming_the_value(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match="View") as info:
        View(**kwargs)
    assert needle in str(info.value)


def test_view_geometry_and_normalisation() -> None:
    view = View(shape=(np.int64(4), 6), pixel_size_um=0.5, center_um=(10, -2))
    assert view.shape == (4, 6) and isinstance(view.shape[0], int)
    assert view.origin_um == (10 - 1.25, -2 - 0.75)
    assert view.bounds_um == (8.5, 11.5, -3.0, -1.0)


@pytest.mark.parametrize("specimen", [FluorescentSpecimen(0), BrightfieldSpecimen(0)])
def test_specimens_satisfy_protocol_and_reject_bad_time(specimen: Specimen) -> None:
    assert isinstance(specimen, Specimen)
    with pytest.raises(ValueError, match="nan"):
        specimen.render(float("nan"), View((8, 8), 0.1))


@pytest.mark.parametrize(
    ("factory", "needle"),
    [
        (lambda: FluorescentSpecimen(-1), "-1"),
        (lambda: FluorescentSpecimen(0, field_um=0.0), "field_um"),
        (lambda: FluorescentSpecimen(0, n_filaments=-2), "-2"),
        (lambda: BrightfieldSpecimen(0, illumination_photons=-5.0), "-5.0"),
        (lambda: BrightfieldSpecimen(0, cell_density_per_mm2=float("inf")), "inf"),
    ],
)
def test_bad_constructor_arguments(factory, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        factory()
    assert needle in str(info.value)


# --- FluorescentSpecimen --------------------------------------------------------------------


def test_fluorescent_output_contract_and_determinism() -> None:
    view = View((128, 96), 0.2, center_um=(3.0, -4.0))
    a = FluorescentSpecimen(7).render(2.5, view)
    b = FluorescentSpecimen(7).render(2.5, view)
    c = FluorescentSpecimen(8).render(2.5, view)
    assert a.dtype == np.float32 and a.shape == (128, 96)
    assert np.all(np.isfinite(a)) and a.min() >= 0.0
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 0.1 * a.mean()


def test_fluorescent_brightness_levels() -> None:
    peak = 3.0
    view = View((512, 512), 0.1)
    filaments = FluorescentSpecimen(1, n_nuclei=0, peak_photons=peak).render(0.0, view)
    nuclei = FluorescentSpecimen(1, n_filaments=0, peak_photons=peak).render(0.0, view)
    background = FluorescentSpecimen.BACKGROUND_FRACTION * peak
    assert np.median(filaments) == pytest.approx(background, rel=1e-3)
    assert 0.5 * peak < np.percentile(filaments, 99.9) < 1.5 * peak
    nucleus_pixels = nuclei[nuclei > background + 0.15 * peak]
    assert 0.2 * peak < np.median(nucleus_pixels) < 0.4 * peak


def test_fluorescent_things_move() -> None:
    view = View((256, 256), 0.2)
    spec = FluorescentSpecimen(3)
    a, b = spec.render(0.0, view), spec.render(5.0, view)
    assert np.abs(a - b).mean() > 0.2 * a.mean()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_filament_centroid_drifts_plausibly(seed: int) -> None:
    field = 200.0
    spec = FluorescentSpecimen(seed, field_um=field, n_filaments=1, n_nuclei=0)
    view = View((500, 500), field / 500)
    before = _periodic_centroid(spec.render(0.0, view), view, field)
    after = _periodic_centroid(spec.render(5.0, view), view, field)
    shift = _periodic_distance(before, after, field)
    assert 0.05 * 5 * 0.8 < shift < 0.3 * 5 * 1.2


def test_flux_is_grid_independent() -> None:
    spec = FluorescentSpecimen(4)
    coarse = spec.render(1.0, View((256, 256), 0.2)).astype(np.float64)
    fine = spec.render(1.0, View((512, 512), 0.1)).astype(np.float64)
    assert coarse.sum() == pytest.approx(fine.sum(), rel=0.02)
    binned = fine.reshape(256, 2, 256, 2).sum(axis=(1, 3))
    assert np.corrcoef(binned.ravel(), coarse.ravel())[0, 1] > 0.98


def test_field_repeats_periodically() -> None:
    spec = FluorescentSpecimen(5, field_um=40.0)
    a = spec.render(3.0, View((64, 64), 0.25, center_um=(1.0, 2.0)))
    b = spec.render(3.0, View((64, 64), 0.25, center_um=(41.0, -38.0)))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_nucleus_divides_into_two_blobs() -> None:
    peak = 1.0
    spec = FluorescentSpecimen(11, n_filaments=0, n_nuclei=1, peak_photons=peak)
    (t_div,) = spec.division_times
    assert 5.0 <= t_div <= 30.0
    threshold = 0.5 * FluorescentSpecimen.NUCLEUS_RELATIVE_DENSITY * peak

    def blobs(t: float) -> int:
        centre = spec.nuclei_at(t).mean(axis=0)
        image = spec.render(t, View((240, 240), 0.1, center_um=tuple(centre)))
        return ndimage.label(image > threshold)[1]

    assert len(spec.nuclei_at(t_div - 0.5)) == 1 and blobs(t_div - 0.5) == 1
    after = t_div + FluorescentSpecimen.SEPARATION_S + 1.0
    assert len(spec.nuclei_at(after)) == 2 and blobs(after) == 2


def test_some_nuclei_divide_early() -> None:
    times = FluorescentSpecimen(0).division_times
    assert len(times) == 6
    assert sum(5.0 <= t <= 30.0 for t in times) >= 3
    assert len(FluorescentSpecimen(0).nuclei_at(40.0)) >= 9


# --- BrightfieldSpecimen --------------------------------------------------------------------


def test_brightfield_output_contract_and_range() -> None:
    illumination = 800.0
    view = View((512, 512), 0.7, center_um=(-3000.0, 12000.0))
    img = BrightfieldSpecimen(2, illumination_photons=illumination).render(3600.0, view)
    assert img.dtype == np.float32 and img.shape == (512, 512)
    assert np.all(np.isfinite(img))
    assert img.min() > 0.0 and img.max() < 1.2 * illumination
    assert np.median(img) == pytest.approx(illumination, rel=0.05)
    assert (img < 0.97 * illumination).mean() > 0.02


def test_brightfield_deterministic_and_seeded() -> None:
    view = View((256, 256), 0.35, center_um=(-150.0, 75.0))
    a = BrightfieldSpecimen(5).render(100.0, view)
    np.testing.assert_array_equal(a, BrightfieldSpecimen(5).render(100.0, view))
    b = BrightfieldSpecimen(6).render(100.0, view)
    assert np.abs(a - b).max() > 20.0


def test_brightfield_overlapping_views_agree() -> None:
    spec = BrightfieldSpecimen(3)
    px = 0.5
    first = spec.render(7200.0, View((400, 400), px, center_um=(-90.0, 30.0)))
    dx, dy = 150, 80
    second = BrightfieldSpecimen(3).render(
        7200.0, View((400, 400), px, center_um=(-90.0 + dx * px, 30.0 + dy * px))
    )
    overlap_first, overlap_second = first[dy:, dx:], second[: 400 - dy, : 400 - dx]
    np.testing.assert_allclose(overlap_first, overlap_second, rtol=1e-4, atol=0.05)
    assert overlap_first.std() > 5.0


def test_brightfield_positions_differ_and_cells_move() -> None:
    spec = BrightfieldSpecimen(1)
    view = View((256, 256), 0.5)
    here = spec.render(0.0, view)
    there = spec.render(0.0, View((256, 256), 0.5, center_um=(5000.0, -2500.0)))
    assert np.abs(here - there).mean() > 2.0
    later = spec.render(1800.0, view)
    assert np.abs(here - later).mean() > 1.0


def test_brightfield_no_cells_is_smooth_background() -> None:
    img = BrightfieldSpecimen(0, cell_density_per_mm2=0.0, illumination_photons=500.0).render(
        0.0, View((64, 64), 1.0)
    )
    assert 0.95 * 500 < img.min() <= img.max() < 1.05 * 500


def test_nuclei_do_not_depend_on_filament_count() -> None:
    with_filaments = FluorescentSpecimen(9).nuclei_at(12.0)
    np.testing.assert_array_equal(
        with_filaments, FluorescentSpecimen(9, n_filaments=0).nuclei_at(12.0)
    )


def test_brightfield_changes_smoothly_in_time() -> None:
    spec = BrightfieldSpecimen(4)
    view = View((256, 256), 0.5)
    for t in (0.0, 3.0e3, 3.0e4, 7.0e4):
        now, next_second = spec.render(t, view), spec.render(t + 1.0, view)
        assert np.abs(next_second - now).max() < 0.03 * spec.illumination_photons
        assert np.abs(spec.render(t + 600.0, view) - now).max() > 0.05 * spec.illumination_photons


# --- puncta and membranes (registered kinds) -------------------------------------------------


@pytest.mark.parametrize("kind", ["puncta", "membranes"])
def test_new_kinds_render_deterministic_photons(kind: str) -> None:
    from calibration.sim.specimen import get_specimen_kind

    row = get_specimen_kind(kind)
    assert not row.transmitted
    view = View((96, 96), 0.1, (3.0, -2.0))
    image = row.factory(5).render(4.0, view)
    assert image.dtype == np.float32 and image.shape == (96, 96)
    assert np.isfinite(image).all() and image.min() >= 0 and image.max() > 0.5
    np.testing.assert_array_equal(image, row.factory(5).render(4.0, view))
    assert np.abs(image - row.factory(6).render(4.0, view)).mean() > 1e-3
    # flux is conserved across grids (fluorescence: photons per pixel scale with pixel area)
    fine, coarse = View((192, 192), 0.05, (3.0, -2.0)), View((48, 48), 0.2, (3.0, -2.0))
    total = float(image.sum())
    for v in (fine, coarse):
        assert float(row.factory(5).render(4.0, v).sum()) == pytest.approx(total, rel=0.05)


@pytest.mark.parametrize("kind", ["puncta", "membranes"])
def test_new_kinds_move_continuously(kind: str) -> None:
    from calibration.sim.specimen import get_specimen_kind

    spec = get_specimen_kind(kind).factory(2)
    view = View((128, 128), 0.1)
    now = spec.render(20.0, view)
    scale = float(np.abs(now).mean())
    assert float(np.abs(spec.render(20.001, view) - now).mean()) < 0.02 * scale
    assert float(np.abs(spec.render(30.0, view) - now).mean()) > 0.1 * scale


def test_puncta_fast_ones_move_fast_and_blink() -> None:
    from calibration.sim.specimen import PunctaSpecimen

    spec = PunctaSpecimen(1, fast_fraction=0.3)
    assert 0.15 < spec.fast.mean() < 0.45
    step = _periodic_distance_rows(spec.positions_at(1.0) - spec.positions_at(0.0), 50.0)
    assert step[spec.fast].min() > 0.5 and step[~spec.fast].max() < 0.6
    seen = np.stack([spec.visibility(t) for t in np.arange(0.0, 80.0, 0.5)])
    assert seen.min() == 0.0 and seen.max() == 1.0  # puncta disappear and come back
    assert np.abs(np.diff(seen, axis=0)).max() < 0.6  # ... fading, not popping


def test_membranes_are_thin_closed_outlines() -> None:
    from calibration.sim.specimen import MembraneSpecimen

    spec = MembraneSpecimen(0, n_cells=1, field_um=40.0)
    pts = spec.outline(0, 0.0)
    gaps = np.hypot(*np.diff(np.vstack([pts, pts[:1]]), axis=0).T)
    assert gaps.max() < 0.05  # closed: the last point runs back to the first
    centre = spec._c0[0]
    view = View((300, 300), 0.1, (float(centre[0]), float(centre[1])))
    image = spec.render(0.0, view)
    assert image[150, 150] < 0.2 * image.max()  # dim inside, bright rim
    assert (image > 0.5 * image.max()).mean() < 0.05  # a thin line


def _periodic_distance_rows(d: np.ndarray, period: float) -> np.ndarray:
    d = (d + 0.5 * period) % period - 0.5 * period
    return np.hypot(d[:, 0], d[:, 1])


# --- real images as a specimen ---------------------------------------------------------------


def _image_specimen(seed: int = 0, **kw):
    from conftest import stand_in_cells

    from calibration.sim.specimen import ImageSpecimen

    return ImageSpecimen([stand_in_cells(200, 1), stand_in_cells(160, 2)], seed, **kw)


def test_image_mosaic_is_deterministic_still_and_conserves_flux() -> None:
    spec = _image_specimen(peak_photons=2.0)
    view = View((96, 96), 0.1, (30.0, -20.0))
    image = spec.render(0.0, view)
    assert image.dtype == np.float32 and image.shape == (96, 96)
    assert image.min() >= 0 and 1.0 < image.max() < 6.0  # 99.5th percentile -> 2 photons
    np.testing.assert_array_equal(image, spec.render(50.0, view))  # nothing moves
    np.testing.assert_array_equal(image, _image_specimen(peak_photons=2.0).render(0.0, view))
    assert np.abs(image - _image_specimen(1, peak_photons=2.0).render(0.0, view)).mean() > 0.01
    # an overlapping view shows the same specimen (the same cells, at the same place)
    shifted = spec.render(0.0, View((96, 96), 0.1, (30.0 + 3.2, -20.0)))
    np.testing.assert_allclose(shifted[:, :-32], image[:, 32:], atol=1e-5)
    total = float(image.sum())  # photons per pixel scale with pixel area
    for v in (View((192, 192), 0.05, (30.0, -20.0)), View((48, 48), 0.2, (30.0, -20.0))):
        assert float(spec.render(0.0, v).sum()) == pytest.approx(total, rel=0.05)


def test_image_mosaic_cells_vary_in_magnification_and_content() -> None:
    spec = _image_specimen(pixel_um=(0.05, 0.2))
    cells = [spec._cell(ix, iy) for ix in range(6) for iy in range(6)]
    assert {c[0] for c in cells} == {0, 1}  # both images
    sizes = [c[3] for c in cells]
    assert 0.05 <= min(sizes) < 0.08 and 0.14 < max(sizes) <= 0.2


@pytest.mark.parametrize(
    ("images", "kw", "needle"),
    [
        ([], {}, "at least one image"),
        ([np.zeros((4, 16, 16))], {}, r"image 0 has shape \(4, 16, 16\)"),
        ([np.ones((16, 16))], {}, "image 0 is flat"),
        ([np.full((16, 16), np.nan)], {}, "NaN"),
        ([np.eye(16)], {"pixel_um": (0.2, 0.1)}, r"pixel_um=\(0.2, 0.1\)"),
    ],
)
def test_image_specimen_rejects_bad_images(images, kw, needle: str) -> None:
    from calibration.sim.specimen import ImageSpecimen

    with pytest.raises(ValueError, match=needle):
        ImageSpecimen(images, **kw)


def test_wheel_kinds_image_a_sources_images(stand_in_wheels) -> None:
    from calibration.sim.specimen import ImageSpecimen, get_specimen_kind
    from calibration.sim.wheels import SOURCES

    for name in SOURCES:
        row = get_specimen_kind(f"wheel-{name}")
        assert not row.transmitted and SOURCES[name].package in row.description
        spec = row.factory(3)
        assert isinstance(spec, ImageSpecimen) and len(spec._images) >= 1
        assert spec.render(0.0, View((64, 64), 0.1)).max() > 0
