"""The OME-Zarr sink end to end: a real engine server writes OME-Zarr (alone and beside
OME-TIFF), read back with an independent reader (ome-zarr-py), its metadata checked against the
NGFF 0.5 JSON schema (ngff-zarr's bundled schemas); a SIGKILL leaves every indexed plane
readable; live mode's skipped enhancements are fill planes at their raw frame's T."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import tifffile
import useq
from test_server import ramp_frames, send_frames, started_hook

from stream.hook import FrameHook
from stream.protocol import FrameHeader
from stream.sinks import RunWriter, read_index
from stream.sinks.omezarr import NAMESPACE, read_plane

zarr = pytest.importorskip("zarr", reason="zarr (core dependency of the ome-zarr sink)")
ome_zarr_reader = pytest.importorskip("ome_zarr.reader", reason="ome-zarr (dev extra) reads back")
from ome_zarr.io import parse_url  # noqa: E402


def ome_read(path):
    """(pixels, multiscales metadata) of an OME-Zarr image, read by ome-zarr-py."""
    (node, *_) = list(ome_zarr_reader.Reader(parse_url(str(path)))())
    return np.asarray(node.data[0]), node.metadata


def group_attrs(path) -> dict:
    return json.loads((path / "zarr.json").read_text())["attributes"]


def check_schema(path) -> None:
    ngff_zarr = pytest.importorskip("ngff_zarr", reason="ngff-zarr[validate] (dev extra)")
    ngff_zarr.validate({"ome": group_attrs(path)["ome"]}, version="0.5", model="image")


def send_grid(endpoint: str, frames, *, channels: int, stream: str = "scope"):
    """Frames of a t x c acquisition (c inner), each with the acquisition's sizes."""
    hook = FrameHook(endpoint, stream=stream, hwm=1000)
    hook.wait_for_receiver(10)
    loops = len(frames) // channels
    names = ["DAPI", "FITC", "TRITC"][:channels]
    hook.sequenceStarted(
        useq.MDASequence(time_plan={"interval": 0, "loops": loops}, channels=names)
    )
    for i, frame in enumerate(frames):
        t, c = divmod(i, channels)
        event = useq.MDAEvent(index={"t": t, "c": c, "p": 0}, channel={"config": names[c]})
        assert hook.send(frame, event=event, meta={"pixel_size_um": 0.5})
    hook.close()


def test_server_writes_ome_zarr_beside_ome_tiff_with_axes_scale_and_alignment(tmp_path, servers):
    """Both formats at once; T x C from the acquisition; the enhanced image's pixel size is the
    raw one's divided by the engine's scale; ome-zarr-py reads what the index says; the NGFF
    schema accepts the metadata."""
    frames = ramp_frames(6, shape=(24, 32))  # 3 time points x 2 channels
    srv = servers(tmp_path, "--engine", "bicubic-x2", "--mode", "complete",
                  "--format", "ome-tiff", "--format", "ome-zarr")  # fmt: skip
    send_grid(srv.listen, frames, channels=2)
    summary = srv.stop({"scope": len(frames)})
    assert summary["frames_written"]["raw"] == summary["frames_written"]["enhanced"] == 6
    assert summary["disk_errors"] == {} or not any(summary["disk_errors"].values())
    run = srv.run_dir
    raw, enh = run / "scope_p000_raw.ome.zarr", run / "scope_p000_bicubic-x2.ome.zarr"
    for path in (raw, enh, run / "scope_p000_raw.ome.tif"):
        assert str(path) in summary["files"]

    pixels, meta = ome_read(raw)
    assert pixels.shape == (3, 2, 24, 32)  # T, C, Y, X
    assert [a["name"] for a in meta["axes"]] == ["t", "c", "y", "x"]
    assert meta["coordinateTransformations"][0][0]["scale"][-2:] == [0.5, 0.5]
    for t in range(3):
        for c in range(2):
            assert np.array_equal(pixels[t, c], frames[2 * t + c])  # bit-exact at (t, c)
    up, up_meta = ome_read(enh)
    assert up.shape == (3, 2, 48, 64)
    assert up_meta["coordinateTransformations"][0][0]["scale"][-2:] == [0.25, 0.25]
    # the same frames as the OME-TIFF beside it, at the same planes
    tif = tifffile.imread(run / "scope_p000_bicubic-x2.ome.tif").reshape(3, 2, 48, 64)
    assert np.array_equal(up, tif)
    for path in (raw, enh):
        check_schema(path)
    attrs = group_attrs(enh)[NAMESPACE]
    assert attrs["closed"] and attrs["raw"] == raw.name and attrs["axes"] == ["t", "c"]
    assert attrs["channels"] == ["DAPI", "FITC"] and "fills" not in attrs
    assert attrs["engines"].startswith("bicubic-x2@")
    # the index names the first format's file; its offset is the plane's place in the grid
    index = read_index(run / "index.jsonl")
    for r in index:  # by the header's (t, c): the line describes the OME-TIFF's plane
        assert r["file"].endswith(".ome.tif")
        zarr_file = run / r["file"].replace(".ome.tif", ".ome.zarr")
        assert zlib.crc32(read_plane(zarr_file, r)) == r["crc32"]


