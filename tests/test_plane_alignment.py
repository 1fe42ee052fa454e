"""Raw and enhanced files line up plane for plane, and separate acquisitions get separate files.

Real parts: a real server process fed through real ZeroMQ by a real FrameHook, real files read
back with tifffile, a real SIGKILL. Enhanced plane i is the engine's output for raw plane i or a
fill plane (0 for integer pixels, NaN for float) that the index and ``scopecast.fills`` mark.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import useq

from stream.protocol import FrameHeader
from stream.sinks import RunWriter, SinkError, read_index, recover
from stream.sinks import store as storemod
from stream.sinks.tiff import parse_runs

REPO = Path(__file__).resolve().parents[1]
SHAPE = (24, 32)


def notes(path: Path) -> dict[str, str]:
    """The scopecast MapAnnotation of an OME-TIFF."""
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome
        return dict(re.findall(r'<M K="([^"]+)">([^<]*)</M>', tif.ome_metadata))


def planes(path: Path, shape=SHAPE) -> np.ndarray:
    return tifffile.imread(path).reshape(-1, *shape)


def header(seq: int, t: int, c: int = 0, *, acquisition="acq-1", shape=SHAPE) -> FrameHeader:
    return FrameHeader(stream="cam", seq=seq, index={"t": t, "c": c}, shape=shape,
                       dtype="uint16", mono_ns=seq, wall_time=1.7e9 + seq, pixel_size_um=0.5,
                       channel=("DAPI", "FITC")[c], acquisition=acquisition,
                       sizes={"t": 3, "c": 2})  # fmt: skip


def frame(seq: int, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seq).integers(1, 4000, shape, dtype=np.uint16)


# -- the ordering rule, on the RunWriter itself -------------------------------------------------


def test_enhancements_out_of_raw_order_and_skips_land_at_their_raw_plane(tmp_path: Path) -> None:
    """Live mode enhances the keys of one file out of raw order, and a skip's notice comes
    after a later frame's enhancement: each still lands at its own raw plane's number."""
    run = RunWriter(tmp_path)
    hs = [header(seq, seq // 2, seq % 2) for seq in range(6)]  # t0c0 t0c1 t1c0 t1c1 t2c0 t2c1
    for h in hs:
        run.write_raw(h, frame(h.seq))
    twice = {h.seq: frame(h.seq) * 2 for h in hs}
    # c1's t0 is enhanced before c0's t0 is known: it waits for plane 0
    assert run.write_enhanced(hs[1], twice[1], engine="double", scale=1) is None
    run.not_enhanced(hs[0], "skipped (live mode: a newer frame came)")  # plane 0 a fill: 0, 1 go
    rec = run.write_enhanced(hs[2], twice[2], engine="double", scale=1)
    assert rec is not None and rec["plane"] == 2 and rec["raw"]["plane"] == 2
    assert run.write_enhanced(hs[4], twice[4], engine="double", scale=1) is None  # waits for 3
    run.not_enhanced(hs[3], "engine error (nonfinite)")
    run.not_enhanced(hs[3], "a second notice is ignored")
    with pytest.raises(SinkError, match=r"seq 3 .*no raw plane waits for it"):
        run.write_enhanced(hs[3], twice[3], engine="double", scale=1)  # already a fill
    run.close()  # seq 5 never settled: a fill with the reason
    raw = planes(tmp_path / "cam_p000_raw.ome.tif")
    enh = planes(tmp_path / "cam_p000_double.ome.tif")
    assert len(raw) == len(enh) == 6
    fills = {0, 3, 5}
    for i in range(6):
        expected = np.zeros(SHAPE, np.uint16) if i in fills else twice[i]
        np.testing.assert_array_equal(enh[i], expected)
        np.testing.assert_array_equal(raw[i], frame(i))
    index = [r for r in read_index(tmp_path / "index.jsonl") if r["kind"] == "enhanced"]
    assert [r["plane"] for r in index] == list(range(6))  # written in raw order
    assert {r["plane"] for r in index if r.get("fill")} == fills
    for r in index:
        assert r["raw"] == {"file": "cam_p000_raw.ome.tif", "plane": r["plane"]}
        assert r["header"]["seq"] == r["plane"]
    reasons = {r["plane"]: r["reason"] for r in index if r.get("fill")}
    assert reasons[0].startswith("skipped") and reasons[3] == "engine error (nonfinite)"
    assert reasons[5] == storemod.ENDED
    assert all(r["fill_value"] == "0" for r in index if r.get("fill"))
    ann = notes(tmp_path / "cam_p000_double.ome.tif")
    assert parse_runs(ann["scopecast.fills"]) == sorted(fills)
    assert ann["scopecast.fill_value"] == "0" and ann["scopecast.raw"] == "cam_p000_raw.ome.tif"
    assert "scopecast.raw_first_plane" not in ann
    # both files are the same (T, C) grid, so a viewer steps through them together
    with (
        tifffile.TiffFile(tmp_path / "cam_p000_raw.ome.tif") as a,
        tifffile.TiffFile(tmp_path / "cam_p000_double.ome.tif") as b,
    ):
        assert a.series[0].axes == b.series[0].axes == "TCYX"
        assert a.series[0].shape == b.series[0].shape == (3, 2, *SHAPE)
    assert run.written == {"raw": 6, "enhanced": 3, "fill": 3}


def test_float_output_fills_with_nan_and_the_first_frame_gives_the_fill_shape(
    tmp_path: Path,
) -> None:
    """Fills before the first enhanced frame wait for its shape (x2 here); float pixels fill
    with NaN, which an engine never outputs (the server refuses non-finite outputs)."""
    run = RunWriter(tmp_path)
    hs = [header(seq, seq) for seq in range(3)]
    for h in hs:
        run.write_raw(h, frame(h.seq))
    run.not_enhanced(hs[0], "skipped")
    up = np.kron(frame(1), np.ones((2, 2))).astype(np.float32)
    run.write_enhanced(hs[1], up, engine="sr", scale=2)
    run.not_enhanced(hs[2], "skipped")
    run.close()
    enh = planes(tmp_path / "cam_p000_sr.ome.tif", (48, 64))
    assert enh.dtype == np.float32 and len(enh) == 3
    assert np.isnan(enh[0]).all() and np.isnan(enh[2]).all()
    np.testing.assert_array_equal(enh[1], up)
    assert notes(tmp_path / "cam_p000_sr.ome.tif")["scopecast.fill_value"] == "NaN"
    fills = [r for r in read_index(tmp_path / "index.jsonl") if r.get("fill")]
    assert [(r["plane"], r["fill_value"], r["pixel_size_um"]) for r in fills] == [
        (0, "NaN", 0.25), (2, "NaN", 0.25)
    ]  # fmt: skip


def test_a_raw_file_that_was_never_enhanced_gets_no_enhanced_file(tmp_path: Path) -> None:
    run = RunWriter(tmp_path)
    for seq in range(3):
        run.write_raw(header(seq, seq), frame(seq))
        run.not_enhanced(header(seq, seq), "engine error (shape)")
    assert [f.name for f in run.close()] == ["index.jsonl", "cam_p000_raw.ome.tif"]
    assert not run.errors


def test_interleaved_acquisitions_get_their_own_files_and_names_never_collide(
    tmp_path: Path,
) -> None:
    """Two acquisitions interleaved on one stream (each counting seq from 0) and a stream
    whose id looks like the second one's file name: four files, each plane where it belongs."""
    run = RunWriter(tmp_path)
    a0, b0, a1 = header(0, 0, acquisition="A"), header(0, 0, acquisition="B"), header(1, 1)
    a1 = a1.model_copy(update={"acquisition": "A"})
    other = a0.model_copy(update={"stream": "cam_a002"})
    for h, pixels in ((a0, frame(0)), (b0, frame(1)), (other, frame(2)), (a1, frame(3))):
        run.write_raw(h, pixels)
    run.write_enhanced(b0, frame(1) // 2, engine="e", scale=1)
    run.write_enhanced(a1, frame(3) // 2, engine="e", scale=1)
    run.close()
    names = sorted(p.name for p in tmp_path.glob("*.ome.tif"))
    assert names == ["cam_a002_p000_e.ome.tif", "cam_a002_p000_raw.ome.tif",
                     "cam_a002_p000_raw_2.ome.tif", "cam_p000_e.ome.tif",
                     "cam_p000_raw.ome.tif"]  # fmt: skip
    np.testing.assert_array_equal(planes(tmp_path / "cam_p000_raw.ome.tif")[1], frame(3))
    enh_a = planes(tmp_path / "cam_p000_e.ome.tif")
    assert not enh_a[0].any() and np.array_equal(enh_a[1], frame(3) // 2)
    np.testing.assert_array_equal(planes(tmp_path / "cam_a002_p000_e.ome.tif")[0], frame(1) // 2)
    assert notes(tmp_path / "cam_a002_p000_raw.ome.tif")["scopecast.acquisition"] == "B"
    assert notes(tmp_path / "cam_a002_p000_raw_2.ome.tif")["scopecast.acquisition"] == "A"


def test_held_frames_are_bounded_and_a_late_enhancement_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An enhancement that never comes cannot hold the frames behind it in memory forever:
    past HOLD_BYTES its plane becomes a fill, the others are written, and should it come
    after all it is refused (counted), never written at another plane."""
    monkeypatch.setattr(storemod, "HOLD_BYTES", 2 * frame(0).nbytes)
    run = RunWriter(tmp_path)
    hs = [header(seq, seq) for seq in range(5)]
    for h in hs:
        run.write_raw(h, frame(h.seq))
    assert run.write_enhanced(hs[1], frame(1), engine="e", scale=1) is None
    assert run.write_enhanced(hs[2], frame(2), engine="e", scale=1) is None
    run.write_enhanced(hs[3], frame(3), engine="e", scale=1)  # 3 held: plane 0 gives way
    assert run.errors["forced_fill"] == 1 and run.written["enhanced"] == 3
    with pytest.raises(SinkError, match=r"seq 0 .*no raw plane waits"):
        run.write_enhanced(hs[0], frame(0), engine="e", scale=1)
    run.write_enhanced(hs[4], frame(4), engine="e", scale=1)
    run.close()
    enh = planes(tmp_path / "cam_p000_e.ome.tif")
    assert not enh[0].any() and all(np.array_equal(enh[i], frame(i)) for i in range(1, 5))
    fill = next(r for r in read_index(tmp_path / "index.jsonl") if r.get("fill"))
    assert fill["plane"] == 0 and fill["reason"] == storemod.LATE


# -- crash safety -------------------------------------------------------------------------------

LIVE_WRITER = """
    import sys, time
    from pathlib import Path
    import numpy as np
    from stream.protocol import FrameHeader
    from stream.sinks import RunWriter

    run = RunWriter(Path(sys.argv[1]))
    previous = None
    for i in range(10**6):
        h = FrameHeader(stream="cam", seq=i, index={"t": i}, shape=(32, 32), dtype="uint16",
                        mono_ns=i, wall_time=time.time(), pixel_size_um=0.5, acquisition="a")
        frame = np.random.default_rng(i).integers(0, 30000, (32, 32), dtype=np.uint16)
        run.write_raw(h, frame)
        if i % 3 == 1:  # enhanced one frame late: it waits for the previous frame's fate
            run.write_enhanced(h, frame * 2, engine="double", scale=1)
        if previous is not None:
            if previous.seq % 3 == 0:
                run.write_enhanced(previous, prev_frame * 2, engine="double", scale=1)
            elif previous.seq % 3 == 2:
                run.not_enhanced(previous, "skipped")
        previous, prev_frame = h, frame
        print(i, flush=True)
"""


def test_sigkill_leaves_aligned_files_with_fills_that_recover_keeps(tmp_path: Path) -> None:
    prelude = f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
    child = subprocess.Popen(
        [sys.executable, "-c", prelude + textwrap.dedent(LIVE_WRITER), str(tmp_path / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdout is not None and child.stderr is not None
    done = 0
    while done < 30:
        line = child.stdout.readline()
        assert line, f"writer died early: {child.stderr.read()}"
        done = int(line) + 1
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    child.stdout.close()
    child.stderr.close()

    run_dir = tmp_path / "run"
    index = read_index(run_dir / "index.jsonl")
    mine = {k: [r for r in index if r["kind"] == k] for k in ("raw", "enhanced")}
    assert len(mine["enhanced"]) >= 29
    # every indexed plane of the crashed files reads back and matches its crc32
    for r in index:
        with tifffile.TiffFile(run_dir / r["file"]) as tif:
            assert zlib.crc32(tif.pages[r["plane"]].asarray()) == r["crc32"]
    recovered = {}
    for name in ("cam_p000_raw.ome.tif", "cam_p000_double.ome.tif"):
        result = recover(run_dir / name)
        assert (result.bad_crc, result.missing, result.filled) == (0, 0, 0)
        recovered[name] = planes(result.output, (32, 32))
    raw, enh = recovered.values()
    assert len(enh) == len(mine["enhanced"]) and len(raw) >= len(enh)
    for i, plane in enumerate(enh):
        if i % 3 == 2:
            assert not plane.any()
        else:
            np.testing.assert_array_equal(plane, raw[i] * 2)
    ann = notes(run_dir / "cam_p000_double.recovered.ome.tif")
    assert parse_runs(ann["scopecast.fills"]) == list(range(2, len(enh), 3))
    assert ann["scopecast.raw"] == "cam_p000_raw.ome.tif"


def test_recover_keeps_plane_numbers_when_a_plane_is_lost(tmp_path: Path) -> None:
    """A plane whose bytes were damaged becomes a fill in the recovered file, so every later
    plane keeps its number (recovered raw and enhanced files still line up)."""
    run = RunWriter(tmp_path)
    for seq in range(5):
        run.write_raw(header(seq, seq), frame(seq))
    run.close()
    path = tmp_path / "cam_p000_raw.ome.tif"
    damaged = next(r for r in read_index(tmp_path / "index.jsonl") if r["plane"] == 2)
    with path.open("r+b") as f:
        f.seek(damaged["offset"])
        f.write(b"\xff" * 16)
    result = recover(path)
    assert (result.planes, result.bad_crc, result.filled) == (5, 1, 1)
    data = planes(result.output)
    assert not data[2].any()
    for i in (0, 1, 3, 4):
        np.testing.assert_array_equal(data[i], frame(i))
    assert notes(result.output)["scopecast.fills"] == "2"


# -- the real server ----------------------------------------------------------------------------


def slow_double_engine(path: Path) -> Path:
    """An engine whose output is exactly 2 x its input, after some wasted work (a 15x15
    convolution of the frame tiled 8x8): slow enough that a burst makes live mode skip."""
    from onnx import TensorProto, helper, numpy_helper

    from engines.package import Manifest, Temporal, write_package

    nodes = [
        helper.make_node("Tile", ["frames", "reps"], ["big"]),
        helper.make_node("Conv", ["big", "k"], ["conv"]),
        helper.make_node("ReduceMean", ["conv"], ["m"], keepdims=1),
        helper.make_node("Mul", ["m", "zero"], ["nothing"]),
        helper.make_node("Add", ["frames", "frames"], ["two"]),
        helper.make_node("Add", ["two", "nothing"], ["enhanced"]),
    ]
    graph = helper.make_graph(
        nodes, "slow-double",
        [helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["N", None, "H", "W"])],
        [helper.make_tensor_value_info("enhanced", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        initializer=[
            numpy_helper.from_array(np.full((1, 1, 15, 15), 1e-3, np.float32), "k"),
            numpy_helper.from_array(np.array([1, 1, 8, 8], np.int64), "reps"),
            numpy_helper.from_array(np.array(0, np.float32), "zero"),
        ],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    manifest = Manifest(name="slow-double", task="denoise", architecture="test",
                        temporal=Temporal(), scale=1, description="2x, slowly")  # fmt: skip
    write_package(path, manifest, {"model.onnx": model.SerializeToString()})
    return path


def send_acquisition(endpoint: str, frames: dict[tuple[int, int, int], np.ndarray], sizes: dict):
    """One MDA sequence through a real FrameHook: frames by (t, p, c), in that order."""
    from stream.hook import FrameHook

    hook = FrameHook(endpoint, stream="scope", hwm=1000)
    hook.wait_for_receiver(10)
    seq = useq.MDASequence(time_plan={"interval": 0, "loops": sizes["t"]},
                           channels=["DAPI", "FITC"][: sizes["c"]])  # fmt: skip
    hook.sequenceStarted(seq)
    for (t, p, c), pixels in frames.items():
        event = useq.MDAEvent(index={"t": t, "p": p, "c": c})
        assert hook.send(pixels, event=event, meta={"pixel_size_um": 0.5})
    hook.close()
    return str(seq.uid)


def test_live_server_with_skips_writes_aligned_raw_and_enhanced_files(tmp_path, servers):
    pytest.importorskip("onnx", reason="onnx (dev extra) builds the test engine")
    engine = slow_double_engine(tmp_path / "engine")
    srv = servers(tmp_path / "out", "--engine", str(engine), "--mode", "live")
    rng = np.random.default_rng(7)
    sent = {(t, p, c): rng.integers(1, 4000, SHAPE, dtype=np.uint16)
            for t in range(8) for p in range(2) for c in range(2)}  # fmt: skip
    send_acquisition(srv.listen, sent, {"t": 8, "c": 2})
    summary = srv.stop({"scope": len(sent)})
    assert summary["frames_received"] == len(sent) and summary["frames_skipped"] > 0
    assert summary["frames_written"] == {"raw": 32, "enhanced": summary["frames_enhanced"]}
    index = read_index(srv.run_dir / "index.jsonl")
    fills = 0
    for p in range(2):
        raw_file = srv.run_dir / f"scope_p{p:03d}_raw.ome.tif"
        enh_file = srv.run_dir / f"scope_p{p:03d}_slow-double.ome.tif"
        raw, enh = planes(raw_file), planes(enh_file)
        assert len(raw) == len(enh) == 16
        mine = {r["plane"]: r for r in index if r["file"] == enh_file.name}
        raws = {r["plane"]: r for r in index if r["file"] == raw_file.name}
        assert sorted(mine) == sorted(raws) == list(range(16))
        for i in range(16):
            t, c = (raws[i]["header"]["index"][k] for k in ("t", "c"))
            np.testing.assert_array_equal(raw[i], sent[t, p, c])
            assert mine[i]["header"]["index"] == raws[i]["header"]["index"]  # same instant
            assert mine[i]["raw"] == {"file": raw_file.name, "plane": i}
            if mine[i].get("fill"):
                assert not enh[i].any() and mine[i]["reason"].startswith("skipped")
                fills += 1
            else:
                np.testing.assert_array_equal(enh[i], 2 * raw[i])  # the engine's output
        ann = notes(enh_file)
        listed = parse_runs(ann.get("scopecast.fills", ""))
        assert listed == sorted(i for i, r in mine.items() if r.get("fill"))
        with tifffile.TiffFile(raw_file) as a, tifffile.TiffFile(enh_file) as b:
            assert a.series[0].shape == b.series[0].shape == (8, 2, *SHAPE)
    assert fills == summary["frames_skipped"]
    assert fills + summary["frames_enhanced"] == len(sent)


def test_two_acquisitions_on_one_server_get_separate_files(tmp_path, servers):
    srv = servers(tmp_path, "--engine", "identity", "--mode", "complete")
    first = {(t, 0, c): frame(10 * t + c) for t in range(3) for c in range(2)}
    second = {(t, 0, 0): frame(100 + t) for t in range(4)}
    uids = [send_acquisition(srv.listen, first, {"t": 3, "c": 2})]
    uids.append(send_acquisition(srv.listen, second, {"t": 4, "c": 1}))
    srv.stop({"scope": 10})
    names = sorted(p.name for p in srv.run_dir.glob("*.ome.tif"))
    assert names == ["scope_a002_p000_identity.ome.tif", "scope_a002_p000_raw.ome.tif",
                     "scope_p000_identity.ome.tif", "scope_p000_raw.ome.tif"]  # fmt: skip
    for stem, uid, sent, shape in (("scope", uids[0], first, (3, 2)),
                                   ("scope_a002", uids[1], second, (4,))):  # fmt: skip
        for kind in ("raw", "identity"):
            path = srv.run_dir / f"{stem}_p000_{kind}.ome.tif"
            with tifffile.TiffFile(path) as tif:
                assert len(tif.series) == 1 and tif.series[0].shape == (*shape, *SHAPE)
                np.testing.assert_array_equal(
                    tif.series[0].asarray().reshape(-1, *SHAPE), np.stack(list(sent.values()))
                )
            ann = notes(path)
            assert ann["scopecast.acquisition"] == uid and "scopecast.reason" not in ann
