"""The acquisition hook: a pymmcore-plus output handler that pushes every frame over ZeroMQ.

``core.run_mda(sequence, output=FrameHook("tcp://127.0.0.1:5555"))``

It never blocks the acquisition: frames are copied into buffers the hook owns and
sent with NOBLOCK behind a bounded high-water mark. A frame it cannot hand over (receiver
gone or too slow) is counted, never silently lost, and the counters are reported at
sequence end. The hook owns each sent buffer until libzmq says it is done with it
(``track=True``), so a camera that reuses its buffer can never corrupt a frame in flight.

When the receiver runs on this host (a loopback or ipc endpoint, and the receiver maps the
offered segment) the pixels go through a ring of shared-memory slots instead and the message
carries only the header (:mod:`stream.shm`); with no free slot a frame goes inline, never
waiting. ``shm=False`` (or ``SCOPECAST_SHM=0`` in the environment) keeps every frame inline.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq
from pydantic import ValidationError

from calibration.errors import ScopecastError

from .endpoints import EndpointError, check_endpoint, is_loopback
from .protocol import DTYPES, FrameHeader, ShmOffer, ShmRef, StagePosition, check_stream_id, encode
from .security import Curve
from .shm import ShmRing
from .shm import available as shm_available
from .stats import Samples, percentiles

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    import useq

log = logging.getLogger(__name__)


#: connection events the hook follows: a receiver that came (handshake) and one that left
_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED


class ReceiverUnreachable(ScopecastError, RuntimeError):
    """No receiver is connected at the hook's endpoint."""


@dataclass
class HookStats:
    """What the hook did with the frames of one acquisition."""

    frames_seen: int = 0
    frames_sent: int = 0
    bytes_sent: int = 0
    not_handed_over: Counter[str] = field(default_factory=Counter)
    send_us: Samples = field(default_factory=Samples, repr=False)  # flat memory over days
    first_ns: int | None = None
    last_ns: int | None = None
    receiver_disconnects: int = 0  # a connected receiver went away (it may have lost frames)
    frames_shm: int = 0  # of frames_sent: pixels through shared memory
    shm_fallbacks: Counter[str] = field(default_factory=Counter)  # inline although shm was on
    transport: str = "inline"  # how the latest frame went: shm or inline

    @property
    def frames_not_handed_over(self) -> int:
        return sum(self.not_handed_over.values())

    @property
    def fps(self) -> float | None:
        """Frame rate the acquisition delivered frames at (frameReady to frameReady)."""
        first, last = self.first_ns, self.last_ns  # both set with the first frame
        if self.frames_seen < 2 or not last or first is None or last == first:
            return None
        return (self.frames_seen - 1) * 1e9 / (last - first)

    def summary(self) -> dict[str, Any]:
        return {
            "frames_seen": self.frames_seen,
            "frames_sent": self.frames_sent,
            "frames_not_handed_over": self.frames_not_handed_over,
            "not_handed_over_by_reason": dict(self.not_handed_over),
            "bytes_sent": self.bytes_sent,
            "receiver_disconnects": self.receiver_disconnects,
            "transport": self.transport,
            "frames_via_shm": self.frames_shm,
            "shm_fallbacks": dict(self.shm_fallbacks),
            "fps": self.fps,
            "hook_ms": percentiles(self.send_us.values() / 1e3),
        }


class _BufferPool:
    """Reusable frame buffers, each lent to libzmq until its MessageTracker is done."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free: dict[tuple, list[np.ndarray]] = {}
        self._in_flight: list[tuple[np.ndarray, zmq.MessageTracker]] = []

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        """A buffer to fill, or None when ``limit`` buffers are still in libzmq's hands."""
        self._reclaim()
        if free := self._free.get((shape, dtype.str)):
            return free.pop()
        return None if len(self._in_flight) >= self.limit else np.empty(shape, dtype)

    def lend(self, buf: np.ndarray, tracker: zmq.MessageTracker) -> None:
        self._in_flight.append((buf, tracker))

    def give_back(self, buf: np.ndarray) -> None:
        if sum(map(len, self._free.values())) < self.limit:
            self._free.setdefault((buf.shape, buf.dtype.str), []).append(buf)

    def _reclaim(self) -> None:
        still = []
        for buf, tracker in self._in_flight:
            if tracker.done:
                self.give_back(buf)
            else:
                still.append((buf, tracker))
        self._in_flight = still

    @property
    def in_flight(self) -> int:
        self._reclaim()
        return len(self._in_flight)


