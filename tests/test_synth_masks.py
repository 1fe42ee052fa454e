"""The synthetic cell label time-lapses (calibration.sim.masks, ``scopecast synthesize masks``):
consistent ids, a partition at the asked density, divisions with lineage, borders, files."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from pydantic import ValidationError
from scipy import ndimage
from typer.testing import CliRunner

from calibration.sim.masks import (
    MaskMovie,
    MaskParams,
    _Simulator,
    read_lineage,
    synthesize_masks,
    write_masks,
)
from engines.synthesis.cli import app

MOVING = MaskParams(
    frames=24,
    height=96,
    width=112,
    density=0.6,
    drift_um=(0.3, 0.6),
    rotation_deg=0.3,
    speed_um=0.8,
    cycle_frames=16,
    seed=11,
)


@pytest.fixture(scope="module")
def movie() -> MaskMovie:
    return synthesize_masks(MOVING)


def border_labels(frame: np.ndarray) -> set[int]:
    edge = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]])
    return set(np.unique(edge).tolist()) - {0}


def presence(labels: np.ndarray) -> dict[int, list[int]]:
    """label -> the frames it is present in."""
    seen: dict[int, list[int]] = {}
    for t, frame in enumerate(labels):
        for k in np.unique(frame).tolist():
            if k:
                seen.setdefault(k, []).append(t)
    return seen


def test_ids_persist_and_centroids_move_within_the_bound(movie: MaskMovie) -> None:
    p, table = movie.params, movie.table
    for k, frames in presence(movie.labels).items():
        assert frames == list(range(frames[0], frames[-1] + 1)), f"label {k} has a gap"
    slack_px = 0.5 * p.radius_px  # a centroid also shifts as its outline and neighbours change
    checked = 0
    for t in range(1, p.frames):
        a, b = table[table["t"] == t - 1], table[table["t"] == t]
        edge = border_labels(movie.labels[t - 1]) | border_labels(movie.labels[t])
        _, ia, ib = np.intersect1d(a["id"], b["id"], return_indices=True)
        for i, j in zip(ia, ib, strict=True):
            if int(a["id"][i]) in edge:
                continue  # the visible part of a cell crossing the border jumps
            step = math.hypot(b["y"][j] - a["y"][i], b["x"][j] - a["x"][i])
            r_um = math.hypot(a["y"][i] - (p.height - 1) / 2, a["x"][i] - (p.width - 1) / 2)
            bound = p.step_bound_um(r_um * p.pixel_um) / p.pixel_um + slack_px
            assert step <= bound, (t, int(a["id"][i]), step, bound)
            checked += 1
    assert checked > 200


def test_cell_centres_never_move_more_than_the_step_bound() -> None:
    p = MOVING.model_copy(update={"speed_um": 2.0, "density": 0.9})
    sim = _Simulator(p)
    for _ in range(8):
        cells = sim.cells
        before = {u: (y, x) for u, y, x in zip(cells.uid.tolist(), cells.y, cells.x, strict=True)}
        sim.step()
        for uid, y, x in zip(sim.cells.uid.tolist(), sim.cells.y, sim.cells.x, strict=True):
            if uid in before:  # daughters are new cells
                y0, x0 = before[uid]
                dist = math.hypot(y0 - sim.center[0], x0 - sim.center[1]) * p.pixel_um
                step = math.hypot(y - y0, x - x0) * p.pixel_um
                assert step <= p.step_bound_um(dist) + 1e-9


def test_labels_are_connected_cells_that_touch_without_overlap() -> None:
    m = synthesize_masks(MaskParams(frames=3, height=96, width=96, density=0.9, seed=2))
    for frame in m.labels:
        for k in np.unique(frame)[1:]:
            _, pieces = ndimage.label(frame == k)
            assert pieces == 1, f"label {k} is in {pieces} pieces"
        # touching cells share a border: horizontally adjacent pixels of two different cells
        left, right = frame[:, :-1], frame[:, 1:]
        assert np.sum((left != right) & (left > 0) & (right > 0)) > 100
    # one label per pixel is a partition by construction; the table agrees with the images
    t0 = m.table[m.table["t"] == 0]
    assert int(t0["area"].sum()) == int(np.count_nonzero(m.labels[0]))


@pytest.mark.parametrize("density", [0.15, 0.5, 0.8, 0.9])
def test_density_holds_in_every_frame(density: float) -> None:
    m = synthesize_masks(
        MaskParams(frames=8, height=96, width=96, density=density, drift_um=(0.2, 0.4), seed=5)
    )
    covered = (m.labels > 0).mean(axis=(1, 2))
    assert np.all(np.abs(covered - density) <= 0.02), covered
    assert [f.density for f in m.frames] == pytest.approx(covered.tolist())


def test_divisions_give_two_new_ids_with_the_parent_recorded(
    movie: MaskMovie, tmp_path: Path
) -> None:
    paths = write_masks(movie, tmp_path)
    lineage = {tr.label: tr for tr in read_lineage(paths["lineage"])}
    with paths["tracks"].open() as f:
        rows = list(csv.DictReader(f))
    csv_parent = {int(r["id"]): int(r["parent"]) for r in rows}
    daughters: dict[int, list[int]] = {}
    for tr in movie.tracks:
        if tr.kind == "division":
            daughters.setdefault(tr.parent, []).append(tr.label)
    pairs = {m: d for m, d in daughters.items() if len(d) == 2}
    assert len(pairs) >= 3 and movie.divisions == len(daughters)
    for mother, (d1, d2) in pairs.items():
        end = lineage[mother].end
        for d in (d1, d2):
            assert lineage[d].parent == mother and csv_parent[d] == mother
            assert d > max(k for k, tr in lineage.items() if tr.begin <= end)  # a new id
        if lineage[d1].begin == lineage[d2].begin == end + 1:
            # born where the mother was: daughters' centroids near her last one
            last = movie.table[(movie.table["t"] == end) & (movie.table["id"] == mother)]
            first = movie.table[
                (movie.table["t"] == end + 1) & np.isin(movie.table["id"], [d1, d2])
            ]
            gap = np.hypot(first["y"] - last["y"][0], first["x"] - last["x"][0])
            assert np.all(gap < 2 * movie.params.radius_px)
    plain = synthesize_masks(MOVING.model_copy(update={"divisions": False, "frames": 12}))
    assert plain.divisions == 0 and all(tr.kind != "division" for tr in plain.tracks)


def test_res_track_agrees_with_the_label_images(movie: MaskMovie, tmp_path: Path) -> None:
    paths = write_masks(movie, tmp_path)
    lineage = {tr.label: tr for tr in read_lineage(paths["lineage"])}
    seen = presence(tifffile.imread(paths["masks"]))
    assert set(seen) == set(lineage)
    for k, tr in lineage.items():
        assert (tr.begin, tr.end) == (seen[k][0], seen[k][-1])
        if tr.parent:
            assert lineage[tr.parent].end < tr.begin
    rows = list(csv.DictReader(paths["tracks"].open()))
    assert len(rows) == sum(len(v) for v in seen.values())
    assert list(rows[0]) == ["id", "t", "y", "x", "area", "parent"]


def test_ome_tiff_reads_back_with_axes_and_pixel_size(movie: MaskMovie, tmp_path: Path) -> None:
    paths = write_masks(movie, tmp_path, ctc=True)
    p = movie.params
    with tifffile.TiffFile(paths["masks"]) as tif:
        series = tif.series[0]
        assert tif.is_ome and series.axes == "TYX"
        assert series.shape == (p.frames, p.height, p.width) and series.dtype == np.uint16
        assert tif.ome_metadata is not None
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
        assert pixels["PhysicalSizeX"] == pytest.approx(p.pixel_um)
        assert pixels["PhysicalSizeY"] == pytest.approx(p.pixel_um)
        assert pixels["PhysicalSizeXUnit"] == "µm"
        np.testing.assert_array_equal(series.asarray(), movie.labels)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "mask005.tif"), movie.labels[5])
    assert MaskParams.model_validate_json(paths["params"].read_text()) == p


def test_cells_enter_and_leave_through_the_borders(movie: MaskMovie) -> None:
    by_label = {tr.label: tr for tr in movie.tracks}
    mothers = {tr.parent for tr in movie.tracks if tr.kind == "division"}
    entered = [tr for tr in movie.tracks if tr.kind in ("entered", "reentry")]
    left = [
        tr for tr in movie.tracks if tr.end < movie.params.frames - 1 and tr.label not in mothers
    ]
    assert entered and left
    for tr in entered:
        assert tr.label in border_labels(movie.labels[tr.begin])
    for tr in left:
        assert tr.label in border_labels(movie.labels[tr.end])
    for tr in movie.tracks:
        if tr.kind == "reentry":
            assert by_label[tr.parent].cell == tr.cell


def test_same_seed_same_movie_other_seed_other_movie() -> None:
    p = MaskParams(frames=4, height=64, width=64, density=0.7, seed=3)
    a, b = synthesize_masks(p), synthesize_masks(p)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.tracks == b.tracks
    c = synthesize_masks(p.model_copy(update={"seed": 4}))
    assert not np.array_equal(a.labels, c.labels)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"radius_um": 0.5}, "at least 2 px"),
        ({"radius_um": 30.0}, "more than a quarter"),
        ({"density": 0.99}, "less than or equal to 0.95"),
        ({"density": 0.0}, "greater than 0"),
        ({"drift_um": (5.0, 5.0)}, "drift_um"),
        ({"rotation_deg": 5.0, "height": 512, "width": 512}, "rotation_deg"),
        ({"frames": 0}, "greater than or equal to 1"),
        ({"densty": 0.5}, "Extra inputs are not permitted"),
    ],
)
def test_bad_parameters_are_clear_errors(change: dict, says: str) -> None:
    base = {"height": 64, "width": 64}
    with pytest.raises(ValidationError, match=says):
        MaskParams(**(base | change))


def _scopecast() -> list[str]:
    exe = Path(sys.executable).with_name("scopecast")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "stream"]


def test_cli_writes_the_movie_and_reports_mistakes(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    cmd = [*_scopecast(), "synthesize", "masks", "--out", str(out), "--frames", "6"]
    args = ["--size", "64", "--density", "0.7", "--seed", "1", "--drift-um", "0.2", "0.3"]
    r = subprocess.run(cmd + args, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert "6 frames 64x64" in r.stdout and "divisions" in r.stdout and "tracks" in r.stdout
    with tifffile.TiffFile(out / "masks.ome.tif") as tif:
        assert tif.series[0].shape == (6, 64, 64)
    assert (out / "tracks.csv").exists() and (out / "res_track.txt").exists()
    # the same command in-process: the JSON summary agrees with the files
    json_out = tmp_path / "json"
    r2 = CliRunner().invoke(
        app, ["masks", "--out", str(json_out), "--frames", "6", *args, "--json", "--no-divisions"]
    )
    assert r2.exit_code == 0, r2.output
    summary = json.loads(r2.stdout)
    assert summary["frames"] == 6 and summary["divisions"] == 0
    assert summary["tracks"] == len(read_lineage(json_out / "res_track.txt"))
    r = subprocess.run(
        [*cmd, "--radius-um", "0.4"], capture_output=True, text=True, timeout=120, check=False
    )
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "radius_um=0.4" in lines[0]
