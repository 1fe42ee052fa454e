"""Disk sinks: real OME-TIFFs read back with tifffile, a real SIGKILL, a real full disk (RLIMIT)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile

from stream.protocol import FrameHeader, StagePosition
from stream.sinks import (
    CorruptIndex,
    IndexWriter,
    OmeTiffSink,
    RunWriter,
    SinkError,
    fresh_run_dir,
    read_index,
    recover,
)
from stream.sinks import tiff as tiffmod
from stream.sinks.tiff import plane_layout

REPO = Path(__file__).resolve().parents[1]
OME = "{http://www.openmicroscopy.org/Schemas/OME/2016-06}"
CHANNELS = ["DAPI", "FITC"]


def header(
    seq: int,
    t: int = 0,
    p: int = 0,
    c: int = 0,
    *,
    shape=(32, 48),
    dtype="uint16",
    sizes=None,
    pixel_size_um=0.65,
) -> FrameHeader:
    return FrameHeader(
        stream="cam",
        seq=seq,
        index={"t": t, "p": p, "c": c},
        shape=shape,
        dtype=dtype,
        mono_ns=time.monotonic_ns(),
        wall_time=1.7e9 + seq,
        exposure_ms=10.0,
        pixel_size_um=pixel_size_um,
        stage=StagePosition(x=100.0 * p, y=5.0, z=1.5),
        channel=CHANNELS[c],
        acquisition="acq-1",
        sizes={"t": 3, "p": 2, "c": 2} if sizes is None else sizes,
    )


def raw_frame(seq: int, shape=(32, 48)) -> np.ndarray:
    return np.random.default_rng(seq).integers(0, 4096, shape, dtype=np.uint16)


def enhance(frame: np.ndarray) -> np.ndarray:
    return np.kron(frame, np.ones((2, 2))).astype(np.float32) / 7


def pixels(root: ET.Element) -> ET.Element:
    node = root.find(f"{OME}Image/{OME}Pixels")
    assert node is not None
    return node


def ome(path: Path) -> ET.Element:
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        return ET.fromstring(tif.ome_metadata)


def map_annotation(root: ET.Element) -> dict[str, str]:
    return {m.get("K"): m.text for m in root.iter(f"{OME}M")}


def test_run_roundtrip_grid(tmp_path: Path) -> None:
    run = RunWriter(tmp_path / "run")
    expected: dict[tuple[int, int, int], np.ndarray] = {}
    seq = 0
    for t in range(3):
        for p in range(2):
            for c in range(2):
                h, frame = header(seq, t, p, c), raw_frame(seq)
                expected[t, p, c] = frame
                rec = run.write_raw(h, frame, timings_ms={"receive": 0.5})
                assert rec["timings_ms"]["receive"] == 0.5 and rec["timings_ms"]["disk"] >= 0
                run.write_enhanced(h, enhance(frame), engine="sr2", scale=2)
                seq += 1
    files = run.close()
    assert run.close() == files  # idempotent
    names = sorted(f.name for f in files)
    assert names == [
        "cam_p000_raw.ome.tif",
        "cam_p000_sr2.ome.tif",
        "cam_p001_raw.ome.tif",
        "cam_p001_sr2.ome.tif",
        "index.jsonl",
    ]
    assert not run.errors

    for p in range(2):
        for kind, size, make in (("raw", 0.65, lambda a: a), ("sr2", 0.325, enhance)):
            path = tmp_path / "run" / f"cam_p{p:03d}_{kind}.ome.tif"
            with tifffile.TiffFile(path) as tif:
                assert tif.is_ome
                series = tif.series[0]
                assert series.axes == "TCYX"
                data = series.asarray()
            side = 1 if kind == "raw" else 2
            assert data.shape == (3, 2, 32 * side, 48 * side)
            for t in range(3):
                for c in range(2):
                    np.testing.assert_array_equal(data[t, c], make(expected[t, p, c]))
            px = pixels(ome(path))
            assert float(px.get("PhysicalSizeX")) == pytest.approx(size)
            assert float(px.get("PhysicalSizeY")) == pytest.approx(size)
            assert px.get("PhysicalSizeXUnit") == "µm"
            assert [ch.get("Name") for ch in px.iter(f"{OME}Channel")] == CHANNELS
            planes = list(px.iter(f"{OME}Plane"))
            assert [float(pl.get("DeltaT")) for pl in planes] == [0, 1, 4, 5, 8, 9]
            assert {float(pl.get("PositionX")) for pl in planes} == {100.0 * p}

    records = read_index(tmp_path / "run" / "index.jsonl")
    assert len(records) == 24
    raws = {(r["header"]["seq"]): r for r in records if r["kind"] == "raw"}
    for r in records:
        path = tmp_path / "run" / r["file"]
        with path.open("rb") as f:
            f.seek(r["offset"])
            assert zlib.crc32(f.read(r["nbytes"])) == r["crc32"]
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[r["plane"]]
            assert page.dataoffsets[0] == r["offset"]
            assert list(page.shape) == r["shape"] and page.dtype.name == r["dtype"]
            plane = page.asarray()
        h = r["header"]
        if r["kind"] == "raw":
            i = h["index"]
            np.testing.assert_array_equal(plane, expected[i["t"], i["p"], i["c"]])
        else:
            assert r["engine"] == "sr2" and r["scale"] == 2
            raw = raws[h["seq"]]
            assert r["raw"] == {"file": raw["file"], "plane": raw["plane"]}
            assert r["written_ns"] > raw["written_ns"]


def test_incomplete_grid_is_stored_along_t(tmp_path: Path) -> None:
    run = RunWriter(tmp_path / "run")
    order = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]  # stopped within the last timepoint
    for seq, (t, c) in enumerate(order):
        run.write_raw(header(seq, t, 0, c), raw_frame(seq))
    run.close()
    path = tmp_path / "run" / "cam_p000_raw.ome.tif"
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and tif.series[0].axes == "TYX"
        data = tif.series[0].asarray()
    assert data.shape == (5, 32, 48)
    for seq in range(5):
        np.testing.assert_array_equal(data[seq], raw_frame(seq))
    root = ome(path)
    notes = map_annotation(root)
    assert notes["scopecast.layout"] == "TYX"
    assert "stopped within a t step" in notes["scopecast.reason"]
    assert "index.jsonl" in root.find(f"{OME}Image/{OME}Description").text


@pytest.mark.parametrize(
    ("tcz", "sizes", "axes", "shape"),
    [
        ([(t, c, 0) for t in range(2) for c in range(3)], {"t": 2, "c": 3}, "TC", (2, 3)),
        ([(t, c, 0) for c in range(2) for t in range(3)], {"c": 2, "t": 3}, "CT", (2, 3)),
        ([(t, 0, z) for t in range(2) for z in range(4)], {"t": 5, "z": 4}, "TZ", (2, 4)),
        ([(t, 0, 0) for t in range(3)], {"t": 3, "c": 2}, "T", (3,)),  # channel 0 only
        ([(0, 0, 0)] * 3, {}, "T", (3,)),  # a plain stream of frames
    ],
)
def test_plane_layout_grids(tcz, sizes, axes, shape) -> None:
    layout = plane_layout(tcz, sizes)
    assert (layout.axes, layout.shape, layout.reason) == (axes, shape, "")


@pytest.mark.parametrize(
    ("tcz", "sizes", "why"),
    [
        ([(0, 0, 0), (0, 1, 0), (1, 1, 0)], {"t": 2, "c": 2}, "full grid needs"),
        ([(0, 0, 0), (1, 0, 0), (0, 0, 0)], {"t": 2}, "repeat"),
        ([(1, 0, 0), (0, 0, 0)], {"t": 2}, "full grid needs"),
        ([(0, 0, 0), (0, 0, 0)], {"t": 1}, "repeat"),
        ([(0, 0, 0), (0, 1, 0)], {"t": 1}, "omit"),
    ],
)
def test_plane_layout_falls_back_with_reason(tcz, sizes, why) -> None:
    layout = plane_layout(tcz, sizes)
    assert layout.axes == "T" and layout.shape == (len(tcz),) and why in layout.reason


def test_long_omexml_is_appended(tmp_path: Path) -> None:
    sink = OmeTiffSink(tmp_path / "long.ome.tif", pixel_size_um=0.5, channel_names=["BF"])
    n = 300
    for i in range(n):
        h = header(i, i, sizes={"t": n}, shape=(4, 4), dtype="uint8")
        sink.write(np.full((4, 4), i % 251, np.uint8), h)
    assert len(sink.omexml()) > tiffmod.PLACEHOLDER_BYTES
    sink.close()
    sink.close()
    with tifffile.TiffFile(sink.path) as tif:
        assert tif.is_ome and tif.series[0].shape == (n, 4, 4)
        assert tif.pages[0].tags["ImageDescription"].valueoffset > tif.pages[-1].dataoffsets[0]
        np.testing.assert_array_equal(tif.asarray()[:, 0, 0], np.arange(n) % 251)
    px = pixels(ome(sink.path))
    assert px.get("PhysicalSizeX") == "0.5" and px.find(f"{OME}Channel").get("Name") == "BF"


def test_sink_rejects_bad_frames(tmp_path: Path) -> None:
    sink = OmeTiffSink(tmp_path / "a.ome.tif", pixel_size_um=None)
    for shape in ((32, 48, 5), (2, 32, 48, 1), (32,), (0, 48)):
        with pytest.raises(SinkError, match=rf"{re.escape(str(shape))} cannot be stored; send"):
            sink.write(np.zeros(shape, np.uint8), header(0))
    sink.write(raw_frame(0), header(0))
    with pytest.raises(SinkError, match=r"\(32, 48\) uint8 does not match .* \(32, 48\) uint16"):
        sink.write(np.zeros((32, 48), np.uint8), header(1))
    sink.close()
    with pytest.raises(SinkError, match="closed"):
        sink.write(raw_frame(1), header(1))
    with pytest.raises(SinkError, match="already exists"):
        OmeTiffSink(sink.path, pixel_size_um=None)
    with tifffile.TiffFile(sink.path) as tif:
        assert len(tif.pages) == 1 and "PhysicalSizeX" not in tif.ome_metadata


def test_reused_run_dir_is_refused(tmp_path: Path) -> None:
    run_dir = fresh_run_dir(tmp_path)
    assert run_dir.parent == tmp_path and run_dir.name.startswith("run-")
    assert fresh_run_dir(tmp_path) != run_dir
    RunWriter(run_dir).close()
    with pytest.raises(SinkError, match="already holds a recorded run"):
        RunWriter(run_dir)


def test_engine_names(tmp_path: Path) -> None:
    run = RunWriter(tmp_path / "run")
    h = header(0)
    run.write_raw(h, raw_frame(0))
    for bad in ("SR", "raw", "a/b", ""):
        with pytest.raises(ValueError, match="engine name"):
            run.write_enhanced(h, raw_frame(0), engine=bad, scale=1)
    rec = run.write_enhanced(h, raw_frame(0), engine="dn+sr2", scale=1)  # an EngineChain name
    assert rec["file"] == "cam_p000_dn+sr2.ome.tif" and rec["raw"]["plane"] == 0
    # no raw plane for seq 1: appending it would shift the enhanced file against the raw one
    with pytest.raises(SinkError, match=r"seq 1 .* no raw plane waits for it"):
        run.write_enhanced(header(1), raw_frame(1), engine="dn+sr2", scale=1)
    assert run.errors["raw_missing"] == 1
    run.close()


def test_shape_change_starts_a_new_file(tmp_path: Path) -> None:
    run = RunWriter(tmp_path / "run", fsync=True)
    run.write_raw(header(0), raw_frame(0))
    run.write_raw(header(1, 1, shape=(16, 16)), raw_frame(1, (16, 16)))
    run.write_raw(header(2, 2, shape=(16, 16)), raw_frame(2, (16, 16)))
    run.write_raw(header(3, 2, shape=(16, 16), pixel_size_um=0.1), raw_frame(3, (16, 16)))
    files = [f.name for f in run.close()]
    assert files == [
        "index.jsonl",
        "cam_p000_raw.ome.tif",
        "cam_p000_raw_2.ome.tif",
        "cam_p000_raw_3.ome.tif",
    ]
    with tifffile.TiffFile(tmp_path / "run" / files[2]) as tif:
        assert tif.series[0].shape == (2, 16, 16)
        page = tif.pages.first  # resolution tags for plain TIFF readers: pixels per cm
        assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER
        assert page.get_resolution() == pytest.approx((1e4 / 0.65, 1e4 / 0.65), rel=1e-6)
    assert [r["file"] for r in read_index(tmp_path / "run" / "index.jsonl")] == [
        files[1],
        files[2],
        files[2],
        files[3],
    ]


def test_read_index_tolerates_a_cut_off_last_line(tmp_path: Path) -> None:
    path = tmp_path / "index.jsonl"
    index = IndexWriter(path)
    for i in range(3):
        index.append({"plane": i})
    index.close()
    with pytest.raises(SinkError, match="already exists"):
        IndexWriter(path)
    with path.open("ab") as f:
        f.write(b'{"plane": 3, "hea')  # killed mid-line
    assert [r["plane"] for r in read_index(path)] == [0, 1, 2]
    lines = path.read_bytes().split(b"\n")
    lines[1] = b'{"plane": 1,'
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(CorruptIndex, match=r"index.jsonl:2: not JSON"):
        read_index(path)


def test_recover_without_index_reads_the_complete_pages(tmp_path: Path, monkeypatch) -> None:
    sink = OmeTiffSink(tmp_path / "a.ome.tif", pixel_size_um=0.5)
    for i in range(3):
        sink.write(raw_frame(i), header(i, i))
    write = tiffmod._PlaneFile.write

    def killed_midway(self, data):  # the process dies half-way through the pixels
        view = memoryview(data).cast("B")
        if len(view) == raw_frame(0).nbytes:
            write(self, view[:1000])
            raise KeyboardInterrupt
        return write(self, data)

    monkeypatch.setattr(tiffmod._PlaneFile, "write", killed_midway)
    monkeypatch.setattr(sink, "_undo", lambda *a: None)
    with pytest.raises(KeyboardInterrupt):
        sink.write(raw_frame(3), header(3, 3))
    monkeypatch.undo()
    result = recover(sink.path)
    assert (result.planes, result.from_index) == (3, False)
    assert result.output.name == "a.recovered.ome.tif"
    with tifffile.TiffFile(result.output) as tif:
        assert tif.is_ome
        data = tif.asarray()
    for i in range(3):
        np.testing.assert_array_equal(data[i], raw_frame(i))
    assert pixels(ome(result.output)).get("PhysicalSizeX") == "0.5"
    with pytest.raises(FileExistsError, match="never overwrites"):
        recover(sink.path)


def test_recover_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        recover(tmp_path / "missing.ome.tif")
    tifffile.imwrite(tmp_path / "other.tif", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="not written by scopecast"):
        recover(tmp_path / "other.tif")
    (tmp_path / "junk.ome.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(ValueError, match=r"junk\.ome\.tif is not a TIFF file"):
        recover(tmp_path / "junk.ome.tif")
    with pytest.raises(FileNotFoundError, match="index"):
        recover(tmp_path / "other.tif", index=tmp_path / "index.jsonl")


def run_child(code: str, *args: str, **kwargs) -> subprocess.Popen[str]:
    prelude = f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
    return subprocess.Popen(
        [sys.executable, "-c", prelude + textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


WRITER = """
    import sys, time
    from pathlib import Path
    import numpy as np
    from stream.protocol import FrameHeader
    from stream.sinks import RunWriter

    run = RunWriter(Path(sys.argv[1]))
    i = 0
    while True:
        h = FrameHeader(stream="cam", seq=i, index={"t": i // 2, "c": i % 2}, shape=(64, 64),
                        dtype="uint16", mono_ns=time.monotonic_ns(), wall_time=time.time(),
                        pixel_size_um=0.65, acquisition="a", sizes={"t": 10**6, "c": 2})
        frame = np.random.default_rng(i).integers(0, 65535, (64, 64), dtype=np.uint16)
        run.write_raw(h, frame)
        run.write_enhanced(h, np.kron(frame, np.ones((2, 2), np.uint16)), engine="sr", scale=2)
        print(i, flush=True)
        i += 1
"""


def test_sigkill_loses_nothing_that_was_written(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    child = run_child(WRITER, str(run_dir))
    assert child.stdout is not None
    done = 0
    while done < 40:
        line = child.stdout.readline()
        assert line, f"writer died early: {child.stderr.read() if child.stderr else ''}"
        done = int(line) + 1
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    child.stdout.close()
    child.stderr.close()

    records = read_index(run_dir / "index.jsonl")
    for kind, name, scale in (
        ("raw", "cam_p000_raw.ome.tif", 1),
        ("enhanced", "cam_p000_sr.ome.tif", 2),
    ):
        mine = [r for r in records if r["kind"] == kind]
        assert len(mine) >= done
        source = run_dir / name
        before = source.read_bytes()
        with tifffile.TiffFile(source) as tif:  # the crashed file itself still reads page by page
            assert tif.pages[len(mine) - 1].asarray().shape == (64 * scale, 64 * scale)
        result = recover(source)
        assert source.read_bytes() == before
        assert (result.planes, result.bad_crc, result.from_index) == (len(mine), 0, True)
        with tifffile.TiffFile(result.output) as tif:
            assert tif.is_ome
            data = tif.series[0].asarray().reshape(-1, 64 * scale, 64 * scale)
        for r, plane in zip(mine, data, strict=True):
            frame = np.random.default_rng(r["header"]["seq"]).integers(
                0, 65535, (64, 64), dtype=np.uint16
            )
            np.testing.assert_array_equal(plane, np.kron(frame, np.ones((scale, scale))))
        px = pixels(ome(result.output))
        assert float(px.get("PhysicalSizeX")) == pytest.approx(0.65 / scale)


FULL_DISK = """
    import json, resource, signal, sys, time
    from pathlib import Path
    import numpy as np
    from stream.protocol import FrameHeader
    from stream.sinks import RunWriter, SinkError

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # exceed RLIMIT_FSIZE -> OSError(EFBIG)
    limit, hard = int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    if sys.argv[3] == "full-at-close":  # OME-XML longer than its placeholder: appended at close
        import stream.sinks.tiff
        stream.sinks.tiff.PLACEHOLDER_BYTES = 512
    run = RunWriter(Path(sys.argv[1]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    ok, failed, messages = [], [], []
    for i in range(40):
        if i == 30:
            resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space comes back
        h = FrameHeader(stream="cam", seq=i, index={"t": i}, shape=(64, 64), dtype="uint16",
                        mono_ns=time.monotonic_ns(), wall_time=time.time(), pixel_size_um=0.5,
                        sizes={"t": 40})
        try:
            run.write_raw(h, np.full((64, 64), i, np.uint16))
            ok.append(i)
        except SinkError as e:
            failed.append(i)
            messages.append(str(e))
    if sys.argv[3] == "full-at-close":
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        closed = None
        files = run.close()
    except SinkError as e:
        closed = str(e)
        files = run.files
    print(json.dumps({"ok": ok, "failed": failed, "messages": messages, "closed": closed,
                      "close_errors": run.close_errors,
                      "errors": dict(run.errors), "files": [str(f) for f in files]}))
"""


@pytest.mark.parametrize("when", ["recovers", "full-at-close"])
def test_disk_full_keeps_every_written_plane(tmp_path: Path, when: str) -> None:
    run_dir = tmp_path / "run"
    limit = 150_000
    child = run_child(FULL_DISK, str(run_dir), str(limit), when)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    report = json.loads(out)
    ok, failed = report["ok"], report["failed"]
    assert failed and ok[-1] == 39 and 30 in ok, report
    assert failed == list(range(failed[0], 30))
    assert report["errors"]["disk"] == len(failed)
    assert "intact" in report["messages"][0] and "cam_p000_raw.ome.tif" in report["messages"][0]
    path = run_dir / "cam_p000_raw.ome.tif"
    records = read_index(run_dir / "index.jsonl")
    assert [r["header"]["seq"] for r in records] == ok
    with tifffile.TiffFile(path) as tif:
        data = np.stack([page.asarray() for page in tif.pages])
        assert tif.is_ome == (when == "recovers")
    np.testing.assert_array_equal(data[:, 0, 0], ok)
    if when == "recovers":
        assert "close" not in report["errors"] and report["closed"] is None
        assert pixels(ome(path)).get("SizeT") == str(len(ok))
    else:  # the OME-XML no longer fits: the file stays plain BigTIFF, recover() adds it
        assert report["errors"]["close"] == 1 and len(report["close_errors"]) == 1
        assert "1 file did not close cleanly" in report["closed"]
        assert "free disk space" in report["closed"] and path.name in report["closed"]
        result = recover(path)
        assert (result.planes, result.bad_crc) == (len(ok), 0)
        with tifffile.TiffFile(result.output) as tif:
            assert tif.is_ome
            np.testing.assert_array_equal(tif.asarray()[:, 0, 0], ok)


INDEX_FULL = """
    import json, resource, signal, sys
    from pathlib import Path
    from stream.sinks import IndexWriter, SinkError

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    index = IndexWriter(Path(sys.argv[1]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
    ok = []
    for i in range(30):
        if i == 20:
            resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        try:
            index.append({"plane": i, "pad": "x" * 90})
            ok.append(i)
        except SinkError:
            pass
    index.close()
    print(json.dumps(ok))
"""


def test_index_line_cut_by_a_full_disk_is_removed(tmp_path: Path) -> None:
    child = run_child(INDEX_FULL, str(tmp_path / "index.jsonl"))
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    ok = json.loads(out)
    assert ok == [*range(9), *range(20, 30)]  # line 9 was cut after 1 of its 111 bytes
    assert [r["plane"] for r in read_index(tmp_path / "index.jsonl")] == ok