class FrameHook:
    """pymmcore-plus output handler: ``frameReady(img, event, meta)`` -> ZeroMQ PUSH.

    Parameters
    ----------
    endpoint:
        Where the engine server's PULL socket listens, e.g. ``tcp://127.0.0.1:5555``.
    stream:
        Stream id carried in every header (one per camera or acquisition).
    hwm:
        ZeroMQ send high-water mark in frames; past it frames are not handed over.
    on_finished:
        Called with the :class:`HookStats` at sequence end (default: logged).
    shm:
        Pixels through shared memory when the receiver is on this host: None (default) decides
        by the endpoint (loopback tcp or ipc), the machine and ``SCOPECAST_SHM``; False never.
    shm_slots:
        Slots of the shared-memory ring, each one frame: frames the receiver may still owe
        before the hook sends inline.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        stream: str = "scope",
        hwm: int = 32,
        context: zmq.Context | None = None,
        curve: Curve | None = None,
        on_finished: Callable[[HookStats], None] | None = None,
        shm: bool | None = None,
        shm_slots: int = 8,
    ) -> None:
        self.endpoint = check_endpoint(endpoint)
        self.stream = check_stream_id(stream)
        self.stats = HookStats()
        self._on_finished = on_finished
        self._seq = 0
        self._acquisition: str | None = None
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()  # frameReady runs on pymmcore-plus's relay thread
        self._pool = _BufferPool(limit=hwm + 8)
        self._peers = 0  # receivers connected now (handshakes minus disconnects)
        self._shm_slots = shm_slots
        self._ring: ShmRing | None = None
        self._offer_due = False  # offer the segment with the next inline frame
        self._shm_on = self._use_shm(endpoint) if shm is None else shm
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 2000)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only for a connected receiver
        if curve is not None:
            try:
                curve.client(self._sock)
            except BaseException:
                self._sock.close(0)
                raise
        # watch the connection from before connect, so wait_for_receiver cannot miss the
        # handshake, and a receiver that goes away (killed server) is noticed and reported
        self._monitor: zmq.Socket | None = self._sock.get_monitor_socket(_EVENTS)
        try:
            self._sock.connect(endpoint)
        except zmq.ZMQError as e:
            self._stop_monitor()
            self._sock.close(0)
            raise EndpointError(
                f"cannot connect to {endpoint!r}: {e.strerror}. Use tcp://HOST:PORT or ipc:///path"
            ) from e

    @staticmethod
    def _use_shm(endpoint: str) -> bool:
        if os.environ.get("SCOPECAST_SHM", "").strip().lower() in ("0", "off", "no", "false"):
            return False
        if endpoint.startswith("inproc://") or not is_loopback(endpoint):
            return False  # another host (or this process: ZeroMQ shares the buffer already)
        if why := shm_available():
            log.info("frames go inline: %s", why)
            return False
        return True

    # -- pymmcore-plus output-handler API ---------------------------------------------------

    def sequenceStarted(self, sequence: useq.MDASequence, *_: Any) -> None:
        with self._lock:
            self.stats = HookStats()
            self._acquisition = str(getattr(sequence, "uid", "")) or None
            sizes = getattr(sequence, "sizes", None) or {}
            self._sizes = {getattr(k, "value", k): int(v) for k, v in sizes.items() if int(v) > 0}

    def frameReady(
        self, img: np.ndarray, event: useq.MDAEvent, meta: Mapping | None = None
    ) -> None:
        self.send(img, event=event, meta=meta, mono_ns=time.monotonic_ns(), wall_time=time.time())

    def sequenceFinished(self, sequence: Any = None) -> None:
        with self._lock:
            self._flush(timeout_s=2.0)
            stats = self.stats
        if self._on_finished is not None:
            self._on_finished(stats)
        else:
            log.info("scopecast hook: %s", stats.summary())

    # -- sending ----------------------------------------------------------------------------

    def send(
        self,
        img: np.ndarray,
        *,
        event: useq.MDAEvent | None = None,
        meta: Mapping | None = None,
        mono_ns: int | None = None,
        wall_time: float | None = None,
    ) -> bool:
        """Hand one frame to ZeroMQ without blocking; return False (and count why) if not."""
        with self._lock:
            return self._send(img, event, meta, mono_ns or time.monotonic_ns(), wall_time)

    def _send(
        self,
        img: np.ndarray,
        event: Any,
        meta: Mapping | None,
        mono_ns: int,
        wall_time: float | None,
    ) -> bool:
        stats = self.stats
        self._drain_monitor()
        stats.frames_seen += 1
        stats.first_ns = stats.first_ns or mono_ns
        stats.last_ns = mono_ns
        seq, self._seq = self._seq, self._seq + 1  # a frame not handed over leaves a gap
        try:
            header = self._header(img, seq, event, meta or {}, mono_ns, wall_time or time.time())
        except ValidationError as e:
            return self._not_handed_over("invalid_frame", f"frame {seq} cannot be sent: {e}")
        if self._shm_on and (sent := self._send_shm(img, header, mono_ns)) is not None:
            return sent
        buf = self._pool.take(header.shape, DTYPES[header.dtype])
        if buf is None:
            return self._not_handed_over("buffers_in_flight")
        np.copyto(buf, img, casting="same_kind")
        offer = self._offer_due and self._ring is not None and self._peers > 0
        if offer:
            assert self._ring is not None
            token = self._ring.offer()
            header = header.model_copy(
                update={"shm_offer": ShmOffer(name=self._ring.name, token=token)}
            )
        try:
            tracker = self._sock.send_multipart(
                encode(header, buf), flags=zmq.NOBLOCK, copy=False, track=True
            )
        except zmq.ZMQError as e:
            self._pool.give_back(buf)
            return self._not_handed_over(self._zmq_reason(e))
        self._offer_due = self._offer_due and not offer
        self._pool.lend(buf, tracker)
        self._sent(buf.nbytes, mono_ns, "inline")
        return True

    def _send_shm(self, img: np.ndarray, header: FrameHeader, mono_ns: int) -> bool | None:
        """Send through a shared-memory slot; None: send inline (and maybe offer the ring)."""
        ring = self._ring
        if ring is None or header.nbytes > ring.slot_bytes:
            if ring is not None and ring.pending:
                self.stats.shm_fallbacks["frame_too_big"] += 1
                return None
            self._new_ring(header.nbytes)
            return None
        if not ring.accepted:
            return None  # not (yet) mapped by the receiver: inline, the offer goes with it
        slot = ring.take()
        if slot is None:
            self.stats.shm_fallbacks["ring_full"] += 1
            return None
        generation = ring.write(slot, img, header.shape, DTYPES[header.dtype])
        ref = ShmRef(name=ring.name, slot=slot, generation=generation)
        try:
            self._sock.send_multipart(
                [header.model_copy(update={"shm": ref}).model_dump_json(exclude_none=True).encode(),
                 b""],
                flags=zmq.NOBLOCK,
            )  # fmt: skip
        except zmq.ZMQError as e:
            ring.release(slot)
            return self._not_handed_over(self._zmq_reason(e))
        self._sent(header.nbytes, mono_ns, "shm")
        self.stats.frames_shm += 1
        return True

    def _new_ring(self, nbytes: int) -> None:
        """(Re)create the ring sized for frames of ``nbytes``; offer it on the next frame."""
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        try:
            self._ring = ShmRing(self._shm_slots, nbytes)
        except (OSError, ValueError) as e:
            log.warning("frames go inline: no shared-memory ring (%s)", e)
            self._shm_on = False
            return
        self._offer_due = True

    def _sent(self, nbytes: int, mono_ns: int, transport: str) -> None:
        stats = self.stats
        stats.frames_sent += 1
        stats.bytes_sent += nbytes
        stats.transport = transport
        stats.send_us.append((time.monotonic_ns() - mono_ns) / 1e3)

    @staticmethod
    def _zmq_reason(e: zmq.ZMQError) -> str:
        return "no_receiver_or_hwm" if isinstance(e, zmq.Again) else f"zmq:{e.strerror}"

    def _not_handed_over(self, reason: str, message: str | None = None) -> bool:
        if message and reason not in self.stats.not_handed_over:
            log.error(message)
        self.stats.not_handed_over[reason] += 1
        return False

    def _header(
        self, img: np.ndarray, seq: int, event: Any, meta: Mapping, mono_ns: int, wall: float
    ) -> FrameHeader:
        dtype = img.dtype.newbyteorder("=").name
        pos = meta.get("position") or {}
        if not pos and event is not None:
            pos = {"x": event.x_pos, "y": event.y_pos, "z": event.z_pos}
        channel = getattr(getattr(event, "channel", None), "config", None)
        exposure = meta.get("exposure_ms", getattr(event, "exposure", None))
        stage = StagePosition(**{k: pos.get(k) for k in "xyz"})
        return FrameHeader(
            stream=self.stream,
            seq=seq,
            index={getattr(k, "value", k): int(v) for k, v in getattr(event, "index", {}).items()},
            shape=img.shape,
            dtype=dtype,
            mono_ns=mono_ns,
            wall_time=wall,
            exposure_ms=exposure,
            pixel_size_um=meta.get("pixel_size_um") or None,
            stage=stage if stage != StagePosition() else None,
            channel=channel,
            acquisition=self._acquisition,
            sizes=self._sizes,
        )

    # -- lifecycle ----------------------------------------------------------------------------

    def wait_for_receiver(self, timeout_s: float = 5.0) -> None:
        """Block until a receiver has connected, or raise ReceiverUnreachable saying what to
        start."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:  # the monitor socket is shared with frameReady's thread
                if self._monitor is None:
                    return
                self._drain_monitor()
                if self._peers > 0:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._monitor.poll(int(min(left, 0.01) * 1000))  # short: frameReady waits
        raise ReceiverUnreachable(
            f"no receiver answered at {self.endpoint} within {timeout_s:g} s: start the engine "
            f"server first (`scopecast serve --listen {self.endpoint}`), or `scopecast receive "
            f"--listen {self.endpoint}` as a plain test end point"
        )

    def receiver_connected(self) -> bool:
        """Whether a receiver is connected now (after taking in the connection events so far;
        a receiver that left is counted in ``stats.receiver_disconnects``)."""
        with self._lock:
            self._drain_monitor()
            return self._peers > 0

    def flush(self, timeout_s: float = 10.0) -> int:
        """Wait up to ``timeout_s`` for libzmq to finish sending what it holds (frames queued
        behind a slow link); return how many frames it still holds (dropped at close)."""
        with self._lock:
            self._flush(timeout_s)
            return self._in_flight()

    @property
    def frames_in_flight(self) -> int:
        """Frames handed to ZeroMQ that libzmq has not finished sending yet, and frames sent
        through shared memory that the receiver has not copied out yet."""
        with self._lock:
            return self._in_flight()

    @property
    def transport(self) -> str:
        """``shm`` once the receiver mapped this hook's shared-memory ring, else ``inline``."""
        with self._lock:
            self._drain_monitor()
            ring = self._ring
            return "shm" if self._shm_on and ring is not None and ring.accepted else "inline"

    @property
    def shm_segment(self) -> str | None:
        """The name of this hook's shared-memory segment in /dev/shm, if it has one."""
        return self._ring.name if self._ring is not None else None

    def _in_flight(self) -> int:
        return self._pool.in_flight + (self._ring.pending if self._ring is not None else 0)

    def _drain_monitor(self) -> None:
        """Take in the connection events waiting on the monitor socket (holding ``_lock``)."""
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor, flags=zmq.NOBLOCK)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._peers += 1
                self._offer_due = self._shm_on  # a new receiver: offer the ring anew
            elif event == zmq.EVENT_DISCONNECTED and self._peers > 0:
                # a connection that never completed its handshake (e.g. refused keys) is no
                # receiver leaving; one that did may have taken frames with it
                self._peers -= 1
                self.stats.receiver_disconnects += 1
                if self._ring is not None:  # it owes nothing now; a new one must accept anew
                    self._ring.reset()
                log.warning("the receiver at %s disconnected", self.endpoint)

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(0)
            self._monitor = None

    def _flush(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._in_flight() and time.monotonic() < deadline:
            time.sleep(0.005)
            self._drain_monitor()  # a receiver that left owes no slots

    def close(self) -> None:
        """Flush (up to 2 s), close the socket and unlink the shared-memory segment."""
        with self._lock:
            self._flush(timeout_s=2.0)
            self._stop_monitor()
            self._sock.close()
            if self._ring is not None:
                self._ring.close()
                self._ring = None

    def __enter__(self) -> FrameHook:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
