"""Disk sinks under hostile input and disk faults ("never a silent zombie"): unknown times,
a full disk exactly at close, (rows, cols, k) frames, grid tiles, damaged files and indexes
given to `scopecast recover`. Real files read back with tifffile, a real RLIMIT_FSIZE."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import ome_types
import pytest
import tifffile

from stream.protocol import FrameHeader, StagePosition
from stream.sinks import OmeTiffSink, RunWriter, SinkError, read_index, recover
from stream.sinks import tiff as tiffmod
from stream.sinks.index import scan_index

REPO = Path(__file__).resolve().parents[1]
CHANNELS = ["DAPI", "FITC"]


def header(seq: int, index: dict[str, int], *, shape=(16, 24), dtype="uint16", **fields):
    defaults = {
        "stream": "cam",
        "seq": seq,
        "index": index,
        "shape": shape,
        "dtype": dtype,
        "mono_ns": time.monotonic_ns(),
        "wall_time": 1.7e9 + seq,
        "exposure_ms": 10.0,
        "pixel_size_um": 0.5,
        "acquisition": "acq-1",
    }
    return FrameHeader(**{**defaults, **fields})


def frame(seq: int, shape=(16, 24), dtype=np.uint16) -> np.ndarray:
    rng = np.random.default_rng(seq)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)


def ome_of(path: Path):
    """The file's OME-XML, parsed and type-checked by ome-types (the OME schema's model)."""
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome, f"{path} has no OME-XML"
        xml = tif.ome_metadata
    assert not any(bad in xml for bad in ('"nan"', '"None"', '"inf"', '"-inf"')), xml
    return ome_types.from_xml(xml), xml


def planes_on_disk(path: Path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        return [page.asarray() for page in tif.pages]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "stream", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
        check=False,
    )


# -- finding 3: unknown wall times, exposures, stage values --------------------------------------


def test_unknown_times_and_positions_never_fail_close(tmp_path: Path) -> None:
    """NaN / None / inf (which the protocol refuses, but a sink must survive) are left out of
    the OME-XML plane by plane; the XML stays valid and every plane is kept."""
    run = RunWriter(tmp_path / "run")
    oddities = [
        {},
        {"wall_time": math.nan},
        {"wall_time": None, "exposure_ms": math.inf},
        {"stage": StagePosition.model_construct(x=math.nan, y=None, z=1.0)},
        {"exposure_ms": None, "wall_time": -math.inf},
        {},
    ]
    for seq, odd in enumerate(oddities):
        h = header(seq, {"t": seq}, sizes={"t": 6}, stage=StagePosition(x=1.0, y=2.0, z=1.0))
        run.write_raw(h.model_copy(update=odd), frame(seq))
    assert [f.name for f in run.close()] == ["index.jsonl", "cam_p000_raw.ome.tif"]
    assert not run.errors and run.close_errors == []
    path = tmp_path / "run" / "cam_p000_raw.ome.tif"
    meta, _ = ome_of(path)
    planes = meta.images[0].pixels.planes
    assert [p.delta_t for p in planes] == [0.0, None, None, 3.0, None, 5.0]
    assert [p.exposure_time for p in planes] == [10.0, 10.0, None, 10.0, None, 10.0]
    assert [p.position_x for p in planes] == [1.0, 1.0, 1.0, None, 1.0, 1.0]
    assert [p.position_z for p in planes] == [1.0] * 6
    for seq, plane in enumerate(planes_on_disk(path)):
        np.testing.assert_array_equal(plane, frame(seq))

    lines = (tmp_path / "run" / "index.jsonl").read_text().splitlines()
    assert not any(bad in line for line in lines for bad in ("NaN", "Infinity"))  # plain JSON
    assert json.loads(lines[1])["header"]["wall_time"] is None
    result = recover(path)  # the index holds null times: recover keeps them unknown
    assert (result.planes, result.bad_crc, result.damaged) == (6, 0, 0)
    meta, _ = ome_of(result.output)
    assert [p.delta_t for p in meta.images[0].pixels.planes] == [0.0, None, None, 3.0, None, 5.0]
    with tifffile.TiffFile(result.output) as tif:
        np.testing.assert_array_equal(tif.asarray(), np.stack([frame(s) for s in range(6)]))


def test_no_known_time_at_all_leaves_delta_t_out(tmp_path: Path) -> None:
    sink = OmeTiffSink(tmp_path / "a.ome.tif", pixel_size_um=None)
    for seq in range(3):
        h = header(seq, {"t": seq}, exposure_ms=None, sizes={"t": 3})
        sink.write(frame(seq), h.model_copy(update={"wall_time": math.nan}))
    sink.close()
    meta, xml = ome_of(sink.path)
    assert "DeltaT" not in xml and "ExposureTime" not in xml
    assert meta.images[0].pixels.size_t == 3 and meta.images[0].pixels.planes == []


def test_run_close_reports_every_failure_after_closing_everything(
    tmp_path: Path, monkeypatch
) -> None:
    """One sink that cannot describe itself: the others and the index still close; one
    SinkError names the file and says what to do (not "free disk space": the disk is fine)."""
    run = RunWriter(tmp_path / "run")
    for seq in range(4):
        h = header(seq, {"t": seq // 2, "p": seq % 2}, sizes={"t": 2, "p": 2})
        run.write_raw(h, frame(seq))
    describe = OmeTiffSink.omexml

    def broken_for_p1(self):
        if "_p001_" in self.path.name:
            raise TypeError("unsupported operand type(s) for -: 'NoneType' and 'float'")
        return describe(self)

    monkeypatch.setattr(OmeTiffSink, "omexml", broken_for_p1)
    with pytest.raises(SinkError) as caught:
        run.close()
    message = str(caught.value)
    assert "1 file did not close cleanly" in message and "cam_p001_raw.ome.tif" in message
    assert "free disk space" not in message and "scopecast recover" in message
    assert run.errors["close"] == 1 and len(run.close_errors) == 1
    assert run.index._fd < 0  # the index was closed too
    assert [f.name for f in run.close()] == [  # a second close: the files, nothing raised
        "index.jsonl",
        "cam_p000_raw.ome.tif",
        "cam_p001_raw.ome.tif",
    ]
    monkeypatch.undo()
    assert ome_of(tmp_path / "run" / "cam_p000_raw.ome.tif")[0].images[0].pixels.size_t == 2
    failed = tmp_path / "run" / "cam_p001_raw.ome.tif"
    for plane, seq in zip(planes_on_disk(failed), (1, 3), strict=True):
        np.testing.assert_array_equal(plane, frame(seq))
    cli = run_cli("recover", str(failed))
    assert cli.returncode == 0, cli.stderr
    assert "2 planes recovered" in cli.stdout and "free disk space" not in cli.stdout + cli.stderr


def test_a_file_closed_mid_run_that_fails_is_reported_at_close(tmp_path: Path, monkeypatch) -> None:
    """A shape change closes the first part during write_raw; its failure must not be lost
    (nor lose the new frame): close() reports it."""
    run = RunWriter(tmp_path / "run")
    run.write_raw(header(0, {"t": 0}), frame(0))
    monkeypatch.setattr(OmeTiffSink, "omexml", lambda self: 1 / 0)
    rec = run.write_raw(header(1, {"t": 1}, shape=(8, 8)), frame(1, (8, 8)))
    assert rec["file"] == "cam_p000_raw_2.ome.tif" and run.errors["close"] == 1
    monkeypatch.undo()
    with pytest.raises(SinkError, match=r"1 file did not close cleanly: .*cam_p000_raw\.ome"):
        run.close()
    assert ome_of(tmp_path / "run" / "cam_p000_raw_2.ome.tif")[0].images[0].pixels.size_x == 8
    np.testing.assert_array_equal(planes_on_disk(tmp_path / "run" / "cam_p000_raw.ome.tif")[0],
                                  frame(0))  # fmt: skip


# -- finding 6: the reserved OME-XML room, and a disk that fills exactly at close ----------------


def test_placeholder_room_is_reserved_on_disk(tmp_path: Path) -> None:
    sink = OmeTiffSink(tmp_path / "a.ome.tif", pixel_size_um=0.5)
    for seq in range(5):
        sink.write(frame(seq), header(seq, {"t": seq}, sizes={"t": 5}))
    with tifffile.TiffFile(sink.path) as tif:
        tag = tif.pages.first.tags["ImageDescription"]
        assert tag.count == tiffmod.PLACEHOLDER_BYTES  # not cut at the padding
        assert tif.pages.first.description.startswith(tiffmod.PLACEHOLDER_PREFIX.decode())
        room = tag.valueoffset
    size = sink.path.stat().st_size
    sink.close()
    assert sink.path.stat().st_size == size  # the XML went into the room: no growth
    with tifffile.TiffFile(sink.path) as tif:
        tag = tif.pages.first.tags["ImageDescription"]
        assert tag.valueoffset == room and tif.is_ome and tif.series[0].shape == (5, 16, 24)
    meta, _ = ome_of(sink.path)
    assert meta.images[0].pixels.physical_size_x == 0.5


def run_child(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    prelude = f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


FULL_AT_CLOSE = """
    import json, resource, signal, sys, time
    from pathlib import Path
    import numpy as np
    import stream.sinks.tiff as tiffmod
    from stream.protocol import FrameHeader
    from stream.sinks import OmeTiffSink, SinkError

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # exceed RLIMIT_FSIZE -> OSError(EFBIG)
    path, room, spare = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    tiffmod.PLACEHOLDER_BYTES = room
    sink = OmeTiffSink(path, pixel_size_um=0.5, channel_names=["BF"])
    for i in range(20):
        h = FrameHeader(stream="cam", seq=i, index={"t": i}, shape=(32, 32), dtype="uint16",
                        mono_ns=time.monotonic_ns(), wall_time=1e9 + i, sizes={"t": 20})
        sink.write(np.full((32, 32), i, np.uint16), h)
    size = path.stat().st_size
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + spare, hard))  # full exactly at close
    try:
        sink.close()
        error = None
    except SinkError as e:
        error = str(e)
    print(json.dumps({"size": size, "error": error, "xml": len(sink.omexml())}))
