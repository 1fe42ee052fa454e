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
from .stats import Samples, percentiles

log = logging.getLogger(__name__)


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
        }


class FrameReceiver:
    """Bind a PULL socket and hand each valid frame to ``on_frame(header, pixels)``.

    A malformed message is counted under its ProtocolError kind, logged once per kind,
    and skipped; the receiver keeps going.
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
            return None
        frames = self._sock.recv_multipart(copy=False)
        now = time.monotonic_ns()
        try:
            header, pixels = decode(frames)
        except ProtocolError as e:
            if e.kind not in self.stats.rejected:
                log.warning("rejected message (%s): %s", e.kind, e)
            self.stats.rejected[e.kind] += 1
            return None
        self._count(header, pixels, now)
        return header, pixels

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

    def __enter__(self) -> FrameReceiver:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
