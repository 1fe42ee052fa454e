"""The engine server against hostile messages and faults: each finding of "Never a silent
zombie", reproduced on a real server (real sockets, real files, a real full disk on tmpfs)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zmq
from test_server import (
    Temporal,
    helper,
    make_engine,
    ramp_frames,
    send_frame,
    send_frames,
    started_hook,
)

from stream.acquire import free_endpoint
from stream.protocol import FrameHeader, encode
from stream.sinks.index import read_index
from stream.sinks.recover import recover


def _header(**fields) -> FrameHeader:
    base = {"stream": "good", "seq": 0, "shape": (16, 16), "dtype": "uint16",
            "mono_ns": time.monotonic_ns(), "wall_time": time.time(),
            "pixel_size_um": 0.5}  # fmt: skip
    return FrameHeader.model_construct(**{**base, **fields})


def _raw_header(**fields) -> bytes:
    """A header as bytes, with fields no valid FrameHeader could hold (NaN, huge, negative)."""
    h = _header().model_dump(mode="json", exclude_none=True)
    h.update(fields)
    return json.dumps(h).encode()  # NaN -> the JSON token NaN, as a careless client sends it


def _good(seq: int, rng) -> tuple[FrameHeader, np.ndarray]:
    frame = rng.integers(0, 60000, (16, 16), dtype=np.uint16)
    return FrameHeader(stream="good", seq=seq, index={"t": seq}, shape=(16, 16), dtype="uint16",
                       mono_ns=time.monotonic_ns(), wall_time=time.time(),
                       pixel_size_um=0.5), frame  # fmt: skip


def _control(endpoint: str, *parts: bytes, timeout_s: float = 10.0) -> dict:
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(list(parts))
        assert sock.poll(int(timeout_s * 1000)), f"no answer to {parts[0][:40]!r}"
        return json.loads(sock.recv())
    finally:
        sock.close(0)


def _planes(run_dir: Path, stream: str) -> dict[int, np.ndarray]:
    """Every raw plane of ``stream`` in the index, read back at its offset and crc-checked."""
    import zlib

    got = {}
    for r in read_index(run_dir / "index.jsonl"):
        if r["kind"] != "raw" or r["header"]["stream"] != stream:
            continue
        with open(run_dir / r["file"], "rb") as f:
            f.seek(r["offset"])
            data = f.read(r["nbytes"])
        assert zlib.crc32(data) == r["crc32"]
        got[r["header"]["seq"]] = np.frombuffer(data, np.uint16).reshape(r["shape"])
    return got


def test_hostile_messages_stop_no_stage(tmp_path, servers):
    """Findings 1, 2, 3, 4, 8: each message once, then good frames; every stage still works."""
    srv = servers(tmp_path, "--engine", "identity", "--mode", "complete")
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(srv.listen)
    pixels = np.zeros((16, 16), np.uint16).tobytes()
    hostile = {
        "malformed": [b"[" * 60_000, b'{"version": 1, "seq": ' + b"9" * 5000 + b"}"],
        "header": [
            _raw_header(pixel_size_um=-1), _raw_header(pixel_size_um=0),
            _raw_header(pixel_size_um=math.nan), _raw_header(pixel_size_um=1e-7),
            _raw_header(index={"p": 10**300}),
            _raw_header(wall_time=math.nan), _raw_header(wall_time=math.inf),
            _raw_header(exposure_ms=-math.inf), _raw_header(stage={"x": math.nan}),
            _raw_header(channel="FITC\x00"), _raw_header(mono_ns=-1),
        ],
    }  # fmt: skip
    for headers in hostile.values():
        for h in headers:
            push.send_multipart([h, pixels])
    rng = np.random.default_rng(1)
    good = [_good(seq, rng) for seq in range(20)]
    for h, frame in good:
        push.send_multipart(encode(h, frame))
    # the control socket: a multipart request, non-finite and huge numbers, deep nesting
    for parts in ([b'{"cmd": "status"}', b"more"], [b'{"cmd": "stop", "expect": {"s": Infinity}}'],
                  [b'{"cmd": "stop", "timeout_s": 1e999}'], [b"[" * 50_000], [b"\xff\xfe"],
                  [b'{"cmd": "stop", "expect": {"s": ' + b"9" * 5000 + b"}}"]):  # fmt: skip
        assert "error" in _control(srv.control, *parts)
    deadline = time.monotonic() + 30
    while (s := srv.status())["frames_written"]["raw"] < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s["healthy"] is True and s["failure"] is None and s["stage_errors"] == {}
    assert s["requests_rejected"] == 6
    assert "publish_dropped" not in s  # a number that could never move is gone
    push.close(linger=2000)
    summary = srv.stop({"good": 20})
    assert summary["healthy"] is True and summary["stage_errors"] == {}
    assert summary["frames_rejected"] == {k: len(v) for k, v in hostile.items()}
    assert summary["frames_received"] == summary["frames_enhanced"] == 20
    assert summary["disk_errors"] == {} and summary["engine_errors"] == {}
    planes = _planes(srv.run_dir, "good")
    assert sorted(planes) == list(range(20))
    assert all(np.array_equal(planes[h.seq], f) for h, f in good)
    with tifffile.TiffFile(srv.run_dir / "good_p000_raw.ome.tif") as tif:
        assert tif.is_ome and np.array_equal(tif.asarray(), np.stack([f for _, f in good]))


def test_a_dead_stage_is_reported_and_the_server_stops(tmp_path):
    """A fault no guard catches (here KeyboardInterrupt inside the writer) ends the thread:
    the supervisor reports it, the server drains, closes its files and run() returns."""
    from stream.server import EngineServer, ServerConfig

    config = ServerConfig(out_dir=tmp_path, listen=free_endpoint(), publish=None,
                          control=free_endpoint(), mode="complete")  # fmt: skip
    server = EngineServer(config)
    real_write = server.writer.write_raw
    calls = []

    def write_raw(header, frame, **kw):
        calls.append(header.seq)
        if len(calls) == 3:
            raise KeyboardInterrupt("injected")  # not an Exception: the per-item guard lets it go
        return real_write(header, frame, **kw)

    server.writer.write_raw = write_raw
    results: list = []
    runner = threading.Thread(target=lambda: results.append(server.run()))
    runner.start()
    send_frames(config.listen, ramp_frames(10, shape=(16, 16)))
    runner.join(60)
    assert not runner.is_alive(), "the server kept running with a dead writer"
    (result,) = results
    assert result.healthy is False
    assert result.failure.stage == "writer" and "injected" in result.failure.error
    # the replacement writer drained the queue: every frame but the one that died is on disk
    assert result.frames_written.raw == result.frames_received - 1
    with tifffile.TiffFile(server.run_dir / "scope_p000_raw.ome.tif") as tif:
        assert tif.is_ome and len(tif.pages) == result.frames_written.raw


def test_spill_that_the_disk_refuses_is_counted_not_fatal(tmp_path, servers):
    """Finding 5: complete mode under a slow engine with a tiny backlog, the spill folder
    unusable (a file where the folder should be): frames stay in memory up to twice the
    backlog, beyond that their enhancement is counted as lost; every raw frame is written."""
    srv = servers(tmp_path, "--engine", "gaussian", "--mode", "complete", "--backlog-mb", "0.5")
    (srv.run_dir / "spill").write_bytes(b"not a folder")
    frames = ramp_frames(40, shape=(256, 256))
    send_frames(srv.listen, frames)
    summary = srv.stop({"scope": 40})
    assert summary["healthy"] is True and summary["stage_errors"] == {}
    assert summary["disk_errors"]["spill"] > 0
    assert summary["frames_spilled"] == 0
    assert summary["frames_enhanced"] + summary["frames_not_enhanced"] == 40
    assert summary["frames_written"]["raw"] == 40


def test_ring_memory_is_bounded_with_many_keys(tmp_path, servers):
    """Finding 7: hundreds of keys (a z-stack at every position) under a temporal engine: the
    rings stay within --ring-mb, the least recently used keys are evicted."""
    nodes = [helper.make_node("ReduceMean", ["frames"], ["enhanced"], axes=[1], keepdims=1)]
    temporal = make_engine(tmp_path / "t", "mean2", nodes, temporal=Temporal(window=2))
    srv = servers(tmp_path / "run", "--engine", str(temporal), "--mode", "complete",
                  "--ring-mb", "1")  # fmt: skip
    frames = ramp_frames(300, shape=(64, 64))  # 8 kB frames, 2 per key: 128 keys fit in 1 MiB
    send_frames(srv.listen, frames, positions=300)  # 300 keys, one frame each
    summary = srv.stop({"scope": 300})
    rings = summary["rings"]
    assert summary["frames_enhanced"] == 300 and summary["healthy"]
    assert rings["bytes"] <= rings["budget_bytes"] == 2**20
    assert rings["evicted"]["budget"] >= 300 - 128 and rings["keys"] <= 128


def test_grid_tiles_and_shared_stream_ids_keep_their_temporal_state(tmp_path, servers):
    """Finding 10: two grid tiles per time point, and two acquisitions interleaved on one
    stream id: no reset but each key's first frame (before: a reset on every frame)."""
    nodes = [helper.make_node("ReduceMean", ["frames"], ["enhanced"], axes=[1], keepdims=1)]
    temporal = make_engine(tmp_path / "t", "mean2", nodes, temporal=Temporal(window=2))
    srv = servers(tmp_path / "run", "--engine", str(temporal), "--mode", "complete")
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(srv.listen)
    acquisitions = [str(uuid.uuid4()), str(uuid.uuid4())]
    seq = dict.fromkeys(acquisitions, 0)
    frame = np.ones((16, 16), np.uint16)
    for t in range(10):
        for a in acquisitions:
            for g in (0, 1):
                h = FrameHeader(stream="plate", seq=seq[a], index={"t": t, "p": 0, "g": g},
                                shape=(16, 16), dtype="uint16", mono_ns=time.monotonic_ns(),
                                wall_time=time.time(), acquisition=a)  # fmt: skip
                seq[a] += 1
                push.send_multipart(encode(h, frame))
    push.close(linger=2000)
    summary = srv.stop({"plate": 40})
    assert summary["frames_enhanced"] == 40
    resets = summary["rings"]["resets"]
    assert resets["first"] == 4 and sum(resets.values()) == 4, resets


