"""The engine server: receive -> ring -> engine -> fan-out (disk and PUB), stages overlapping.

One thread per stage, joined by queues, so receiving and writing never wait for inference:


=========  ===========================================================================
receive    PULL, decode, count; every valid frame goes to the writer and the publisher
           at once, and to the scheduler for enhancement
engine     takes what the scheduler picks, runs the chain with the key's ring window,
           hands the result to the writer and the publisher
writer     raw and enhanced OME-TIFFs plus the JSONL index (:mod:`stream.sinks`)
publish    ZeroMQ PUB, topic ``{key}/raw`` or ``{key}/enhanced``, sent by the receive and
           engine stages themselves (no extra hop); a slow viewer drops frames, the server
           never waits for it
control    REP socket answering ``status`` and ``stop`` (``scopecast status``)
=========  ===========================================================================

Modes: ``live`` enhances the newest frame of each key and records the ones it skipped;
``complete`` enhances every frame in order, holding a bounded backlog in memory and spilling
the rest to disk. Raw frames are written in both modes, whatever happens to enhancement.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
from collections import Counter, OrderedDict, defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zmq
from pydantic import BaseModel, ConfigDict, Field
from zmq.utils.monitor import recv_monitor_message

from calibration.bidir import correct_phase
from calibration.fidelity import fidelity
from calibration.profile import CalibrationProfile
from engines.engine import EngineChain, EngineError
from engines.package import PackageError

from .endpoints import check_bind
from .protocol import FrameHeader, PublishedHeader, encode_published
from .receiver import FrameReceiver
from .ring import Rings, Window
from .security import Curve, curve_or_none
from .sinks import RunWriter, SinkError, fresh_run_dir
from .stats import Samples, percentiles

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "tcp://127.0.0.1:5555"
DEFAULT_PUBLISH = "tcp://127.0.0.1:5556"
DEFAULT_CONTROL = "tcp://127.0.0.1:5557"
STAGES = ("transport", "queue", "preprocess", "inference", "postprocess", "fidelity", "publish",
          "total")  # fmt: skip


class ServerConfig(BaseModel):
    """Everything ``scopecast serve`` is told; also what ``status`` reports back."""

    model_config = ConfigDict(extra="forbid")

    engines: list[str] = Field(default=["identity"], min_length=1)
    out_dir: Path = Field(description="folder for runs; each run writes a new run-DATE-TIME")
    listen: str = DEFAULT_LISTEN
    publish: str | None = DEFAULT_PUBLISH
    control: str = DEFAULT_CONTROL
    mode: Literal["live", "complete"] = "live"
    backend: str = "auto"
    threads: int | None = Field(None, ge=1)
    insecure: bool = False
    keys: Path | None = None
    backlog_mb: float = Field(512.0, gt=0, description="complete mode: backlog held in memory")
    writer_mb: float = Field(1024.0, gt=0, description="frames waiting for the disk")
    max_pause_s: float | None = Field(10.0, gt=0)
    profile: Path | None = Field(None, description="calibration profile: fidelity residuals")
    correct_bidir: bool = Field(False, description="undo the profile's line phase first")
    rcvhwm: int = Field(64, ge=1)
    fsync: bool = False


class ServerError(RuntimeError):
    """The server cannot start as configured (engine, sockets, output folder)."""


@dataclass
class Job:
    """A received frame waiting for enhancement."""

    header: FrameHeader
    frame: np.ndarray | None
    recv_ns: int
    spill: Path | None = None


class Scheduler:
    """Which received frames get enhanced, and in what order.

    ``live``: one pending job per key, the newest; a replaced job is a skipped enhancement.
    Every frame still enters its key's ring when it arrives, so temporal windows stay
    consecutive. ``complete``: one FIFO (so per-key order holds); past ``backlog_bytes`` in
    memory, new jobs spill to ``spill_dir`` as .npy files and are read back in turn.
    """

    def __init__(
        self, mode: str, rings: Rings, *, backlog_bytes: int, spill_dir: Path | None
    ) -> None:
        self.mode = mode
        self.rings = rings
        self.backlog_bytes = backlog_bytes
        self.spill_dir = spill_dir
        self.skipped = 0
        self.spilled = 0
        self._cv = threading.Condition()
        self._pending: OrderedDict[str, Job] = OrderedDict()
        self._fifo: deque[Job] = deque()
        self._in_memory = 0
        self._closed = False

    def submit(self, job: Job) -> None:
        with self._cv:
            if self.mode == "live":
                self.rings.push(job.header, job.frame, snapshot=False)
                key = job.header.key
                if key in self._pending:
                    self.skipped += 1
                self._pending[key] = job  # a replaced job keeps its place: the key waited since
            else:
                if self._in_memory + job.header.nbytes > self.backlog_bytes and self._fifo:
                    self._spill(job)
                else:
                    self._in_memory += job.header.nbytes
                self._fifo.append(job)
            self._cv.notify()

    def take(self, timeout_s: float) -> tuple[Job, Window] | None:
        """The next job and its ring window, or None on timeout / when closed and empty."""
        with self._cv:
            if not self._cv.wait_for(
                lambda: self._pending or self._fifo or self._closed, timeout_s
            ):
                return None
            if self.mode == "live":
                if not self._pending:
                    return None
                key, job = self._pending.popitem(last=False)
                return job, self.rings.snapshot(key)
            if not self._fifo:
                return None
            job = self._fifo.popleft()
        if job.spill is not None:
            job.frame = np.load(job.spill, allow_pickle=False)
            job.spill.unlink()
        else:
            with self._cv:
                self._in_memory -= job.header.nbytes
        return job, self.rings.push(job.header, job.frame)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    @property
    def depth(self) -> int:
        return len(self._pending) + len(self._fifo)

    @property
    def finished(self) -> bool:
        """Closed, and nothing left to enhance."""
        return self._closed and not self.depth

    def _spill(self, job: Job) -> None:
        assert self.spill_dir is not None
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        job.spill = self.spill_dir / f"{self.spilled:012d}.npy"  # unique across acquisitions
        np.save(job.spill, job.frame, allow_pickle=False)
        job.frame = None
        self.spilled += 1


class ByteQueue:
    """A FIFO bounded by the bytes it holds; ``put`` waits when full (backpressure)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: deque[tuple[Any, int]] = deque()
        self._bytes = 0
        self._cv = threading.Condition()

    def put(self, item: Any, nbytes: int) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._bytes + nbytes <= self.max_bytes or not self._items)
            self._items.append((item, nbytes))
            self._bytes += nbytes
            self._cv.notify_all()

    def get(self) -> Any:
        with self._cv:
            self._cv.wait_for(lambda: self._items)
            item, nbytes = self._items.popleft()
            self._bytes -= nbytes
            self._cv.notify_all()
            return item

    def __len__(self) -> int:
        return len(self._items)


