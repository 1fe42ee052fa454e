"""A plain PULL receiver: decodes frames, checks sequence numbers, measures transport latency.

``scopecast receive`` runs it on its own, ``scopecast demo`` uses it as the far end while no
engine server is running, and tests use it to check what the hook sent.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from .endpoints import check_bind
from .protocol import FrameHeader, ProtocolError, decode
from .security import Curve
from .shm import ShmReader, ShmRefused
from .stats import Samples, percentiles

log = logging.getLogger(__name__)


#: How often an idle receiver unmaps segments their hooks unlinked (and sweeps dead hooks').
TIDY_EVERY_S = 2.0


@dataclass
class Transport:
    """How one stream's pixels arrive: through shared memory or inline in the message."""

    frames_shm: int = 0
    frames_inline: int = 0
    fallbacks: int = 0  # inline frames of a stream that had used shared memory (ring full)
    rejected: Counter[str] = field(default_factory=Counter)  # shm references refused, by kind
    offers_refused: int = 0  # shared-memory offers the receiver could not map
    last: str = "inline"

    def count(self, via_shm: bool) -> None:
        if via_shm:
            self.frames_shm += 1
        else:
            self.frames_inline += 1
            self.fallbacks += self.frames_shm > 0
        self.last = "shm" if via_shm else "inline"

    def summary(self) -> dict[str, Any]:
        return {
            "transport": self.last,
            "frames_shm": self.frames_shm,
            "frames_inline": self.frames_inline,
            "fallbacks": self.fallbacks,
            "rejected": dict(self.rejected),
            "offers_refused": self.offers_refused,
        }


@dataclass
class ReceiverStats:
    """Counters of one receiver run."""

    frames: int = 0
    bytes: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    gaps: int = 0  # frames missing between consecutive sequence numbers, summed over streams
    out_of_order: int = 0
    latency_ms: Samples = field(default_factory=Samples, repr=False)
    first_s: float | None = None
    last_s: float | None = None
    transport: dict[str, Transport] = field(default_factory=dict)  # by stream

    def summary(self) -> dict[str, Any]:
        first, last = self.first_s, self.last_s  # both set with the first frame
        span = (last - first) if self.frames > 1 and first is not None and last is not None else 0.0
        return {
            "frames_received": self.frames,
            "bytes_received": self.bytes,
            "frames_missing": self.gaps,
            "frames_out_of_order": self.out_of_order,
            "rejected": dict(self.rejected),
            "fps": (self.frames - 1) / span if span > 0 else None,
            "latency_ms": percentiles(self.latency_ms),
            "transport": {k: v.summary() for k, v in self.transport.items()},
        }


class FrameReceiver:
    """Bind a PULL socket and hand each valid frame to ``on_frame(header, pixels)``.

    A malformed message is counted under its ProtocolError kind, logged once per kind,
    and skipped; the receiver keeps going. Frames whose pixels wait in a local hook's shared
    memory (:mod:`stream.shm`) are copied out here; a bad or overwritten slot reference is
    rejected like a bad buffer (kinds ``shm`` and ``shm_overwritten``).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        insecure: bool = False,
        curve: Curve | None = None,
        rcvhwm: int = 64,
        context: zmq.Context | None = None,
    ) -> None:
        self.endpoint = check_bind(endpoint, insecure=insecure, authenticated=curve is not None)
        self.stats = ReceiverStats()
        self._next_seq: dict[tuple[str, str | None], int] = {}
        self._shm = ShmReader()
        self._tidied = time.monotonic()
        self._sock = (context or zmq.Context.instance()).socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.server(self._sock)
        try:
            self._sock.bind(endpoint)
        except zmq.ZMQError as e:
            self._sock.close(0)
            raise OSError(f"cannot listen on {endpoint}: {e.strerror}") from e

    def receive(self, timeout_ms: int) -> tuple[FrameHeader, np.ndarray] | None:
        """One frame, or None after ``timeout_ms`` without a valid one.

        The pixels are a read-only view on the received message: no copy."""
        if not self._sock.poll(timeout_ms):
            if time.monotonic() - self._tidied > TIDY_EVERY_S:
                self._tidied = time.monotonic()
                self._shm.tidy()
            return None
        frames = self._sock.recv_multipart(copy=False)
        try:
            header, pixels = decode(frames, shm=self._shm.read)
        except ProtocolError as e:
            if e.kind not in self.stats.rejected:
                log.warning("rejected message (%s): %s", e.kind, e)
            self.stats.rejected[e.kind] += 1
            if isinstance(e, ShmRefused) and e.stream is not None:
                self._transport(e.stream).rejected[e.kind] += 1
            return None
        now = time.monotonic_ns()  # after the copy out of shared memory, if any
        if header.shm_offer is not None:
            self._accept(header)
        self._transport(header.stream).count(header.shm is not None)
        if header.shm is not None or header.shm_offer is not None:
            # how the pixels travelled is no part of the frame: index and viewers never see it
            header = header.model_copy(update={"shm": None, "shm_offer": None})
        self._count(header, pixels, now)
        return header, pixels

    def _transport(self, stream: str) -> Transport:
        if (t := self.stats.transport.get(stream)) is None:
            t = self.stats.transport[stream] = Transport()
        return t

    def _accept(self, header: FrameHeader) -> None:
        """Map the segment a hook offers with an inline frame (the frame itself is fine)."""
        offer = header.shm_offer
        assert offer is not None
        try:
            self._shm.accept(offer)
        except ShmRefused as e:
            t = self._transport(header.stream)
            if not t.offers_refused:
                log.warning("stream %s stays inline: %s", header.stream, e)
            t.offers_refused += 1

    def run(
        self,
        on_frame: Callable[[FrameHeader, np.ndarray], Any] | None = None,
        *,
        count: int | None = None,
        idle_timeout_s: float = 5.0,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> ReceiverStats:
        """Receive until ``count`` frames, ``idle_timeout_s`` without frames, or ``should_stop``."""
        idle_since = time.monotonic()
        while not should_stop() and (count is None or self.stats.frames < count):
            got = self.receive(100)
            if got is None:
                if time.monotonic() - idle_since > idle_timeout_s:
                    break
                continue
            idle_since = time.monotonic()
            if on_frame is not None:
                on_frame(*got)
        return self.stats

    def _count(self, header: FrameHeader, pixels: np.ndarray, now_ns: int) -> None:
        s = self.stats
        s.frames += 1
        s.bytes += pixels.nbytes
        s.latency_ms.append((now_ns - header.mono_ns) / 1e6)
        s.first_s = s.first_s or now_ns / 1e9
        s.last_s = now_ns / 1e9
        key = (header.stream, header.acquisition)  # a new acquisition restarts at seq 0
        expected = self._next_seq.get(key)
        if expected is not None and header.seq != expected:
            if header.seq > expected:
                s.gaps += header.seq - expected
            else:
                s.out_of_order += 1
        self._next_seq[key] = header.seq + 1

    def close(self) -> None:
        self._sock.close(0)
        self._shm.close()

    def __enter__(self) -> FrameReceiver:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