# -- a real full disk (tmpfs) ---------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs: a disk that really fills (ENOSPC), unlike RLIMIT_FSIZE's per-file cap."""
    mount = tmp_path / "disk"
    mount.mkdir()
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)],
                         capture_output=True, text=True, check=False)  # fmt: skip
    if run.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({run.stderr.strip()}): needs root in a "
                    "container that allows mounts")  # fmt: skip
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, name: str, leave: int = 0) -> Path:
    """Write a filler file until only ``leave`` bytes are free."""
    path = disk / name
    free = shutil.disk_usage(disk).free - leave
    with open(path, "wb") as f:
        try:
            f.write(b"\0" * max(free, 0))
            f.flush()
        except OSError:
            pass
    return path


def test_full_disk_while_streaming_spilling_and_closing(small_disk, servers):
    """The disk fills while frames stream and spill; space comes back and writing resumes;
    the disk is full again at close. The server stays healthy, counts every refusal, and every
    indexed plane is on disk bit-exact in files that tifffile opens."""
    srv = servers(small_disk, "--engine", "gaussian", "--mode", "complete", "--backlog-mb", "0.1")
    frames = ramp_frames(60, shape=(128, 128), seed=5)  # 32 kB raw + 32 kB enhanced each
    hook = started_hook(srv.listen, stream="a")
    for t in range(4):  # on disk before it fills (on a slow machine spilled frames could fill
        send_frame(hook, frames[t], t)  # it before the writer's first raw frame)
    deadline = time.monotonic() + 60
    while srv.status()["frames_written"]["raw"] < 4:
        assert time.monotonic() < deadline, "the first frames were not written"
        time.sleep(0.05)
    filler = _fill(small_disk, "filler", leave=700_000)
    for t in range(4, 40):
        send_frame(hook, frames[t], t)
    hook.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        s = srv.status()
        if s["frames_enhanced"] + s["frames_not_enhanced"] >= 40 and not any(s["queues"].values()):
            break
        time.sleep(0.1)
    assert s["disk_errors"], "the disk never filled"
    written_full = s["frames_written"]["raw"]
    assert 0 < written_full < 40
    filler.unlink()  # space comes back: the next writes succeed
    send_frames(srv.listen, frames[40:], stream="b")
    deadline = time.monotonic() + 60
    while srv.status()["frames_written"]["raw"] < written_full + 20:
        assert time.monotonic() < deadline, "writing did not resume after space came back"
        time.sleep(0.1)
    _fill(small_disk, "filler2")  # full again when the files are closed
    summary = srv.stop({"a": 40, "b": 20})
    assert summary["healthy"] is True and summary["stage_errors"] == {}
    assert summary["frames_received"] == 60
    assert summary["frames_enhanced"] + summary["frames_not_enhanced"] == 60
    for stream, sent in (("a", frames[:40]), ("b", frames[40:])):
        planes = _planes(srv.run_dir, stream)
        assert planes, stream
        for seq, plane in planes.items():
            assert np.array_equal(plane, sent[seq])
    (small_disk / "filler2").unlink()
    for path in sorted(srv.run_dir.glob("*.ome.tif")):
        with tifffile.TiffFile(path) as tif:  # opens, every page readable
            assert all(p.asarray().shape == (128, 128) for p in tif.pages)
        r = recover(path, output=path.with_name(path.name + ".r.ome.tif"))
        assert r.bad_crc == 0 and r.planes > 0