class StageTimes:
    """Recent per-stage durations (ms) in fixed arrays, so memory stays flat over days."""

    def __init__(self) -> None:
        self._samples: dict[str, Samples] = defaultdict(Samples)
        self._lock = threading.Lock()

    def add(self, stage: str, ms: float) -> None:
        with self._lock:
            self._samples[stage].append(ms)

    def summary(self) -> dict[str, dict[str, float | None]]:
        with self._lock:
            samples = {k: v.values() for k, v in self._samples.items()}
        order = {s: i for i, s in enumerate(STAGES)}
        return {k: percentiles(samples[k]) for k in sorted(samples, key=lambda s: order.get(s, 99))}


class _Once:
    """Log each kind of problem once; count every occurrence."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, kind: str, message: str) -> None:
        with self._lock:
            first = kind not in self.counts
            self.counts[kind] += 1
        if first:
            log.warning("%s: %s (counted; logged once per kind)", kind, message)


class EngineServer:
    """The running server; ``run()`` serves until ``stop()`` (or a control ``stop``)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = c = config
        self.curve: Curve | None = curve_or_none(c.keys)
        for ep in filter(None, (c.listen, c.publish, c.control)):
            check_bind(ep, insecure=c.insecure, authenticated=self.curve is not None)
        try:
            self.chain = EngineChain.open(c.engines, c.backend, c.threads)
        except (PackageError, ValueError) as e:
            raise ServerError(str(e)) from e
        self.profile = CalibrationProfile.load(c.profile) if c.profile else None
        if c.correct_bidir and not (self.profile and self.profile.scan.bidirectional):
            raise ServerError(
                "--correct-bidir needs a --profile whose scan is bidirectional: measure the "
                "phase with `scopecast calibrate bidir`"
            )
        self.rings = Rings(
            self.chain.window, background=self.chain.background, max_pause_s=c.max_pause_s
        )
        self.times = StageTimes()
        self.engine_errors = _Once()
        self.disk_errors = _Once()
        self.received: Counter[str] = Counter()
        self.enhanced = 0
        self.published = 0
        self.publish_dropped = 0
        self.written: Counter[str] = Counter()
        self.started = time.monotonic()
        self._writer_q = ByteQueue(int(c.writer_mb * 2**20))
        self._pub_lock = threading.Lock()
        self._backend_name = self.chain.engines[0].backend.name
        self._stop = threading.Event()
        self._stop_receiving = threading.Event()
        self._finished = threading.Event()
        self._expect: dict[str, int] = {}
        self._expect_timeout_s = 10.0
        self._summary: dict[str, Any] | None = None

        self.ctx = zmq.Context()
        self._auth = None
        self._pub = self._control = self._pub_monitor = None
        self.viewers: Counter[str] = Counter()
        self.receiver: FrameReceiver | None = None
        try:  # sockets first: a port in use must not leave an empty run folder behind
            self._auth = self.curve.authenticator(self.ctx) if self.curve else None
            self.receiver = FrameReceiver(
                c.listen, insecure=c.insecure, curve=self.curve, rcvhwm=c.rcvhwm,
                context=self.ctx,
            )  # fmt: skip
            if c.publish:
                self._pub = self._bind(zmq.PUB, c.publish, {zmq.SNDHWM: 8})
                self._pub_monitor = self._pub.get_monitor_socket(
                    zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
                )
            self._control = self._bind(zmq.REP, c.control)
            self.run_dir = fresh_run_dir(c.out_dir)
            self.writer = RunWriter(self.run_dir, fsync=c.fsync)
        except BaseException:
            self._close_sockets()
            raise
        self.scheduler = Scheduler(
            c.mode, self.rings,
            backlog_bytes=int(c.backlog_mb * 2**20), spill_dir=self.run_dir / "spill",
        )  # fmt: skip
        self._threads = [
            threading.Thread(target=f, name=f"scopecast-{n}", daemon=True)
            for n, f in (
                ("receive", self._receive_loop),
                ("engine", self._engine_loop),
                ("writer", self._writer_loop),
                ("control", self._control_loop),
            )
        ]

    def _bind(self, kind: int, endpoint: str, options: dict[int, int] | None = None) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        for opt, value in (options or {}).items():
            sock.setsockopt(opt, value)
        if self.curve is not None:
            self.curve.server(sock)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as e:
            sock.close(0)
            raise ServerError(f"cannot bind {endpoint}: {e.strerror}; choose another port") from e
        return sock

    def _close_sockets(self) -> None:
        if self._pub_monitor is not None:
            self._pub.disable_monitor()
            self._pub_monitor.close(0)
        for sock in (self._pub, self._control):
            if sock is not None and not sock.closed:
                sock.close(0)
        if self.receiver is not None:
            self.receiver.close()
        if self._auth is not None:
            self._auth.stop()
        self.ctx.term()

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Serve until stopped; then drain, flush and close everything; return the summary."""
        # A stage woken by a frame should not wait the default 5 ms for another stage's GIL.
        sys.setswitchinterval(0.0005)
        for t in self._threads:
            t.start()
        try:
            self._stop.wait()
        finally:
            summary = self._shutdown()
        return summary

    def stop(self, expect: dict[str, int] | None = None, timeout_s: float = 10.0) -> None:
        """Ask ``run`` to finish: first wait (up to ``timeout_s``) until ``expect[stream]``
        frames of each stream arrived. Safe from signal handlers and other threads."""
        self._expect = dict(expect or {})
        self._expect_timeout_s = timeout_s
        self._stop.set()

    def _shutdown(self) -> dict[str, Any]:
        deadline = time.monotonic() + self._expect_timeout_s
        while time.monotonic() < deadline and any(
            self.received[s] < n for s, n in self._expect.items()
        ):
            time.sleep(0.01)
        self._stop_receiving.set()
        self._join("receive")
        self.scheduler.close()
        self._join("engine")
        self._writer_q.put(None, 0)
        self._join("writer")
        self.chain.close()
        spill = self.run_dir / "spill"
        if spill.is_dir() and not any(spill.iterdir()):
            shutil.rmtree(spill)
        self._summary = self.status()
        self._finished.set()
        self._join("control")
        self._close_sockets()
        return self._summary

    def _join(self, name: str) -> None:
        for t in self._threads:
            if t.name == f"scopecast-{name}" and t.is_alive():
                t.join()

    # -- stages ---------------------------------------------------------------------------

    def _receive_loop(self) -> None:
        while not self._stop_receiving.is_set():
            got = self.receiver.receive(20)
            if got is None:
                continue
            header, frame = got
            recv_ns = time.monotonic_ns()
            self.received[header.stream] += 1
            transport = (recv_ns - header.mono_ns) / 1e6
            self.times.add("transport", transport)
            # raw goes to the writer queue before its enhancement can (the index links them)
            self._writer_q.put(
                ("raw", header, frame, {"transport": transport}, None), header.nbytes
            )
            try:
                self.chain.check(header.shape)
                self.scheduler.submit(Job(header, frame, recv_ns))
            except EngineError as e:
                self.engine_errors(e.kind, f"{header.key}: {e}")
            self._publish(header, frame, kind="raw", timings={"transport": transport})

    def _engine_loop(self) -> None:
        while True:
            got = self.scheduler.take(0.1)
            if got is None:
                if self.scheduler.finished:
                    return
                continue
            job, window = got
            h = job.header
            try:
                self._enhance(job, window)
            except EngineError as e:
                self.engine_errors(e.kind, f"{h.key} seq {h.seq}: {e}")
            except Exception as e:  # a backend failure must not stop the other streams
                self.engine_errors("backend", f"{h.key} seq {h.seq}: {type(e).__name__}: {e}")

    def _enhance(self, job: Job, window: Window) -> None:
        """Run the chain on one job; hand the result to the writer and the publisher."""
        start_ns = time.monotonic_ns()
        h = job.header
        frames = window.frames
        if self.config.correct_bidir:
            phase = self.profile.scan.phase_px
            frames = [_as_dtype(correct_phase(f, phase), f.dtype) for f in frames]
        result = self.chain.enhance(frames, window.previous, window.background)
        for stage in result.stages:
            self.rings.set_previous(h.key, stage.stage, stage.output, window.generation)
        timings = {"queue": (start_ns - job.recv_ns) / 1e6, **result.timings_ms}
        extra = {}
        if self.profile is not None:
            t = time.perf_counter()
            extra["fidelity"] = self._fidelity(result.stages[-1].output, job.frame)
            timings["fidelity"] = (time.perf_counter() - t) * 1e3
        for k, v in timings.items():
            self.times.add(k, v)
        timings["transport"] = (job.recv_ns - h.mono_ns) / 1e6
        self.enhanced += 1
        out = result.frame
        self._writer_q.put(("enhanced", h, out, timings, extra), out.nbytes)
        self._publish(h, out, kind="enhanced", timings=timings, **extra)

    def _writer_loop(self) -> None:
        while (item := self._writer_q.get()) is not None:
            kind, header, frame, timings, extra = item
            try:
                if kind == "raw":
                    rec = self.writer.write_raw(header, frame, timings_ms=timings)
                else:
                    rec = self.writer.write_enhanced(
                        header,
                        frame,
                        engine=self.chain.name,
                        scale=self.chain.scale,
                        timings_ms=timings,
                        extra=extra,
                    )
            except SinkError as e:
                self.disk_errors(kind, str(e))
                continue
            self.written[kind] += 1
            self.times.add("disk", rec["timings_ms"]["disk"])
        try:
            self.writer.close()
        except SinkError as e:
            self.disk_errors("close", str(e))

    def _fidelity(self, enhanced: np.ndarray, raw: np.ndarray) -> dict[str, float]:
        """The raw frame's chi-square against the profile's forward model of ``enhanced``."""
        p = self.profile
        maps = {k: p.array(k) for k in ("offset_map", "flat_field")}
        maps = {k: v for k, v in maps.items() if v is not None and v.shape == raw.shape}
        scan = p.scan if self.config.correct_bidir else None
        f = fidelity(enhanced, raw, p.camera, scale=self.chain.scale, scan=scan, **maps)
        return f.as_dict()

    def _publish(
        self,
        header: FrameHeader,
        frame: np.ndarray,
        *,
        kind: str,
        timings: dict[str, float] | None = None,
        fidelity: dict[str, float] | None = None,
    ) -> None:
        """Send one frame on PUB from the calling stage (receive or engine). PUB never blocks:
        a subscriber that falls behind loses frames, the server does not wait."""
        t0 = time.monotonic_ns()
        if self._pub is not None:
            scale = self.chain.scale if kind == "enhanced" else 1
            fields = header.model_dump(exclude={"shape", "dtype", "pixel_size_um"})
            ph = PublishedHeader(
                **fields,
                shape=frame.shape,
                dtype=frame.dtype.name,
                pixel_size_um=header.pixel_size_um / scale if header.pixel_size_um else None,
                kind=kind,
                engine=self.chain.name if kind == "enhanced" else None,
                backend=self._backend_name,
                scale=scale,
                timings_ms=timings or {},
                fidelity=fidelity,
            )
            with self._pub_lock:  # one socket, used by two stages, never at the same time
                try:
                    # no copy: raw and enhanced arrays are never written again
                    self._pub.send_multipart(encode_published(ph, frame), zmq.NOBLOCK, copy=False)
                    self.published += 1
                except zmq.Again:
                    self.publish_dropped += 1
        if kind == "enhanced":
            now = time.monotonic_ns()
            self.times.add("publish", (now - t0) / 1e6)
            self.times.add("total", (now - header.mono_ns) / 1e6)

    def _control_loop(self) -> None:
        """Answer control requests; watch viewers connect and disappear on PUB."""
        sock = self._control
        assert sock is not None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if self._pub_monitor is not None:
            poller.register(self._pub_monitor, zmq.POLLIN)
        while not (self._finished.is_set() and not sock.poll(0)):
            ready = dict(poller.poll(50))
            if self._pub_monitor in ready:
                event = recv_monitor_message(self._pub_monitor)["event"]
                self.viewers["connected" if event == zmq.EVENT_ACCEPTED else "gone"] += 1
            if sock in ready:
                sock.send(json.dumps(self._answer(sock.recv())).encode())

    def _answer(self, request: bytes) -> dict[str, Any] | None:
        try:
            req = json.loads(request)
            if req.get("cmd") == "status":
                return self._summary or self.status()
            if req.get("cmd") == "stop":
                expect = {str(k): int(v) for k, v in (req.get("expect") or {}).items()}
                self.stop(expect, float(req.get("timeout_s", 10.0)))
                self._finished.wait()
                return self._summary
        except (ValueError, TypeError, AttributeError):
            pass
        return {
            "error": 'requests are JSON objects: {"cmd": "status"} or {"cmd": "stop", '
            '"expect": {"STREAM": FRAMES}, "timeout_s": SECONDS}'
        }

    # -- reporting ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Counters, latency percentiles per stage (ms), engine, backend and queue depths."""
        c = self.config
        rx = self.receiver.stats
        return {
            "engine": self.chain.describe(),
            "mode": c.mode,
            "listen": c.listen,
            "publish": c.publish,
            "out_dir": str(self.run_dir),
            "uptime_s": time.monotonic() - self.started,
            "rss_mb": _rss_mb(),
            "cpu_s": time.process_time(),
            "frames_received": sum(self.received.values()),
            "frames_received_by_stream": dict(self.received),
            "frames_missing": rx.gaps,
            "frames_rejected": dict(rx.rejected),
            "frames_enhanced": self.enhanced,
            "frames_skipped": self.scheduler.skipped,
            "frames_spilled": self.scheduler.spilled,
            "frames_written": {"raw": self.written["raw"], "enhanced": self.written["enhanced"]},
            "engine_errors": dict(self.engine_errors.counts),
            "disk_errors": dict(self.disk_errors.counts),
            "published": self.published,
            "viewers": {"connected": self.viewers["connected"], "gone": self.viewers["gone"]},
            "publish_dropped": self.publish_dropped,
            "queues": {
                "engine": self.scheduler.depth,
                "writer": len(self._writer_q),
            },
            "rings": self.rings.stats(),
            "latency_ms": self.times.summary(),
            "files": [str(p) for p in self.writer.files],
        }


def _as_dtype(image: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``image`` in ``dtype``, rounded and clipped for integer types."""
    if dtype.kind == "f":
        return image.astype(dtype, copy=False)
    info = np.iinfo(dtype)
    return np.clip(np.rint(image), info.min, info.max).astype(dtype)


def _rss_mb() -> float | None:
    """Resident memory of this process (Linux /proc), for flat-memory checks."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