def test_sigkill_leaves_every_indexed_plane_readable(tmp_path, servers):
    srv = servers(tmp_path, "--engine", "identity", "--mode", "complete", "--format", "ome-zarr")
    frames = ramp_frames(30, shape=(64, 64), seed=3)
    send_frames(srv.listen, frames)
    deadline = time.monotonic() + 30
    while srv.status()["frames_written"]["raw"] < 15 and time.monotonic() < deadline:
        time.sleep(0.02)
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait()
    index = read_index(srv.run_dir / "index.jsonl")
    assert len([r for r in index if r["kind"] == "raw"]) >= 15
    for r in index:  # raw and enhanced: every plane whose line was written
        plane = read_plane(srv.run_dir / r["file"], r)
        assert zlib.crc32(plane) == r["crc32"], r
        assert np.array_equal(plane, frames[r["header"]["seq"]])
    raw = srv.run_dir / "scope_p000_raw.ome.zarr"
    assert group_attrs(raw)[NAMESPACE]["closed"] is False  # what it says until recovered
    listed = [r for r in index if r["file"] == raw.name]
    pixels, _ = ome_read(raw)  # an independent reader opens the unclosed image
    assert len(pixels) >= len(listed)
    run = subprocess.run([sys.executable, "-m", "stream", "recover", str(raw)],
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    again, _ = ome_read(srv.run_dir / "scope_p000_raw.recovered.ome.zarr")
    assert np.array_equal(again, np.stack([frames[r["header"]["seq"]] for r in listed]))


def test_live_mode_skips_are_fill_planes_at_their_raw_frames_t(tmp_path, servers):
    frames = ramp_frames(40, shape=(256, 256))
    srv = servers(tmp_path, "--engine", "gaussian", "--mode", "live", "--format", "ome-zarr")
    send_frames(srv.listen, frames)
    summary = srv.stop({"scope": len(frames)})
    assert summary["frames_written"]["raw"] == len(frames)  # raw is never gapped
    assert summary["frames_skipped"] > 0
    run = srv.run_dir
    raw, _ = ome_read(run / "scope_p000_raw.ome.zarr")
    enh, _ = ome_read(run / "scope_p000_gaussian.ome.zarr")
    assert raw.shape == enh.shape == (len(frames), 256, 256)
    lines = {r["header"]["index"]["t"]: r for r in read_index(run / "index.jsonl")
             if r["kind"] == "enhanced"}  # fmt: skip
    fills = [t for t, r in lines.items() if r.get("fill")]
    assert sorted(lines) == list(range(len(frames))) and fills
    for t in range(len(frames)):
        if t in fills:
            assert not enh[t].any()  # the documented fill value: 0
        else:  # the engine's output of raw frame t: smooth and close to it
            assert abs(float(enh[t].mean()) - float(raw[t].mean())) < 5
    attrs = group_attrs(run / "scope_p000_gaussian.ome.zarr")[NAMESPACE]
    from stream.sinks.tiff import parse_runs

    planes = parse_runs(attrs["fills"])
    assert sorted(lines[t]["plane"] for t in fills) == planes and attrs["fill_value"] == "0"
    check_schema(run / "scope_p000_gaussian.ome.zarr")


def _header(seq: int, t: int, *, sizes=None, c: int = 0) -> FrameHeader:
    return FrameHeader(stream="cam", seq=seq, shape=(8, 10), dtype="uint16", mono_ns=seq,
                       wall_time=0.0, index={"t": t, "c": c}, sizes=sizes or {},
                       pixel_size_um=0.5)  # fmt: skip


def test_a_repeated_place_starts_a_new_part_and_loses_nothing(tmp_path):
    """A frame whose (t, c) was already written (a repeat) is never written over it."""
    run = RunWriter(tmp_path, sink="ome-zarr")
    sizes = {"t": 3, "c": 2}
    frames = ramp_frames(5, shape=(8, 10))
    places = [(0, 0), (0, 1), (1, 0), (0, 1), (2, 1)]  # the fourth repeats (0, 1)
    for seq, ((t, c), frame) in enumerate(zip(places, frames, strict=True)):
        run.write_raw(_header(seq, t, sizes=sizes, c=c), frame)
    run.close()
    first, _ = ome_read(tmp_path / "cam_p000_raw.ome.zarr")
    second, _ = ome_read(tmp_path / "cam_p000_raw_2.ome.zarr")
    assert np.array_equal(first[0, 1], frames[1]) and np.array_equal(first[1, 0], frames[2])
    assert not first[1, 1].any()  # never sent: the array's fill value
    assert np.array_equal(second[0, 1], frames[3]) and np.array_equal(second[2, 1], frames[4])
    records = read_index(tmp_path / "index.jsonl")
    assert [r["file"] for r in records].count("cam_p000_raw_2.ome.zarr") == 2
    for r in records:
        assert zlib.crc32(read_plane(tmp_path / r["file"], r)) == r["crc32"]


def test_a_stream_without_sizes_is_stored_along_t_in_arrival_order(tmp_path):
    run = RunWriter(tmp_path, sink="ome-zarr")
    frames = ramp_frames(4, shape=(8, 10))
    for seq, frame in enumerate(frames):
        run.write_raw(_header(seq, 0), frame)  # no sizes, every t 0
    run.close()
    pixels, meta = ome_read(tmp_path / "cam_p000_raw.ome.zarr")
    assert [a["name"] for a in meta["axes"]] == ["t", "y", "x"]
    assert np.array_equal(pixels, np.stack(frames))


def test_bad_formats_are_one_line_naming_the_value(tmp_path):
    for args, says in (
        (["--format", "ome-zar"], "unknown sink 'ome-zar'"),
        (["--format", "ome-zarr", "--format", "ome-zarr"], "format 'ome-zarr' named twice"),
    ):
        run = subprocess.run([sys.executable, "-m", "stream", "serve", "--out", str(tmp_path),
                              *args], capture_output=True, text=True, timeout=60, check=False,
                             env={**os.environ, "COLUMNS": "300"})  # fmt: skip
        assert run.returncode == 2 and says in run.stderr, run.stderr
    assert list(tmp_path.iterdir()) == []
    _ = started_hook  # the helpers this file shares with test_server
