"""The same-host shared-memory transport: real FrameHook, real ZeroMQ on loopback, the real
receiver and server. Pixels arrive bit-exact; forged, stale and out-of-bounds references are
rejected and counted; a slot written again is never read torn; a full ring falls back to
inline; remote endpoints never use it; segments do not outlive their hook."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zmq
from test_server import ramp_frames, send_frame, started_hook

from stream import shm as shm_mod
from stream.acquire import free_endpoint
from stream.hook import FrameHook
from stream.protocol import FrameHeader, ShmRef, encode
from stream.receiver import FrameReceiver
from stream.server import EngineServer, ServerConfig
from stream.shm import MAGIC, ShmReader, ShmRing, sweep_stale

pytestmark = pytest.mark.skipif(shm_mod.available() is not None, reason=str(shm_mod.available()))


def _wait(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def _segments() -> set[str]:
    return {p.name for p in shm_mod.SHM_DIR.glob(f"scopecast-{os.getpid()}-*")}


def _header(seq: int, shape=(16, 16), **kw) -> FrameHeader:
    return FrameHeader(stream="x", seq=seq, shape=shape, dtype="uint16",
                       mono_ns=time.monotonic_ns(), wall_time=0.0, **kw)  # fmt: skip


def _ref_message(seq: int, name: str, slot: int, generation: int, shape=(16, 16)) -> list[bytes]:
    ref = ShmRef(name=name, slot=slot, generation=generation)
    return [_header(seq, shape, shm=ref).model_dump_json(exclude_none=True).encode(), b""]


def _receive(rx: FrameReceiver, n: int = 1, timeout_s: float = 10.0) -> list:
    """Up to n valid frames, or fewer once a receive times out."""
    got = []
    for _ in range(n):
        if (one := rx.receive(int(timeout_s * 1000))) is None:
            break
        got.append(one)
    return got


def _accepted_hook(endpoint: str, rx: FrameReceiver, **kw) -> FrameHook:
    """A hook whose ring the receiver mapped: its first frame went inline with the offer."""
    hook = FrameHook(endpoint, **kw)
    hook.wait_for_receiver(5)
    assert hook.send(np.zeros((16, 16), np.uint16))
    assert len(_receive(rx)) == 1
    _wait(lambda: hook.transport == "shm")
    return hook


def test_frames_arrive_bit_exact_through_a_real_server(tmp_path: Path) -> None:
    config = ServerConfig(out_dir=tmp_path, listen=free_endpoint(), publish=None,
                          control=free_endpoint(), mode="complete")  # fmt: skip
    server = EngineServer(config)
    results: list = []
    runner = threading.Thread(target=lambda: results.append(server.run()))
    runner.start()
    frames = ramp_frames(12, shape=(48, 40))
    try:
        hook = started_hook(config.listen)
        send_frame(hook, frames[0], 0)
        _wait(lambda: hook.transport == "shm")
        segment = hook.shm_segment
        assert segment in _segments()
        for t, frame in enumerate(frames[1:], 1):
            send_frame(hook, frame, t)
        live = server.status()
        hook.close()
        assert segment not in _segments(), "the hook unlinks its segment at close"
        via_shm, fell_back = hook.stats.frames_shm, sum(hook.stats.shm_fallbacks.values())
        # a busy receive thread may owe every slot for a moment: those frames went inline
        assert via_shm >= 1 and via_shm + fell_back == 11
        assert set(hook.stats.shm_fallbacks) <= {"ring_full"}
    finally:
        server.stop({"scope": 12}, timeout_s=60)
        runner.join(60)
    (summary,) = results
    assert live.transport["scope"].transport in ("shm", "inline")
    t = summary.transport["scope"]
    assert (t.frames_shm, t.frames_inline, t.fallbacks) == (via_shm, 1 + fell_back, fell_back)
    assert summary.frames_rejected == {} and summary.frames_written.raw == 12
    (raw,) = [f for f in summary.files if "_raw" in f and f.endswith(".ome.tif")]
    assert np.array_equal(tifffile.imread(raw), np.stack(frames))
    index = [json.loads(line) for line in (Path(summary.out_dir) / "index.jsonl").open()]
    assert not any("shm" in json.dumps(e.get("header", {})) for e in index), "no shm in the index"


def test_forged_stale_and_out_of_bounds_references_are_rejected_and_counted(tmp_path: Path):
    """Against the real server: every bad reference is counted by kind, nothing crashes, and
    the frames before and after are recorded."""
    config = ServerConfig(out_dir=tmp_path, listen=free_endpoint(), publish=None,
                          control=free_endpoint(), mode="complete")  # fmt: skip
    server = EngineServer(config)
    results: list = []
    runner = threading.Thread(target=lambda: results.append(server.run()))
    runner.start()
    ring = ShmRing(2, 16 * 16 * 2)
    forged = shm_mod.SHM_DIR / f"scopecast-{os.getpid()}-0badf00d"
    forged.write_bytes(b"NOTSCOPE" + b"\0" * 8184)
    good = np.arange(256, dtype=np.uint16).reshape(16, 16)
    try:
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.connect(config.listen)
        push.send_multipart(encode(_header(0), good))
        gen = ring.write(0, good + 1, (16, 16), np.dtype("<u2"))
        ring.offer()
        for msg in (
            _ref_message(1, f"scopecast-{os.getpid()}-00000000", 0, 2),  # no such segment
            _ref_message(2, forged.name, 0, 2),  # not a scopecast layout
            _ref_message(3, ring.name, 5, gen),  # slot outside the ring
            _ref_message(4, ring.name, 0, gen, shape=(64, 64)),  # bigger than a slot
            _ref_message(5, ring.name, 0, gen + 2),  # a generation the slot never had
            [_ref_message(6, ring.name, 0, gen)[0], good.tobytes()],  # pixels inline as well
            [b'{"version": 1, "stream": "x", "shm": {"name": "../../etc/passwd"}}', b""],
            _ref_message(7, ring.name, 0, gen),  # the one good reference
        ):
            push.send_multipart(msg)
        push.close(linger=2000)
        _wait(lambda: sum(server.received.values()) == 2)
        ring.write(0, good + 2, (16, 16), np.dtype("<u2"))  # lapped: the message is stale now
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.connect(config.listen)
        push.send_multipart(_ref_message(8, ring.name, 0, gen))
        push.send_multipart(encode(_header(9), good + 3))
        push.close(linger=2000)
        _wait(lambda: sum(server.received.values()) == 3)
        assert server.status().healthy
    finally:
        server.stop({"x": 3}, timeout_s=60)
        runner.join(60)
        ring.close()
        forged.unlink(missing_ok=True)
    (summary,) = results
    assert summary.healthy
    assert summary.frames_rejected == {"shm": 4, "shm_overwritten": 2, "buffer": 1, "header": 1}
    t = summary.transport["x"]
    assert t.rejected == {"shm": 4, "shm_overwritten": 2}
    assert (t.frames_shm, t.frames_inline) == (1, 2)
    (raw,) = [f for f in summary.files if "_raw" in f and f.endswith(".ome.tif")]
    assert np.array_equal(tifffile.imread(raw), np.stack([good, good + 1, good + 3]))


def test_a_slot_written_while_it_is_read_is_dropped_never_torn(endpoint, monkeypatch) -> None:
    with FrameReceiver(endpoint) as rx:
        hook = _accepted_hook(endpoint, rx, shm_slots=2)
        copy = ShmReader._copy

        def interrupted(out: np.ndarray, src: np.ndarray) -> None:
            copy(out[: len(out) // 2], src[: len(src) // 2])
            hook._ring.write(0, np.full((16, 16), 7, np.uint16), (16, 16), np.dtype("<u2"))  # type: ignore[union-attr]
            copy(out[len(out) // 2 :], src[len(src) // 2 :])

        monkeypatch.setattr(ShmReader, "_copy", staticmethod(interrupted))
        assert hook.send(np.full((16, 16), 1, np.uint16))  # slot 0
        assert _receive(rx, timeout_s=1) == []
        monkeypatch.setattr(ShmReader, "_copy", staticmethod(copy))
        assert hook.send(np.full((16, 16), 2, np.uint16))  # slot 1: fine again
        ((header, pixels),) = _receive(rx)
        hook._ring.release(0)  # type: ignore[union-attr]  # the test's own write: nobody reads it
        hook.close()
    assert header.seq == 2 and (pixels == 2).all()
    assert rx.stats.rejected == {"shm_overwritten": 1}
    assert rx.stats.transport["scope"].rejected == {"shm_overwritten": 1}


def test_a_full_ring_falls_back_to_inline_without_waiting(endpoint) -> None:
    with FrameReceiver(endpoint) as rx:
        hook = _accepted_hook(endpoint, rx, shm_slots=2, hwm=100)
        frames = ramp_frames(6, shape=(16, 16), seed=1)
        t0 = time.monotonic()
        assert all(hook.send(f) for f in frames)  # the receiver reads nothing meanwhile
        assert time.monotonic() - t0 < 2
        assert hook.stats.frames_shm == 2
        assert hook.stats.shm_fallbacks == {"ring_full": 4}
        got = _receive(rx, 6)
        assert [h.seq for h, _ in got] == list(range(1, 7))
        assert all(np.array_equal(px, f) for (_, px), f in zip(got, frames, strict=True))
        # read: the slots are free again
        assert hook.send(frames[0]) and hook.stats.frames_shm == 3
        assert _receive(rx)[0][0].seq == 7
        hook.close()
    t = rx.stats.transport["scope"]
    assert (t.frames_shm, t.frames_inline, t.fallbacks) == (3, 5, 4)


def test_a_receiver_that_cannot_map_the_segment_keeps_the_stream_inline(endpoint, tmp_path):
    """Like a server on another host behind a tunnel to a loopback port: the offer goes
    unanswered, every frame arrives inline."""
    with FrameReceiver(endpoint) as rx:
        rx._shm = ShmReader(directory=tmp_path)  # the hook's /dev/shm is not this one
        with FrameHook(endpoint) as hook:
            hook.wait_for_receiver(5)
            frames = ramp_frames(5, shape=(16, 16), seed=2)
            for f in frames:
                assert hook.send(f)
            got = _receive(rx, 5)
            assert hook.transport == "inline" and hook.stats.frames_shm == 0
    assert all(np.array_equal(px, f) for (_, px), f in zip(got, frames, strict=True))
    assert rx.stats.transport["scope"].offers_refused == 1
    assert rx.stats.rejected == {}


def _non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: only picks the outgoing address
            addr = s.getsockname()[0]
    except OSError:
        return None
    return None if addr.startswith("127.") else addr


def test_remote_endpoints_never_use_shared_memory(monkeypatch) -> None:
    assert FrameHook._use_shm("tcp://127.0.0.1:5555") and FrameHook._use_shm("ipc:///tmp/x")
    assert not FrameHook._use_shm("tcp://192.0.2.7:5555")
    assert not FrameHook._use_shm("inproc://x")
    monkeypatch.setenv("SCOPECAST_SHM", "0")
    assert not FrameHook._use_shm("tcp://127.0.0.1:5555")
    monkeypatch.delenv("SCOPECAST_SHM")
    addr = _non_loopback_address()
    if addr is None:
        pytest.skip("no non-loopback address on this machine")
    port = free_endpoint().rsplit(":", 1)[1]
    endpoint = f"tcp://{addr}:{port}"
    with FrameReceiver(endpoint, insecure=True) as rx, FrameHook(endpoint) as hook:
        hook.wait_for_receiver(5)
        frames = ramp_frames(3, shape=(16, 16), seed=3)
        assert all(hook.send(f) for f in frames)
        got = _receive(rx, 3)
        assert hook.shm_segment is None and hook.transport == "inline"
    assert all(np.array_equal(px, f) for (_, px), f in zip(got, frames, strict=True))
    assert rx.stats.transport["scope"].frames_shm == 0


def test_segments_do_not_outlive_their_hook(endpoint) -> None:
    with FrameReceiver(endpoint) as rx:
        hook = _accepted_hook(endpoint, rx)
        name = hook.shm_segment
        assert hook.send(np.ones((16, 16), np.uint16)) and _receive(rx)
        hook.close()
        assert name not in _segments()
    # a hook that dies leaves its segment behind: the next hook or receiver unlinks it
    code = "from stream.shm import ShmRing; import os; print(ShmRing(2, 4096).name); os._exit(0)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[1])  # fmt: skip
    orphan = out.stdout.strip()
    assert (shm_mod.SHM_DIR / orphan).exists()
    assert orphan in sweep_stale()
    assert not (shm_mod.SHM_DIR / orphan).exists()


def test_a_truncated_segment_is_refused_not_a_crash(endpoint) -> None:
    """Reading past the end of a shrunk mapping would kill the process with SIGBUS."""
    ring = ShmRing(1, 512)
    gen = ring.write(0, np.ones((16, 16), np.uint16), (16, 16), np.dtype("<u2"))
    reader = ShmReader()
    header = FrameHeader.model_validate_json(_ref_message(0, ring.name, 0, gen)[0])
    assert (reader.read(header) == 1).all()
    os.truncate(ring.path, 100)
    with pytest.raises(shm_mod.ShmRefused, match="truncated"):
        reader.read(header)
    assert reader.segments == 0
    reader.close()
    ring.close()
    assert MAGIC == b"SCOPESHM"