"""


@pytest.mark.parametrize(
    ("room", "spare", "fits"),
    [
        (16384, 0, True),  # the XML fits its room: written in place, nothing to grow
        (512, 0, False),  # longer than the room: no byte can be appended
        (512, 700, False),  # longer than the room: the append is cut half-way
    ],
)
def test_full_disk_exactly_at_close(tmp_path: Path, room: int, spare: int, fits: bool) -> None:
    path = tmp_path / "a.ome.tif"
    child = run_child(FULL_AT_CLOSE, str(path), str(room), str(spare))
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout)
    assert (report["xml"] < room) == fits
    assert path.stat().st_size == report["size"]  # a failed append is cut back
    with tifffile.TiffFile(path) as tif:  # every plane readable, with or without OME-XML
        assert len(tif.pages) == 20
        assert [int(p.asarray()[0, 0]) for p in tif.pages] == list(range(20))
        assert tif.is_ome == fits
        if not fits:
            assert tif.pages.first.description.startswith(tiffmod.PLACEHOLDER_PREFIX.decode())
    if fits:
        assert report["error"] is None
        meta, _ = ome_of(path)
        assert meta.images[0].pixels.size_t == 20
    else:
        assert "free disk space" in report["error"] and "scopecast recover" in report["error"]
        assert "20 planes are intact" in report["error"]
    result = recover(path)  # no index: from the pages, with the placeholder's pixel size
    assert (result.planes, result.from_index) == (20, False)
    with tifffile.TiffFile(result.output) as tif:
        assert tif.is_ome
        np.testing.assert_array_equal(tif.asarray()[:, 0, 0], np.arange(20))
    assert ome_of(result.output)[0].images[0].pixels.physical_size_x == 0.5


# -- finding 9: (rows, cols, components) frames ---------------------------------------------------


@pytest.mark.parametrize(
    ("k", "dtype"), [(1, np.uint16), (2, np.uint8), (3, np.uint16), (4, np.float32)]
)
def test_frames_with_components_are_stored_as_samples(tmp_path: Path, k: int, dtype) -> None:
    shape = (16, 24, k)
    run = RunWriter(tmp_path / "run")
    sent = {}
    for seq in range(6):
        t, c = divmod(seq, 2)
        h = header(seq, {"t": t, "c": c}, shape=shape, dtype=np.dtype(dtype).name,
                   sizes={"t": 3, "c": 2}, channel=CHANNELS[c])  # fmt: skip
        sent[seq] = frame(seq, shape, dtype)
        run.write_raw(h, sent[seq])
    assert [f.name for f in run.close()] == ["index.jsonl", "cam_p000_raw.ome.tif"]
    assert not run.errors
    path = tmp_path / "run" / "cam_p000_raw.ome.tif"
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        assert series.axes == ("TCYXS" if k > 1 else "TCYX")
        data = series.asarray().reshape(3, 2, *shape)
        assert tif.pages.first.samplesperpixel == k
    for seq, plane in sent.items():
        np.testing.assert_array_equal(data[divmod(seq, 2)], plane)
    meta, _ = ome_of(path)
    px = meta.images[0].pixels
    assert [ch.samples_per_pixel for ch in px.channels] == [k, k]
    assert [ch.name for ch in px.channels] == CHANNELS
    records = read_index(tmp_path / "run" / "index.jsonl")
    with path.open("rb") as f:
        for r in records:
            f.seek(r["offset"])
            raw = f.read(r["nbytes"])
            assert zlib.crc32(raw) == r["crc32"] and r["shape"] == list(shape)
            np.testing.assert_array_equal(
                np.frombuffer(raw, dtype).reshape(shape), sent[r["header"]["seq"]]
            )
    by_index = recover(path)
    os.rename(tmp_path / "run" / "index.jsonl", tmp_path / "run" / "moved.jsonl")
    by_pages = recover(path, output=tmp_path / "pages.ome.tif")
    assert (by_index.planes, by_index.from_index) == (6, True)
    assert (by_pages.planes, by_pages.from_index) == (6, False)
    for result in (by_index, by_pages):
        with tifffile.TiffFile(result.output) as tif:
            got = tif.series[0].asarray().reshape(6, *shape)
        np.testing.assert_array_equal(got, np.stack([sent[s] for s in range(6)]))


def test_a_component_change_starts_a_new_file(tmp_path: Path) -> None:
    run = RunWriter(tmp_path / "run")
    run.write_raw(header(0, {"t": 0}), frame(0))
    run.write_raw(header(1, {"t": 1}, shape=(16, 24, 3)), frame(1, (16, 24, 3)))
    names = [f.name for f in run.close()]
    assert names == ["index.jsonl", "cam_p000_raw.ome.tif", "cam_p000_raw_2.ome.tif"]
    assert not run.errors
    assert planes_on_disk(tmp_path / "run" / names[2])[0].shape == (16, 24, 3)


# -- finding 10: grid tiles, channel names, z spacing ---------------------------------------------


def test_grid_tiles_get_their_own_files_with_channels_and_z_spacing(tmp_path: Path) -> None:
    """useq order t, p, g, c, z: 2 tiles x 2 channels x 3 z x 2 t -> one TCZYX file per tile
    and kind, channel names and PhysicalSizeZ from the stage's z (0.75 µm steps)."""
    sizes = {"t": 2, "p": 1, "g": 2, "c": 2, "z": 3}
    run = RunWriter(tmp_path / "run")
    sent: dict[tuple[int, int, int, int], np.ndarray] = {}
    seq = 0
    for t in range(2):
        for g in range(2):
            for c in range(2):
                for z in range(3):
                    stage = StagePosition(x=100.0 * g, y=0.0, z=10.0 + 0.75 * z + 0.01 * t)
                    h = header(seq, {"t": t, "p": 0, "g": g, "c": c, "z": z}, sizes=sizes,
                               stage=stage, channel=CHANNELS[c])  # fmt: skip
                    sent[t, g, c, z] = frame(seq)
                    run.write_raw(h, sent[t, g, c, z])
                    run.write_enhanced(h, sent[t, g, c, z] // 2, engine="dn", scale=1)
                    seq += 1
    names = sorted(f.name for f in run.close())
    assert not run.errors
    assert names == [
        "cam_p000_g000_dn.ome.tif",
        "cam_p000_g000_raw.ome.tif",
        "cam_p000_g001_dn.ome.tif",
        "cam_p000_g001_raw.ome.tif",
        "index.jsonl",
    ]
    for g in range(2):
        for kind, make in (("raw", lambda a: a), ("dn", lambda a: a // 2)):
            path = tmp_path / "run" / f"cam_p000_g{g:03d}_{kind}.ome.tif"
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                assert series.axes == "TCZYX" and series.shape == (2, 2, 3, 16, 24)
                data = series.asarray()
            for (t, gg, c, z), plane in sent.items():
                if gg == g:
                    np.testing.assert_array_equal(data[t, c, z], make(plane))
            meta, _ = ome_of(path)
            px = meta.images[0].pixels
            assert [ch.name for ch in px.channels] == CHANNELS
            assert px.physical_size_z == pytest.approx(0.75)
            assert px.physical_size_z_unit.value == "µm"
            assert {p.position_x for p in px.planes} == {100.0 * g}
            assert f"grid tile {g}" in meta.images[0].description


@pytest.mark.parametrize(
    ("z_of", "expected"),
    [
        (lambda z: 5.0 - 2.0 * z, 2.0),  # a stage stepping down: the spacing is still 2 µm
        (lambda z: [0.0, 1.0, 5.0][z], None),  # steps 1 and 4 µm: no single spacing
        (lambda z: None, None),  # no stage z known
        (lambda z: 3.0, None),  # z index changes, the stage does not move
    ],
)
def test_z_spacing_only_when_the_stage_agrees(tmp_path: Path, z_of, expected) -> None:
    sink = OmeTiffSink(tmp_path / "a.ome.tif", pixel_size_um=0.5)
    for z in range(3):
        h = header(z, {"z": z}, sizes={"z": 3}, stage=StagePosition(z=z_of(z)))
        sink.write(frame(z), h)
    sink.close()
    meta, xml = ome_of(sink.path)
    assert meta.images[0].pixels.size_z == 3
    if expected is None:
        assert "PhysicalSizeZ" not in xml
    else:
        assert meta.images[0].pixels.physical_size_z == pytest.approx(expected)


# -- finding 11: `scopecast recover` on what it cannot or can only partly recover -----------------


def one_red_line(cli: subprocess.CompletedProcess[str], *words: str) -> str:
    assert cli.returncode == 2, (cli.stdout, cli.stderr)
    lines = cli.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), cli.stderr
    assert "Traceback" not in cli.stderr and cli.stdout == ""
    for word in words:
        assert word in lines[0], lines[0]
    options = {w.strip("`'\",.;:()") for w in lines[0].split() if w.startswith("--")}
    assert options <= {"--index"}, f"{options} are not options of `scopecast recover`"
    return lines[0]


def test_recover_cli_refuses_what_it_cannot_recover(tmp_path: Path) -> None:
    junk = tmp_path / "junk.ome.tif"
    junk.write_bytes(np.random.default_rng(0).bytes(20_000))
    one_red_line(run_cli("recover", str(junk)), "junk.ome.tif", "not a TIFF file")

    foreign = tmp_path / "foreign.tif"
    tifffile.imwrite(foreign, np.zeros((8, 8), np.uint16))
    one_red_line(run_cli("recover", str(foreign)), "foreign.tif", "not written by scopecast")

    empty = tmp_path / "empty.ome.tif"
    empty.touch()
    one_red_line(run_cli("recover", str(empty)), "empty.ome.tif", "empty")

    cut = tmp_path / "cut.ome.tif"
    cut.write_bytes(b"II+\x00\x08\x00\x00\x00\x10")  # a BigTIFF header and no first page
    one_red_line(run_cli("recover", str(cut)), "cut.ome.tif", "nothing to recover")

    one_red_line(run_cli("recover", str(tmp_path / "gone.ome.tif")), "gone.ome.tif", "not found")
    one_red_line(
        run_cli("recover", str(foreign), "--index", str(tmp_path / "none.jsonl")),
        "none.jsonl",
        "--index",
    )
    assert not list(tmp_path.glob("*.recovered.ome.tif"))  # nothing half-made left behind


def test_recover_cli_on_a_junk_file_that_the_index_lists(tmp_path: Path) -> None:
    run = RunWriter(tmp_path / "run")
    for seq in range(3):
        run.write_raw(header(seq, {"t": seq}), frame(seq))
    run.close()
    path = tmp_path / "run" / "cam_p000_raw.ome.tif"
    path.write_bytes(np.random.default_rng(1).bytes(path.stat().st_size))
    one_red_line(run_cli("recover", str(path)), "cam_p000_raw.ome.tif", "right file")
    path.write_bytes(b"II+\x00\x08\x00\x00\x00" + bytes(path.stat().st_size - 8))
    one_red_line(run_cli("recover", str(path)), "cam_p000_raw.ome.tif", "wrong crc32")


def test_recover_cli_skips_damaged_index_lines_and_keeps_every_plane(tmp_path: Path) -> None:
    """A garbage line in the middle of the index: every good line is used, the plane the
    damaged line described comes from the file's pages, and the output says so."""
    run = RunWriter(tmp_path / "run")
    for seq in range(6):
        run.write_raw(header(seq, {"t": seq}, sizes={"t": 6}), frame(seq))
    run.close()
    index = tmp_path / "run" / "index.jsonl"
    lines = index.read_bytes().split(b"\n")
    lines[2] = b"\x00\xff garbage {" + lines[2][:40]  # the record of plane 2
    lines.insert(4, b"[1, 2, 3]")  # JSON, but not a record
    index.write_bytes(b"\n".join(lines))
    scan = scan_index(index)
    assert (len(scan.records), scan.damaged) == (5, 2)
    assert "index.jsonl:3: not JSON" in scan.problems[0]

    cli = run_cli("recover", str(tmp_path / "run" / "cam_p000_raw.ome.tif"))
    assert cli.returncode == 0, cli.stderr
    assert "6 planes recovered" in cli.stdout and "2 damaged index lines" in cli.stdout
    assert "1 planes without an index line taken from the file's pages" in cli.stdout
    output = tmp_path / "run" / "cam_p000_raw.recovered.ome.tif"
    with tifffile.TiffFile(output) as tif:
        assert tif.is_ome
        np.testing.assert_array_equal(tif.asarray(), np.stack([frame(s) for s in range(6)]))

    index.write_bytes(np.random.default_rng(2).bytes(5000).replace(b"\n", b" ") + b"\n")
    output.unlink()
    cli = run_cli("recover", str(tmp_path / "run" / "cam_p000_raw.ome.tif"))
    assert cli.returncode == 0, cli.stderr  # an index of junk: the file's own pages
    assert "6 planes recovered" in cli.stdout and "1 damaged index lines" in cli.stdout


def test_recover_removes_its_output_when_the_disk_fills(tmp_path: Path) -> None:
    run = RunWriter(tmp_path / "run")
    for seq in range(5):
        run.write_raw(header(seq, {"t": seq}, shape=(64, 64)), frame(seq, (64, 64)))
    run.close()
    path = tmp_path / "run" / "cam_p000_raw.ome.tif"
    child = run_child(
        """
        import resource, signal, sys
        from stream.sinks import recover
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (30000, hard))
        try:
            recover(sys.argv[1])
        except OSError as e:
            print(e)
        """,
        str(path),
    )
    assert child.returncode == 0, child.stderr
    assert "was removed" in child.stdout and "free disk space" in child.stdout
    assert not (tmp_path / "run" / "cam_p000_raw.recovered.ome.tif").exists()


def test_open_files_are_bounded_and_keys_continue_in_new_parts(tmp_path: Path) -> None:
    """Many positions (or a hostile sender inventing them) never exhaust file descriptors:
    past ``max_open`` the least recently written file is closed with its OME-XML, and a key
    that comes back continues in a `_2` part. Every plane stays indexed and readable."""
    writer = RunWriter(tmp_path, max_open=2)
    sent = {}
    for seq in range(12):
        p = seq % 3  # three positions in turn: each visit finds its file closed
        h = header(seq, {"t": seq // 3, "p": p})
        sent[seq] = frame(seq)
        writer.write_raw(h, sent[seq])
        assert len(writer._sinks) <= 2
    writer.close()
    for r in read_index(tmp_path / "index.jsonl"):
        with tifffile.TiffFile(tmp_path / r["file"]) as tif:
            assert tif.is_ome
            assert np.array_equal(tif.pages[r["plane"]].asarray(), sent[r["header"]["seq"]])
    assert (tmp_path / "cam_p000_raw_2.ome.tif").exists()


def test_plane_metadata_moves_to_disk_and_comes_back_at_close(tmp_path: Path) -> None:
    """Memory stays flat however many planes a file gets: the per-plane metadata close()
    needs leaves memory in chunks and is read back, in order, when the file closes."""
    sink = OmeTiffSink(tmp_path / "long.ome.tif", pixel_size_um=0.5)
    sink._meta = tiffmod._PlaneTable(chunk=7)
    for seq in range(30):
        sink.write(frame(seq, shape=(4, 4)), header(seq, {"t": seq}, shape=(4, 4),
                                                    channel="GFP" if seq % 2 else None,
                                                    exposure_ms=seq + 0.5))  # fmt: skip
    assert sink._meta._spilled == 28 and sink._meta._n == 2
    planes = list(sink._meta)
    assert [p.tcz[0] for p in planes] == list(range(30)) and sink._meta[9] == planes[9]
    assert [p.exposure_ms for p in planes] == [seq + 0.5 for seq in range(30)]
    assert [p.channel for p in planes[:3]] == [None, "GFP", None]
    sink.close()
    ome, _ = ome_of(tmp_path / "long.ome.tif")
    exposures = [p.exposure_time for p in ome.images[0].pixels.planes]
    assert exposures == [seq + 0.5 for seq in range(30)]
