"""The engine server end to end: real hook, real sockets, a server in another process, real
OME-TIFFs read back with tifffile, real PUB subscribers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import useq
import zmq

from engines.package import Manifest, Temporal, write_package
from stream import acquire as acq
from stream.acquire import free_endpoint
from stream.control import request, wait_ready
from stream.hook import FrameHook
from stream.protocol import FrameHeader, decode_published, encode
from stream.security import Curve, generate_keys
from stream.sinks.index import read_index
from stream.sinks.recover import recover

onnx = pytest.importorskip("onnx", reason="onnx (dev extra) builds the test engines")
from onnx import TensorProto, helper  # noqa: E402


class Server:
    """``scopecast serve`` in a subprocess on free loopback ports."""

    def __init__(self, out: Path, *args: str, curve: Curve | None = None, preexec=None):
        self.listen, self.publish, self.control = free_endpoint(), free_endpoint(), free_endpoint()
        cmd = [
            sys.executable,
            "-m",
            "stream",
            "serve",
            "--listen",
            self.listen,
            "--publish",
            self.publish,
            "--control",
            self.control,
            "--out",
            str(out),
            "--json",
            *args,
        ]
        # preexec only sets an rlimit in the child (one test): it takes no lock a thread could hold
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, preexec_fn=preexec)  # noqa: PLW1509  # fmt: skip
        self.ready = wait_ready(self.control, process=self.proc, timeout_s=60, curve=curve)
        self.run_dir = Path(self.ready.out_dir)

    def status(self) -> dict:
        return request(self.control, "status")

    def stop(self, expect: dict | None = None) -> dict:
        summary = request(self.control, "stop", expect=expect or {}, timeout_s=120)
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        assert (
            json.loads(out.strip().splitlines()[-1])["frames_received"]
            == (summary["frames_received"])
        )
        return summary

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Viewer:
    """A PUB subscriber in a thread, keeping every (header, pixels) until 5 s of silence
    (a loaded 2-core CI machine can pause a server for seconds)."""

    def __init__(self, endpoint: str, topic: bytes = b"") -> None:
        self.got: list = []
        connected = threading.Event()

        def run() -> None:
            sub = zmq.Context.instance().socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, topic)
            sub.connect(endpoint)
            connected.set()
            while sub.poll(5000):
                self.got.append(decode_published(sub.recv_multipart()))
            sub.close(0)

        self._thread = threading.Thread(target=run)
        self._thread.start()
        connected.wait()
        time.sleep(0.3)  # let the SUB connect before the first frame (PUB does not queue)

    def join(self) -> list:
        self._thread.join()
        return self.got


def started_hook(endpoint: str, *, stream: str = "scope", curve=None) -> FrameHook:
    """A real FrameHook, its receiver reached and one acquisition started (one state key)."""
    hook = FrameHook(endpoint, stream=stream, hwm=1000, curve=curve)
    hook.wait_for_receiver(10)
    hook.sequenceStarted(useq.MDASequence(time_plan={"interval": 0, "loops": 1}))
    return hook


def send_frame(hook: FrameHook, frame: np.ndarray, t: int, p: int = 0) -> None:
    assert hook.send(frame, event=useq.MDAEvent(index={"t": t, "p": p}),
                     meta={"pixel_size_um": 0.5})  # fmt: skip


def send_frames(endpoint: str, frames, *, positions: int = 1, stream: str = "scope", curve=None):
    """Push frames through a real FrameHook, interleaving positions like a plate scan."""
    hook = started_hook(endpoint, stream=stream, curve=curve)
    for i, frame in enumerate(frames):
        send_frame(hook, frame, i // positions, i % positions)
    hook.close()
    return hook.stats


def ramp_frames(n: int, shape=(64, 80), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 4000, shape, dtype=np.uint16) for _ in range(n)]


def make_engine(path: Path, name: str, nodes, *, inputs=("frames",),
                temporal: Temporal | None = None, task="denoise", scale=1) -> Path:  # fmt: skip
    """A small engine package from ONNX nodes over inputs frames/previous/background."""
    value_info = [
        helper.make_tensor_value_info(i, TensorProto.FLOAT, ["N", None, "H", "W"]) for i in inputs
    ]
    graph = helper.make_graph(
        nodes, name, value_info,
        [helper.make_tensor_value_info("enhanced", TensorProto.FLOAT, ["N", 1, "H", "W"])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    manifest = Manifest(
        name=name, task=task, architecture="test",
        temporal=Temporal() if temporal is None else temporal, scale=scale,
        description="test engine",
    )  # fmt: skip
    write_package(path, manifest, {"model.onnx": model.SerializeToString()})
    return path


# -- the embedded default, end to end -----------------------------------------------------------


@pytest.mark.slow
def test_demo_runs_end_to_end_and_its_files_open(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "stream", "demo", "--duration", "1.5", "--json",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for key in ("frames_acquired", "frames_enhanced", "frames_skipped", "frames_not_handed_over",
                "latency_ms", "files"):  # fmt: skip
        assert key in result
    assert result["engine"] == "confocal-denoise-sr2x"  # the preset's shipped default
    assert result["frames_acquired"] >= 25
    assert result["frames_enhanced"] + result["frames_skipped"] == result["frames_received"]
    for stage in ("hook", "transport", "inference", "total"):
        assert 0 <= result["latency_ms"][stage]["p50"] <= result["latency_ms"][stage]["p99"]
    raw = [f for f in result["files"] if f.endswith("_raw.ome.tif")]
    enhanced = [f for f in result["files"] if f.endswith("_confocal-denoise-sr2x.ome.tif")]
    assert len(raw) == 1 and len(enhanced) == 1
    with tifffile.TiffFile(raw[0]) as tif:
        assert tif.is_ome
        assert len(tif.pages) == result["frames_received"]
        assert 'PhysicalSizeX="0.1"' in tif.ome_metadata
        assert tif.series[0].shape[-2:] == (256, 256)
    with tifffile.TiffFile(enhanced[0]) as tif:
        # one plane per raw plane: a skipped enhancement is a fill plane, so the files line up
        assert tif.is_ome and len(tif.pages) == result["frames_received"]
        assert tif.series[0].shape[-2:] == (512, 512)
        assert 'PhysicalSizeX="0.05"' in tif.ome_metadata


@pytest.mark.slow
def test_real_mda_to_server_to_tiff_and_subscriber(tmp_path, servers):
    """Simulated confocal MDA in this process, server in another, subscriber on PUB."""
    srv = servers(tmp_path, "--engine", "bicubic-x2", "--mode", "complete")
    viewer = Viewer(srv.publish, b"mda/")
    scope = acq.simulated("confocal-20fps", 0)
    seq = scope.preset.sequence(1.0)
    frames: list[np.ndarray] = []

    class Keep:
        def frameReady(self, img, event, meta):
            frames.append(img.copy())

    hook = FrameHook(srv.listen, stream="mda")
    hook.wait_for_receiver(10)
    sent = acq.run(scope.core, seq, hook, also=[Keep()])
    hook.close()
    summary = srv.stop({"mda": sent["frames_sent"]})
    got = viewer.join()
    n = len(frames)
    assert sent["frames_sent"] == n >= 15
    assert summary["frames_enhanced"] == n and summary["frames_written"] == {
        "raw": n,
        "enhanced": n,
    }
    # the files hold exactly what the camera produced, and its bicubic x2
    raw_file = srv.run_dir / "mda_p000_raw.ome.tif"
    enh_file = srv.run_dir / "mda_p000_bicubic-x2.ome.tif"
    raw = tifffile.imread(raw_file).reshape(-1, 256, 256)
    enh = tifffile.imread(enh_file).reshape(-1, 512, 512)
    assert np.array_equal(raw, np.stack(frames))
    assert enh.shape[0] == n and enh.dtype == np.uint16
    up = np.repeat(np.repeat(frames[3].astype(float), 2, 0), 2, 1)
    assert np.abs(enh[3][8:-8, 8:-8] - up[8:-8, 8:-8]).mean() < 0.25 * frames[3].std()
    with tifffile.TiffFile(enh_file) as tif:
        assert 'PhysicalSizeX="0.05"' in tif.ome_metadata
    # subscriber: raw and enhanced, with per-stage timings on enhanced headers
    kinds = [h.kind for h, _ in got]
    assert kinds.count("raw") >= n - 2 and kinds.count("enhanced") >= n - 2
    h, pix = next((h, p) for h, p in got if h.kind == "enhanced")
    assert pix.shape == (512, 512) and h.engine == "bicubic-x2" and h.scale == 2
    assert {"transport", "queue", "inference"} <= set(h.timings_ms)
    # the index: every enhanced frame points at its raw frame
    index = read_index(srv.run_dir / "index.jsonl")
    by_kind = {k: [r for r in index if r["kind"] == k] for k in ("raw", "enhanced")}
    assert len(by_kind["raw"]) == len(by_kind["enhanced"]) == n
    for r in by_kind["enhanced"]:
        assert r["raw"]["file"] == raw_file.name
        assert r["raw"]["plane"] == r["header"]["seq"]


# -- modes under a slow engine ------------------------------------------------------------------


def test_complete_mode_loses_nothing_under_a_slow_engine(tmp_path, servers):
    """A burst far faster than the engine, with a 1 MB backlog: spills, then every frame."""
    frames = ramp_frames(40, shape=(256, 256))
    srv = servers(tmp_path, "--engine", "gaussian", "--mode", "complete", "--backlog-mb", "1")
    send_frames(srv.listen, frames)
    summary = srv.stop({"scope": len(frames)})
    assert summary["frames_enhanced"] == len(frames)
    assert summary["frames_skipped"] == 0
    assert summary["frames_spilled"] > 0
    assert not (srv.run_dir / "spill").exists()
    enh = tifffile.imread(srv.run_dir / "scope_p000_gaussian.ome.tif").reshape(-1, 256, 256)
    index = [r for r in read_index(srv.run_dir / "index.jsonl") if r["kind"] == "enhanced"]
    assert [r["header"]["seq"] for r in index] == list(range(len(frames)))  # in order
    # each enhanced plane is the gaussian of its own raw frame (smooth, close to it)
    for i in (0, 17, 39):
        assert abs(float(enh[i].mean()) - float(frames[i].mean())) < 5
        assert enh[i].std() < 0.5 * frames[i].std()


def test_live_mode_skips_and_keeps_latency_bounded(tmp_path, servers):
    frames = ramp_frames(60, shape=(512, 512))
    srv = servers(tmp_path, "--engine", "gaussian", "--mode", "live")
    send_frames(srv.listen, frames)
    summary = srv.stop({"scope": len(frames)})
    assert summary["frames_received"] == len(frames)
    assert summary["frames_skipped"] > 0
    assert summary["frames_enhanced"] + summary["frames_skipped"] == len(frames)
    # raw frames are all written whatever happened to enhancement
    assert summary["frames_written"]["raw"] == len(frames)
    lat = summary["latency_ms"]
    # a frame waits for at most the enhancement in progress, never for a backlog
    assert lat["queue"]["max"] < 3 * lat["inference"]["max"] + 50


# -- bad input ----------------------------------------------------------------------------------


def test_malformed_messages_do_not_stop_the_server(tmp_path, servers):
    srv = servers(tmp_path, "--engine", "identity")
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(srv.listen)
    frame = np.arange(12, dtype=np.uint16).reshape(3, 4)
    good = FrameHeader(stream="x", seq=0, shape=(3, 4), dtype="uint16", mono_ns=time.monotonic_ns(),
                       wall_time=0.0)  # fmt: skip
    push.send_multipart([b"only one frame"])
    push.send_multipart([b"{not json", b""])
    push.send_multipart([json.dumps({**good.model_dump(), "version": 99}).encode(), b""])
    push.send_multipart([good.model_dump_json().encode(), b"\0" * 5])
    push.send_multipart(encode(good, frame))
    push.close(linger=2000)
    summary = srv.stop({"x": 1})
    assert summary["frames_rejected"] == {"malformed": 2, "version": 1, "buffer": 1}
    assert summary["frames_enhanced"] == 1
    with tifffile.TiffFile(srv.run_dir / "x_p000_identity.ome.tif") as tif:
        assert np.array_equal(tif.asarray(), frame)


def test_engine_errors_are_counted_and_raw_frames_still_written(tmp_path, servers):
    nan_engine = make_engine(
        tmp_path / "nan", "nan", [helper.make_node("Div", ["frames", "frames"], ["enhanced"])]
    )  # 0/0 = NaN on the zero pixels
    srv = servers(tmp_path / "run", "--engine", str(nan_engine), "--mode", "complete")
    frames = [np.zeros((8, 8), np.uint16), np.ones((8, 8), np.uint16),
              np.ones((8, 8, 3), np.uint16)]  # fmt: skip
    send_frames(srv.listen, frames)
    summary = srv.stop({"scope": 3})
    assert summary["engine_errors"] == {"nonfinite": 1, "shape": 1}
    assert summary["frames_enhanced"] == 1
    assert summary["frames_written"]["raw"] >= 2


def test_tampered_engine_package_is_refused(tmp_path):
    pkg = make_engine(
        tmp_path / "pkg", "pkg", [helper.make_node("Identity", ["frames"], ["enhanced"])]
    )
    model = pkg / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    model.write_bytes(bytes(data))
    run = subprocess.run(
        [sys.executable, "-m", "stream", "serve", "--engine", str(pkg), "--out", str(tmp_path),
         "--listen", free_endpoint(), "--publish", "none", "--control", free_endpoint()],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 2
    assert "sha256" in run.stderr and "model.onnx" in run.stderr


# -- temporal state and chaining ----------------------------------------------------------------


def test_multiposition_temporal_state_is_kept_apart(tmp_path, servers):
    """A window-2 temporal engine (mean of the last two frames, plus 0 x previous output),
    chained with bicubic-x2, on three interleaved positions of constant, distinct values."""
    nodes = [
        helper.make_node("ReduceMean", ["frames"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["previous", "previous"], ["zero"]),
        helper.make_node("Add", ["mean", "zero"], ["enhanced"]),
    ]
    temporal = make_engine(
        tmp_path / "temporal", "temporal-mean", nodes, inputs=("frames", "previous"),
        temporal=Temporal(window=2, previous_output=True), scale=1,
    )  # fmt: skip
    srv = servers(tmp_path / "run", "--engine", str(temporal), "--engine", "bicubic-x2",
                  "--mode", "complete")  # fmt: skip
    values = {0: 100, 1: 1000, 2: 3000}
    frames = [np.full((16, 16), values[i % 3] + (i // 3), np.uint16) for i in range(12)]
    send_frames(srv.listen, frames, positions=3)
    summary = srv.stop({"scope": 12})
    assert summary["engine_errors"] == {}
    assert summary["frames_enhanced"] == 12
    assert summary["engine"]["engine"] == "temporal-mean+bicubic-x2"
    for p, v in values.items():
        enh = tifffile.imread(srv.run_dir / f"scope_p{p:03d}_temporal-mean+bicubic-x2.ome.tif")
        enh = enh.reshape(-1, 32, 32)
        # t=0: window padded with the first frame; later: mean of t-1 and t of this position only
        expected = [v] + [v + t - 0.5 for t in range(1, 4)]
        assert np.allclose(enh.mean(axis=(1, 2)), np.rint(expected), atol=0.51), (p, enh.mean())


# -- crashes and signals ------------------------------------------------------------------------


def test_sigkill_leaves_every_completed_frame_recoverable(tmp_path, servers):
    srv = servers(tmp_path, "--engine", "identity", "--mode", "complete")
    frames = ramp_frames(30, shape=(128, 128), seed=3)
    send_frames(srv.listen, frames)
    deadline = time.monotonic() + 30
    while srv.status()["frames_written"]["raw"] < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait()
    raw_file = srv.run_dir / "scope_p000_raw.ome.tif"
    index = read_index(srv.run_dir / "index.jsonl")
    listed = [r for r in index if r["file"] == raw_file.name]
    assert len(listed) >= 20
    run = subprocess.run([sys.executable, "-m", "stream", "recover", str(raw_file)],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    r = recover(raw_file, output=tmp_path / "again.ome.tif")
    assert r.planes == len(listed) and r.bad_crc == 0
    data = tifffile.imread(r.output).reshape(-1, 128, 128)
    for rec, plane in zip(listed, data, strict=True):
        assert np.array_equal(plane, frames[rec["header"]["seq"]])
        assert zlib.crc32(plane) == rec["crc32"]


def test_sigterm_flushes_and_closes_every_file(tmp_path, servers):
    srv = servers(tmp_path, "--engine", "identity", "--mode", "complete")
    frames = ramp_frames(10, shape=(32, 32))
    send_frames(srv.listen, frames, positions=2)
    deadline = time.monotonic() + 30
    while srv.status()["frames_written"]["enhanced"] < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    srv.proc.send_signal(signal.SIGTERM)
    out, _ = srv.proc.communicate(timeout=60)
    assert srv.proc.returncode == 0
    files = json.loads(out.strip().splitlines()[-1])["files"]
    assert len([f for f in files if f.endswith(".ome.tif")]) == 4
    for p in (0, 1):
        for kind in ("raw", "identity"):
            with tifffile.TiffFile(srv.run_dir / f"scope_p{p:03d}_{kind}.ome.tif") as tif:
                assert tif.is_ome
                assert np.array_equal(tif.asarray().reshape(-1, 32, 32), np.stack(frames[p::2]))


# -- security -----------------------------------------------------------------------------------


def test_curve_keys_admit_only_clients_with_keys(tmp_path, servers):
    generate_keys(tmp_path / "keys")
    curve = Curve(tmp_path / "keys")
    srv = servers(tmp_path / "run", "--engine", "identity", "--keys", str(curve.directory),
                  curve=curve)  # fmt: skip
    # a client without keys cannot even complete the handshake
    with pytest.raises(Exception, match="no receiver answered"):
        FrameHook(srv.listen, stream="nokeys").wait_for_receiver(1.0)
    send_frames(srv.listen, ramp_frames(3, shape=(8, 8)), curve=curve)
    summary = request(srv.control, "stop", expect={"scope": 3}, curve=curve, timeout_s=60)
    assert summary["frames_received"] == 3 and summary["frames_received_by_stream"] == {"scope": 3}


def test_binding_beyond_loopback_needs_keys_or_insecure(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "stream", "serve", "--listen", "tcp://0.0.0.0:0", "--out",
         str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 2
    assert "--keys" in run.stderr and "--insecure" in run.stderr


# -- a full disk --------------------------------------------------------------------------------


def _limit_file_size():
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))


def test_full_disk_is_reported_and_the_server_keeps_serving(tmp_path, servers):
    srv = servers(tmp_path, "--engine", "identity", "--mode", "complete", preexec=_limit_file_size)
    viewer = Viewer(srv.publish)
    frames = ramp_frames(20, shape=(64, 64)) * 3  # 8 kB each: the raw file fills at ~36 frames
    send_frames(srv.listen, frames)
    summary = srv.stop({"scope": 60})
    got = viewer.join()
    assert summary["frames_received"] == 60 and summary["frames_enhanced"] == 60
    assert summary["disk_errors"]  # counted, by kind
    written = summary["frames_written"]["raw"]
    assert 0 < written < 60
    # publishing went on after the disk filled (a PUB drops frames for a slow viewer only)
    assert summary["published"] == 120
    assert any(h.kind == "enhanced" and h.seq > written for h, _ in got)
    r = recover(srv.run_dir / "scope_p000_raw.ome.tif", output=tmp_path / "r.ome.tif")
    assert r.planes == written and r.bad_crc == 0
    data = tifffile.imread(r.output).reshape(-1, 64, 64)
    assert np.array_equal(data, np.stack(frames[:written]))


def test_status_command_reports_the_running_server(tmp_path, servers):
    srv = servers(tmp_path, "--engine", "identity", "--mode", "complete")
    viewer = zmq.Context.instance().socket(zmq.SUB)  # a viewer that comes and goes
    viewer.connect(srv.publish)
    time.sleep(0.3)
    viewer.close(0)
    send_frames(srv.listen, ramp_frames(5, shape=(16, 16)))
    deadline = time.monotonic() + 20
    while srv.status()["frames_enhanced"] < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    run = subprocess.run(
        [sys.executable, "-m", "stream", "status", "--control", srv.control, "--json"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"},
        check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    s = json.loads(run.stdout)
    assert s["frames_enhanced"] == 5 and s["engine"]["engine"] == "identity"
    assert s["latency_ms"]["total"]["p50"] <= s["latency_ms"]["total"]["p99"]
    assert set(s["queues"]) == {"engine", "writer"}
    assert s["viewers"] == {"connected": 1, "gone": 1}
    srv.stop()
