"""The hook on its own: zero-copy sends never race a reused camera buffer; it never blocks."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq

from stream.endpoints import EndpointError
from stream.hook import FrameHook, ReceiverUnreachable
from stream.protocol import decode
from stream.receiver import FrameReceiver


def test_reused_camera_buffer_never_corrupts_a_frame_in_flight(endpoint: str) -> None:
    """The camera writes every frame into one buffer and overwrites it right after frameReady.

    A hook that handed that buffer to send(copy=False) would deliver overwritten pixels.
    """
    n, shape = 300, (256, 256)
    got: list[tuple[int, np.ndarray]] = []
    with FrameReceiver(endpoint) as rx:
        t = threading.Thread(
            target=rx.run,
            args=(lambda h, px: got.append((h.seq, px.copy())),),
            kwargs={"count": n, "idle_timeout_s": 10},
            daemon=True,
        )
        t.start()
        with FrameHook(endpoint, hwm=1000) as hook:
            hook.wait_for_receiver(5)
            camera = np.empty(shape, np.uint16)
            for i in range(n):
                camera[:] = i
                assert hook.send(camera)
                camera[:] = 0xFFFF  # the camera starts the next readout at once
        t.join(20)
    assert [s for s, _ in got] == list(range(n))
    bad = [s for s, px in got if not (px == s).all()]
    assert not bad, f"frames corrupted in flight: {bad[:10]}"


def test_no_receiver_counts_frames_without_blocking(endpoint: str) -> None:
    hook = FrameHook(endpoint, hwm=4)
    frame = np.zeros((512, 512), np.uint16)
    t0 = time.monotonic()
    sent = [hook.send(frame) for _ in range(50)]
    elapsed = time.monotonic() - t0
    hook.close()
    assert not any(sent)
    assert hook.stats.frames_seen == 50
    assert hook.stats.not_handed_over == {"no_receiver_or_hwm": 50}
    assert elapsed < 5, "send must not wait for a receiver"


def test_stalled_receiver_fills_hwm_then_frames_are_counted(endpoint: str) -> None:
    """A receiver that connects but never reads: the hook queues up to its buffers, then counts."""
    ctx = zmq.Context.instance()
    stalled = ctx.socket(zmq.PULL)
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.RCVBUF, 4096)
    stalled.bind(endpoint)
    hook = FrameHook(endpoint, hwm=2)
    hook.wait_for_receiver(5)
    frame = np.zeros((1024, 1024), np.uint16)  # 2 MB: exceeds any socket buffer quickly
    results = [hook.send(frame) for _ in range(100)]
    s = hook.stats
    assert s.frames_seen == 100
    assert s.frames_sent + s.frames_not_handed_over == 100
    assert s.frames_not_handed_over > 80, s.summary()
    assert results.count(True) == s.frames_sent
    # what was sent is intact once the receiver reads it
    stalled.setsockopt(zmq.RCVTIMEO, 5000)
    header, pixels = decode(stalled.recv_multipart(copy=False))
    assert header.seq == 0 and pixels.shape == (1024, 1024)
    hook.close()
    stalled.close(0)


def test_unreachable_receiver_is_a_clear_error(endpoint: str) -> None:
    hook = FrameHook(endpoint)
    with pytest.raises(ReceiverUnreachable, match=f"no receiver answered at {endpoint}") as e:
        hook.wait_for_receiver(0.3)
    assert f"`scopecast serve --listen {endpoint}`" in str(e.value)  # the server, first
    hook.close()


def test_a_receiver_that_goes_away_is_counted_and_noticed(endpoint: str) -> None:
    """A killed server takes the frames in its buffers with it: the hook cannot count those,
    so it reports that the receiver left, and that it is gone at the end."""
    ctx = zmq.Context.instance()
    pull = ctx.socket(zmq.PULL)
    pull.bind(endpoint)
    hook = FrameHook(endpoint)
    hook.wait_for_receiver(5)
    hook.wait_for_receiver(0.1)  # still connected: returns at once
    frame = np.zeros((8, 8), np.uint16)
    assert hook.send(frame) and hook.receiver_connected()
    assert hook.stats.receiver_disconnects == 0
    pull.close(0)
    deadline = time.monotonic() + 5
    while hook.receiver_connected():
        assert time.monotonic() < deadline, "the disconnect was not noticed"
        time.sleep(0.01)
    # ZeroMQ's I/O thread reports the disconnect a moment before the socket drops the pipe: a
    # frame sent in that moment goes down with the receiver (the case the docstring describes)
    while hook.send(frame):
        assert time.monotonic() < deadline, "frames still handed over to a receiver that left"
        time.sleep(0.01)
    assert hook.stats.receiver_disconnects == 1
    assert hook.stats.summary()["receiver_disconnects"] == 1
    assert hook.stats.not_handed_over == {"no_receiver_or_hwm": 1}
    # a receiver that comes back is seen again
    pull = ctx.socket(zmq.PULL)
    pull.bind(endpoint)
    hook.wait_for_receiver(10)
    assert hook.receiver_connected() and hook.send(frame)
    hook.close()
    pull.close(0)


@pytest.mark.parametrize("endpoint", ["127.0.0.1:5555", "tcp://127.0.0.1", "udp://x:1", ""])
def test_bad_endpoint(endpoint: str) -> None:
    with pytest.raises(EndpointError, match="is not tcp://HOST:PORT"):
        FrameHook(endpoint)


def test_bad_stream_id() -> None:
    with pytest.raises(ValueError, match="stream id"):
        FrameHook("tcp://127.0.0.1:1", stream="has space")


def test_unsupported_dtype_is_counted_not_raised(endpoint: str) -> None:
    with FrameReceiver(endpoint), FrameHook(endpoint) as hook:
        hook.wait_for_receiver(5)
        assert not hook.send(np.zeros((4, 4), np.float64))
        assert hook.send(np.zeros((4, 4), np.uint16))
    assert hook.stats.not_handed_over == {"invalid_frame": 1}
    assert hook.stats.frames_sent == 1
