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
control    REP socket answering ``status``, ``stop`` and ``swap`` (``scopecast status``)
=========  ===========================================================================

``swap`` replaces the engine of a running server without losing a frame: a background thread
loads, verifies and warms up the new engine; the engine stage switches to it between two frames
and every key's temporal state restarts for it (:mod:`stream.swap`, :mod:`stream.ring`). Every
enhanced frame's index line names the engine that made it (``engine_id``), and each enhanced
OME-TIFF lists its engines with their plane ranges; the files keep the first engine's name.

No message can stop a stage: each stage handles one item at a time under a guard that counts
an unexpected exception by stage and kind (``stage_errors``), logs it once per kind, and goes
on. If a stage thread ends anyway, the supervisor (``run``) sees it within a fraction of a
second: ``status`` says ``healthy: false`` with the stage and its error, and the server
drains, closes every file and returns a summary that says so (``scopecast serve`` exits 3).

Modes: ``live`` enhances the newest frame of each key and records the ones it skipped;
``complete`` enhances every frame in order, holding a bounded backlog in memory and spilling
the rest to disk. Raw frames are written in both modes, whatever happens to enhancement.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar

import numpy as np
import zmq
from pydantic import BaseModel, ConfigDict, Field, model_validator
from zmq.utils.monitor import recv_monitor_message

from calibration.bidir import correct_phase
from calibration.errors import ScopecastError
from calibration.fidelity import (
    MAP_BIN,
    NOISE_PIXELS,
    CheckSchedule,
    MismatchMonitor,
    default_sigmas,
    fidelity,
    mismatch_band,
    noise_ratio,
)
from calibration.optics import psf_sigma_um
from calibration.profile import CalibrationProfile
from calibration.units import Electrons
from engines.engine import EngineChain, EngineError, to_dtype
from engines.package import PackageError
from engines.runtime import PlanRebuilder

from .adapt_after import AdaptAfter
from .endpoints import check_bind
from .protocol import MAX_INT64, FrameHeader, PublishedHeader, encode_published
from .receiver import FrameReceiver
from .ring import Rings, Window
from .security import Curve, curve_or_none
from .sinks import RunWriter, SinkError, fresh_run_dir, sink_type
from .stats import Samples, percentiles
from .status import (
    DiskErrors,
    EngineInfo,
    FramesWritten,
    Latency,
    Queues,
    RingStats,
    ServerStatus,
    StageErrors,
    StageFailure,
    StreamTransport,
    Viewers,
)
from .swap import MAX_SHAPES, EngineSwap, SwapRefused, chain_id, keeps_previous

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "tcp://127.0.0.1:5555"
DEFAULT_PUBLISH = "tcp://127.0.0.1:5556"
DEFAULT_CONTROL = "tcp://127.0.0.1:5557"
STAGES = ("transport", "queue", "preprocess", "inference", "postprocess", "fidelity", "publish",
          "total")  # fmt: skip
#: Threads the supervisor watches, and the places where an unexpected exception is counted.
THREADS = ("receive", "engine", "writer", "control")
GUARDED = (*THREADS, "publish", "spill")
#: A control ``stop`` waits at most this long for expected frames.
MAX_STOP_WAIT_S = 3600.0
#: Consecutive frames of a stream whose noise statistic must leave its band before the server
#: says the profile does not match the camera (and as many back in it before it stops saying so).
MISMATCH_RUN = 10

T = TypeVar("T")


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
    ring_mb: float = Field(
        1024.0, gt=0, description="temporal state (rings) kept in memory; idle keys evicted past it"
    )
    max_pause_s: float | None = Field(10.0, gt=0)
    profile: Path | None = Field(
        None, description="calibration profile: the rig's units for electrons engines, fidelity"
    )
    correct_bidir: bool = Field(False, description="undo the profile's line phase first")
    fidelity_every: int = Field(
        0,
        ge=0,
        description="with a profile: the full fidelity check (chi-square, scan, significance "
        "map) on every Nth enhanced frame of each stream key; the camera-noise check runs on "
        "every frame. 0: automatic, as often as 5 ms per frame or 10 ns per raw pixel allows",
    )
    adapt_after_s: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="adapt the serving denoiser to the first stream key's first this many "
        "seconds of frames in a niced child process, then swap to it if its gate passes",
    )
    adapt_steps: int = Field(800, ge=1, description="--adapt-after: training steps")
    rcvhwm: int = Field(64, ge=1)
    fsync: bool = False
    sink: str = Field("ome-tiff", description="how frames are stored: a stream.sinks.SINKS name")


class ControlRequest(BaseModel):
    """requests are JSON objects: {"cmd": "status"}, {"cmd": "stop", "expect": {"STREAM":
    FRAMES}, "timeout_s": SECONDS} or {"cmd": "swap", "engines": [ENGINE, ...], "backend":
    BACKEND, "threads": N} (backend and threads optional)"""

    model_config = ConfigDict(extra="forbid")

    cmd: Literal["status", "stop", "swap"]
    expect: dict[str, Annotated[int, Field(ge=0, le=MAX_INT64)]] = Field(
        default_factory=dict, max_length=1024, description="stop: frames to wait for, by stream"
    )
    timeout_s: Annotated[float, Field(ge=0, le=MAX_STOP_WAIT_S, allow_inf_nan=False)] = 10.0
    engines: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(
        default_factory=list,
        max_length=8,
        description="swap: engine names or package folders, chained in order",
    )
    backend: str | None = Field(
        None, min_length=1, max_length=64, description="swap: default the backend in force"
    )
    threads: int | None = Field(
        None, ge=1, le=1024, description="swap: inference threads; default those in force"
    )

    @model_validator(mode="after")
    def _swap_fields(self) -> ControlRequest:
        swap = self.engines or self.backend is not None or self.threads is not None
        if self.cmd == "swap" and not self.engines:
            raise ValueError("swap needs 'engines': the engine name(s) or package folder(s)")
        if self.cmd != "swap" and swap:
            raise ValueError(f"'engines', 'backend' and 'threads' go with swap, not {self.cmd}")
        return self


class ServerError(ScopecastError, RuntimeError):
    """The server cannot start as configured (engine, sockets, output folder)."""


@dataclass
class Job:
    """A received frame waiting for enhancement (receive -> scheduler -> engine); its pixels
    move to ``spill`` and back while the backlog is on disk."""

    header: FrameHeader
    frame: np.ndarray | None
    recv_ns: int
    spill: Path | None = None

    @property
    def pixels(self) -> np.ndarray:
        """The frame's pixels; only while they are in memory (not spilled to disk)."""
        if self.frame is None:
            raise RuntimeError(
                f"frame {self.header.key} seq {self.header.seq} is spilled to {self.spill}, "
                "not in memory"
            )
        return self.frame


@dataclass(frozen=True, slots=True)
class Producer:
    """The engine chain that made an enhanced frame (a hot swap changes it mid-run)."""

    name: str
    id: str  # name@version:sha of each engine (stream.swap.chain_id)
    scale: int


@dataclass(frozen=True, slots=True)
class ToWrite:
    """A frame for the writer stage: a raw one from receive, or an enhanced one from the
    engine (``header`` is then its raw frame's, ``fidelity`` its residual when checked,
    ``producer`` the chain that made it), or ``skip``: the raw frame ``header`` gets no
    enhancement (``reason``), so its enhanced plane is a fill."""

    kind: Literal["raw", "enhanced", "skip"]
    header: FrameHeader
    frame: np.ndarray | None
    timings_ms: dict[str, float]
    fidelity: dict[str, Any] | None = None
    producer: Producer | None = None
    reason: str = ""


class Scheduler:
    """Which received frames get enhanced, and in what order.

    ``live``: one pending job per key, the newest; a replaced job is a skipped enhancement.
    Every frame still enters its key's ring when it arrives, so temporal windows stay
    consecutive. ``complete``: one FIFO (so per-key order holds); past ``backlog_bytes`` in
    memory, new jobs spill to ``spill_dir`` as .npy files and are read back in turn.
    """

    def __init__(
        self,
        mode: str,
        rings: Rings,
        *,
        backlog_bytes: int,
        spill_dir: Path | None,
        on_error: Any = None,
        on_drop: Any = None,
    ) -> None:
        self.mode = mode
        self.rings = rings
        self.backlog_bytes = backlog_bytes
        self.spill_dir = spill_dir
        self.on_error = on_error or (lambda where, e: None)
        #: ``on_drop(job, reason)``: a job that will not be enhanced (called outside the lock).
        self.on_drop = on_drop or (lambda job, reason: None)
        self.skipped = 0
        self.spilled = 0
        self.not_enhanced = 0  # complete mode: no room in memory nor on disk; raw still written
        self._cv = threading.Condition()
        self._pending: OrderedDict[str, Job] = OrderedDict()
        self._fifo: deque[Job] = deque()
        self._in_memory = 0
        self._closed = False

    def submit(self, job: Job) -> None:
        dropped: tuple[Job, str] | None = None
        with self._cv:
            if self.mode == "live":
                self.rings.push(job.header, job.pixels, snapshot=False)
                key = job.header.state_key
                if key in self._pending:
                    self.skipped += 1
                    dropped = self._pending[key], "skipped (live mode: a newer frame came)"
                self._pending[key] = job  # a replaced job keeps its place: the key waited since
                self._cv.notify()
            else:
                nbytes = job.header.nbytes
                if self._in_memory + nbytes > self.backlog_bytes and self._fifo:
                    self._spill(job)
                if job.spill is None and (
                    self._in_memory + nbytes > 2 * self.backlog_bytes and self._fifo
                ):
                    self.not_enhanced += 1  # the disk refused the spill and memory is full
                    dropped = job, "not enhanced (no room for the backlog in memory or on disk)"
                else:
                    if job.spill is None:
                        self._in_memory += nbytes
                    self._fifo.append(job)
                    self._cv.notify()
        if dropped is not None:
            self.on_drop(*dropped)

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
                try:
                    return job, self.rings.snapshot(key)
                except KeyError:  # the key was evicted meanwhile: it starts again
                    return job, self.rings.push(job.header, job.pixels)
            if not self._fifo:
                return None
            job = self._fifo.popleft()
        if job.spill is not None:
            try:
                job.frame = np.load(job.spill, allow_pickle=False)
                job.spill.unlink()
            except Exception as e:  # noqa: BLE001 - removed or damaged behind our back: lost
                self.on_error("spill", e)
                with self._cv:
                    self.not_enhanced += 1
                self.on_drop(job, f"not enhanced (its spilled pixels could not be read: {e})")
                return None
        else:
            with self._cv:
                self._in_memory -= job.header.nbytes
        return job, self.rings.push(job.header, job.pixels)

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
        """Move the job's pixels to disk; on a disk error keep them in memory (counted)."""
        assert self.spill_dir is not None
        path = self.spill_dir / f"{self.spilled:012d}.npy"  # unique across acquisitions
        try:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            np.save(path, job.pixels, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any failure keeps the pixels in memory
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)  # no half-written spill left behind
            self.on_error("spill", e)
            return
        job.spill, job.frame = path, None
        self.spilled += 1


class ByteQueue(Generic[T]):
    """A FIFO bounded by the bytes it holds; ``put`` waits when full (backpressure).

    Each item counts ``ITEM_BYTES`` on top of its pixels (header, message, bookkeeping: about
    what a queued frame costs beyond its pixels), so a flood of tiny frames is bounded too."""

    ITEM_BYTES = 4096

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: deque[tuple[T | None, int]] = deque()
        self._bytes = 0
        self._cv = threading.Condition()

    def put(self, item: T | None, nbytes: int) -> None:
        """Queue ``item`` (None: the end), waiting while the queue is full."""
        nbytes += self.ITEM_BYTES if item is not None else 0
        with self._cv:
            self._cv.wait_for(lambda: self._bytes + nbytes <= self.max_bytes or not self._items)
            self._items.append((item, nbytes))
            self._bytes += nbytes
            self._cv.notify_all()

    def get(self) -> T | None:
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

    def __call__(self, kind: str, message: str, exc: BaseException | None = None) -> None:
        with self._lock:
            first = kind not in self.counts
            self.counts[kind] += 1
        if first:
            log.warning("%s: %s (counted; logged once per kind)", kind, message, exc_info=exc)


def _log_units(chain: EngineChain, profiled: bool) -> None:
    """Say once, at start, which units each engine takes and what it assumes without a profile."""
    for e in chain.engines:
        if e.units is not None and not profiled:
            log.warning(
                "engine %s works in electrons and no --profile was given: %s; pass the rig's "
                "calibration profile (`scopecast calibrate camera`) if its camera differs",
                e.name, e.assumption,
            )  # fmt: skip
        else:
            log.info("engine %s: %s", e.name, e.assumption)


class EngineServer:
    """The running server; ``run()`` serves until ``stop()`` (or a control ``stop``)."""

    def __init__(self, config: ServerConfig, *, rebuild: PlanRebuilder | None = None) -> None:
        """``rebuild`` makes a TensorRT plan the package lacks for this GPU (the ``serve``
        command passes ``engines.offline.build.rebuild_plan``; without it such an engine runs
        on the next backend, or ``--backend tensorrt`` fails naming the build command)."""
        self.config = c = config
        _raise_open_files_limit()
        self.curve: Curve | None = curve_or_none(c.keys)
        for ep in filter(None, (c.listen, c.publish, c.control)):
            check_bind(ep, insecure=c.insecure, authenticated=self.curve is not None)
        self.profile = CalibrationProfile.load(c.profile) if c.profile else None
        self._rebuild = rebuild
        try:
            sink_type(c.sink)
            self.chain = self.open_chain(c.engines, c.backend, c.threads)
        except (PackageError, ValueError) as e:
            raise ServerError(str(e)) from e
        _log_units(self.chain, self.profile is not None)
        self._producer = _producer(self.chain)
        self._file_engine = self.chain.name  # enhanced files keep it across hot swaps
        self.swapper = EngineSwap(self.open_chain, c.backend, c.threads)
        if c.adapt_after_s is not None:
            self._check_adaptable()
        self._samples: OrderedDict[tuple[tuple[int, ...], str], np.ndarray] = OrderedDict()
        self._samples_lock = threading.Lock()
        self._mismatch: dict[str, MismatchMonitor] = {}  # per stream: the engine thread's
        self.fidelity_mismatch: str | None = None
        self.frames_flagged = 0  # frames whose fidelity scan flagged a region (engine thread)
        self.frames_checked = 0  # frames given the full check (engine thread)
        self._schedule = CheckSchedule(c.fidelity_every)
        if c.correct_bidir and not (self.profile and self.profile.scan.bidirectional):
            raise ServerError(
                "--correct-bidir needs a --profile whose scan is bidirectional: measure the "
                "phase with `scopecast calibrate bidir`"
            )
        self.rings = Rings(
            self.chain.window,
            background=self.chain.background,
            max_pause_s=c.max_pause_s,
            keep_previous=keeps_previous(self.chain),
            budget_bytes=int(c.ring_mb * 2**20),
        )
        self.times = StageTimes()
        self.engine_errors = _Once()
        self.disk_errors = _Once()
        self.stage_errors = {stage: _Once() for stage in GUARDED}
        self.requests_rejected = 0
        self.failure: StageFailure | None = None
        self._deaths: dict[str, str] = {}
        self.received: Counter[str] = Counter()
        self.enhanced = 0
        self.published = 0
        self.written: Counter[str] = Counter()
        self.started = time.monotonic()
        self._writer_q: ByteQueue[ToWrite] = ByteQueue(int(c.writer_mb * 2**20))
        self._pub_lock = threading.Lock()
        self._backend_name = self.chain.engines[0].backend.name
        self._stop = threading.Event()
        self._stop_receiving = threading.Event()
        self._finished = threading.Event()
        self._expect: dict[str, int] = {}
        self._expect_timeout_s = 10.0
        self._summary: ServerStatus | None = None

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
            self.writer = RunWriter(self.run_dir, fsync=c.fsync, sink=c.sink)
        except BaseException:
            self._close_sockets()
            raise
        self.adapter = None if c.adapt_after_s is None else AdaptAfter(
            c.adapt_after_s, self.run_dir / "adapt", c.engines[0], steps=c.adapt_steps,
            profile=c.profile, swap=self.swap,
        )  # fmt: skip
        self.scheduler = Scheduler(
            c.mode, self.rings,
            backlog_bytes=int(c.backlog_mb * 2**20), spill_dir=self.run_dir / "spill",
            on_error=self._spill_error, on_drop=self._not_enhanced,
        )  # fmt: skip
        self._threads = {name: self._thread(name) for name in THREADS}

    def open_chain(
        self, engines: Sequence[str | Path], backend: str, threads: int | None
    ) -> EngineChain:
        """Load, verify and open an engine chain with this server's rig units and plan
        rebuilder: how the server opens its engine at start and at every hot swap."""
        units = Electrons.from_profile(self.profile) if self.profile else None
        return EngineChain.open(engines, backend, threads, rebuild=self._rebuild, units=units)

    def _thread(self, name: str) -> threading.Thread:
        loop = getattr(self, f"_{name}_loop")

        def stage() -> None:
            try:
                loop()
            except BaseException as e:
                self._deaths[name] = f"{type(e).__name__}: {e}"
                log.critical("stage %s died", name, exc_info=e)

        return threading.Thread(target=stage, name=f"scopecast-{name}", daemon=True)

    def _spill_error(self, where: str, e: BaseException) -> None:
        """A spill the disk refused is a disk error (counted, the frame stays in memory);
        anything else is a fault of the spill stage."""
        if isinstance(e, OSError):
            self.disk_errors(where, f"{type(e).__name__}: {e}")
        else:
            self._fault(where, e)

    def _fault(self, stage: str, e: BaseException, where: str = "") -> None:
        """Count an unexpected exception of one stage's item by kind; the stage goes on."""
        self.stage_errors[stage](type(e).__name__, f"{stage}: {where}{type(e).__name__}: {e}", e)

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

    def _receiver(self) -> FrameReceiver:
        """The PULL receiver; None only while __init__ fails before binding it."""
        if self.receiver is None:
            raise ServerError("the server has no receiver: its start failed")
        return self.receiver

    def _close_sockets(self) -> None:
        if self._pub_monitor is not None:
            if self._pub is not None:  # always: the monitor is _pub's
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

    def run(self) -> ServerStatus:
        """Serve until stopped, or until a stage dies (supervised); then drain, flush and close
        everything; return the summary (``healthy`` false after a death)."""
        # A stage woken by a frame should not wait the default 5 ms for another stage's GIL.
        sys.setswitchinterval(0.0005)
        for t in self._threads.values():
            t.start()
        try:
            while not self._stop.wait(0.2):
                if self._check_stages():
                    break
        finally:
            summary = self._shutdown()
        return summary

    def _check_stages(self) -> bool:
        """Record the first stage found dead (not while stopping); True if one is."""
        if self.failure is None:
            for name, t in self._threads.items():
                if name in self._deaths or (not t.is_alive() and not self._stop.is_set()):
                    error = self._deaths.get(name, "the thread ended without an error")
                    self.failure = StageFailure(stage=name, error=error)
                    log.critical(
                        "stage %s is dead (%s): flushing, closing every file and exiting",
                        name, error,
                    )  # fmt: skip
                    break
        return self.failure is not None

    def stop(self, expect: dict[str, int] | None = None, timeout_s: float = 10.0) -> None:
        """Ask ``run`` to finish: first wait (up to ``timeout_s``) until ``expect[stream]``
        frames of each stream arrived. Safe from signal handlers and other threads."""
        self._expect = dict(expect or {})
        self._expect_timeout_s = timeout_s
        self._stop.set()

    def _shutdown(self) -> ServerStatus:
        self._stop.set()
        deadline = time.monotonic() + self._expect_timeout_s
        while (
            time.monotonic() < deadline
            and self.failure is None
            and self._threads["receive"].is_alive()
            and any(self.received[s] < n for s, n in self._expect.items())
        ):
            time.sleep(0.01)
        self._stop_receiving.set()
        if "writer" in self._deaths or not self._threads["writer"].is_alive():
            # the writer died: a fresh one drains the queue, so receive (which may wait on a
            # full queue) can finish and every raw frame still reaches the disk (a writer whose
            # death is recorded may still be logging it: it ends first)
            self._join("writer")
            self._threads["writer"] = self._thread("writer")
            self._threads["writer"].start()
        self._join("receive")
        self.scheduler.close()
        self._join("engine")
        self._writer_q.put(None, 0)
        self._join("writer")
        try:
            self.swapper.close()
            if self.adapter is not None:
                self.adapter.close()
            self.chain.close()
            spill = self.run_dir / "spill"
            if spill.is_dir() and not any(spill.iterdir()):
                shutil.rmtree(spill)
        except Exception as e:  # noqa: BLE001 - best-effort cleanup: the summary still comes
            log.warning("closing: %s: %s", type(e).__name__, e)
        self._check_stages()
        self._summary = self.status()
        self._finished.set()
        self._join("control")
        self._close_sockets()
        return self._summary

    def _join(self, name: str) -> None:
        t = self._threads[name]
        if t.is_alive():
            t.join()

    # -- stages ---------------------------------------------------------------------------

    def _receive_loop(self) -> None:
        receiver = self._receiver()
        while not self._stop_receiving.is_set():
            try:
                got = receiver.receive(20)
                if got is not None:
                    self._received(*got)
            except Exception as e:  # noqa: BLE001 - a stage must survive every input
                self._fault("receive", e)

    def _received(self, header: FrameHeader, frame: np.ndarray) -> None:
        """A valid frame: count it, queue it for the disk, schedule it, publish it."""
        recv_ns = time.monotonic_ns()
        self.received[header.stream] += 1
        transport = (recv_ns - header.mono_ns) / 1e6
        self.times.add("transport", transport)
        # raw goes to the writer queue before its enhancement can (the index links them)
        self._writer_q.put(ToWrite("raw", header, frame, {"transport": transport}), header.nbytes)
        job = Job(header, frame, recv_ns)
        submitted = False
        try:
            self.chain.check(header.shape)
            self._sample(header, frame)
            if self.adapter is not None:
                self.adapter.offer(header, frame)
            self.scheduler.submit(job)
            submitted = True
        except EngineError as e:
            self.engine_errors(e.kind, f"{header.key}: {e}")
            self._not_enhanced(job, f"engine error ({e.kind})")
        except Exception as e:  # noqa: BLE001 - not enhanced, but still published and written
            self._fault("receive", e, f"scheduling {header.key} seq {header.seq}: ")
            if not submitted:
                self._not_enhanced(job, f"not enhanced ({type(e).__name__} while scheduling)")
        self._publish(header, frame, kind="raw", timings={"transport": transport})

    def _sample(self, header: FrameHeader, frame: np.ndarray) -> None:
        """Keep the latest frame of each recent shape and dtype: a hot swap warms the new
        engine up on them (frames are never written again, so no copy)."""
        key = (header.shape, header.dtype)
        with self._samples_lock:
            self._samples[key] = frame
            self._samples.move_to_end(key)
            if len(self._samples) > MAX_SHAPES:
                self._samples.popitem(last=False)

    def _check_adaptable(self) -> None:
        """``--adapt-after``: only a single denoiser (scale 1, no previous output) adapts."""
        c, first = self.config, self.chain.engines[0].manifest
        if len(c.engines) != 1 or first.scale != 1 or first.temporal.previous_output:
            raise ServerError(
                f"--adapt-after adapts a single denoiser (scale 1, no previous output), not "
                f"{'+'.join(c.engines)}: serve e.g. --engine confocal-denoise"
            )

    def swap(
        self, engines: Sequence[str], backend: str | None = None, threads: int | None = None
    ) -> dict[str, Any]:
        """Start a hot swap to ``engines`` (:mod:`stream.swap`); returns at once, the swap
        goes on in the background (``status().swap``). SwapRefused if one is under way."""
        if self._stop.is_set():
            raise SwapRefused("the server is stopping: no engine swap now")
        with self._samples_lock:
            samples = list(self._samples.values())
        info = self.swapper.request(
            engines, serving=self.chain, samples=samples, backend=backend, threads=threads
        )
        return {
            "swap": info.state,
            **info.model_dump(mode="json", exclude={"state"}, exclude_none=True),
        }

    def _switch_engine(self) -> None:
        """Between two frames (engine stage): serve a swapped-in chain that is ready, its
        temporal state restarted for every key (:meth:`stream.ring.Rings.restart`)."""
        new = self.swapper.take()
        if new is None:
            return
        old = self.chain
        try:
            self.rings.restart(new.window, background=new.background,
                               keep_previous=keeps_previous(new))  # fmt: skip
        except Exception as e:
            self.swapper.abandon(new, e)
            raise  # counted as a fault of the engine stage, which goes on with the old chain
        self.chain = new
        self._producer = _producer(new)
        self._backend_name = new.engines[0].backend.name
        self.swapper.switched(new, after=self.enhanced)
        # off the critical path: a GPU backend may take a while to free its buffers
        threading.Thread(target=_close_quietly, args=(old,), name="scopecast-close").start()

    def _engine_loop(self) -> None:
        while not self.scheduler.finished:
            try:
                self._switch_engine()
                got = self.scheduler.take(0.1)
            except Exception as e:  # noqa: BLE001 - a stage must survive every input
                self._fault("engine", e)
                continue
            if got is None:
                continue
            job, window = got
            h = job.header
            try:
                self._enhance(job, window)
            except EngineError as e:
                self.engine_errors(e.kind, f"{h.key} seq {h.seq}: {e}")
                self._not_enhanced(job, f"engine error ({e.kind})")
            except Exception as e:  # noqa: BLE001 - a backend failure must not stop the others
                self.engine_errors("backend", f"{h.key} seq {h.seq}: {type(e).__name__}: {e}", e)
                self._not_enhanced(job, f"engine error (backend: {type(e).__name__})")

    def _not_enhanced(self, job: Job, reason: str) -> None:
        """Tell the writer that ``job``'s raw frame gets no enhancement: its enhanced plane
        becomes a fill (queued after the raw frame, so the writer knows its plane; should its
        enhancement be queued already, the writer keeps that and ignores this)."""
        self._writer_q.put(ToWrite("skip", job.header, None, {}, reason=reason), 0)

    def _enhance(self, job: Job, window: Window) -> None:
        """Run the chain on one job; hand the result to the writer and the publisher."""
        start_ns = time.monotonic_ns()
        h = job.header
        frames = window.frames
        if self.config.correct_bidir:
            if self.profile is None:  # refused by __init__
                raise ServerError("--correct-bidir needs a --profile")
            phase = self.profile.scan.phase_px
            frames = [to_dtype(correct_phase(f, phase), f.dtype, "input") for f in frames]
        result = self.chain.enhance(frames, window.previous, window.background)
        for stage in result.stages:
            self.rings.set_previous(h.state_key, stage.stage, stage.output, window.generation)
        timings = {"queue": (start_ns - job.recv_ns) / 1e6, **result.timings_ms}
        checked, significance = None, None
        if self.profile is not None:
            t = time.perf_counter()
            checked, significance = self._fidelity(
                result.stages[-1].output, job.pixels, h.stream, h.state_key
            )
            timings["fidelity"] = (time.perf_counter() - t) * 1e3
        for k, v in timings.items():
            self.times.add(k, v)
        timings["transport"] = (job.recv_ns - h.mono_ns) / 1e6
        self.enhanced += 1
        out = result.frame
        made = ToWrite("enhanced", h, out, timings, checked, self._producer)
        self._writer_q.put(made, out.nbytes)
        self._publish(h, out, kind="enhanced", timings=timings, fidelity=checked)
        if significance is not None:
            self._publish(h, significance, kind="significance", fidelity=checked)

    def _writer_loop(self) -> None:
        while (item := self._writer_q.get()) is not None:
            kind, header = item.kind, item.header
            try:
                rec: dict[str, Any] | None = None
                if kind == "skip":
                    self.writer.not_enhanced(header, item.reason)
                elif item.frame is None:
                    raise ValueError(f"a {kind} frame without pixels")
                elif kind == "raw":
                    rec = self.writer.write_raw(header, item.frame, timings_ms=item.timings_ms)
                else:
                    made = item.producer or self._producer
                    rec = self.writer.write_enhanced(
                        header,
                        item.frame,
                        engine=made.name,
                        engine_id=made.id,
                        file_as=self._file_engine,
                        scale=made.scale,
                        timings_ms=item.timings_ms,
                        extra=None if item.fidelity is None else {"fidelity": item.fidelity},
                    )
            except SinkError as e:
                self.disk_errors("enhanced" if kind == "skip" else kind, str(e))
                continue
            except Exception as e:  # noqa: BLE001 - a stage must survive every input
                self._fault("writer", e, f"{kind} frame {header.key} seq {header.seq}: ")
                continue
            finally:  # an enhanced frame may wait for an earlier raw plane's, then go with it
                self.written["enhanced"] = self.writer.written["enhanced"]
            if kind == "raw":
                self.written["raw"] += 1
            if rec is not None:
                self.times.add("disk", rec["timings_ms"]["disk"])
        try:
            self.writer.close()
        except SinkError as e:
            for message in self.writer.close_errors or [str(e)]:  # one count per file
                self.disk_errors("close", message)
        except Exception as e:  # noqa: BLE001 - counted, the summary still comes
            self._fault("writer", e, "closing the files: ")
        self.written["enhanced"] = self.writer.written["enhanced"]

    def _fidelity(
        self, enhanced: np.ndarray, raw: np.ndarray, stream: str, key: str
    ) -> tuple[dict[str, Any], np.ndarray | None]:
        """The raw frame's noise against the profile's noise model (every frame, watched per
        stream for a mismatch) and, on the frames of state ``key`` the schedule picks
        (``--fidelity-every``), its chi-square against the profile's forward model of
        ``enhanced``, the regions its scan flags (PSF to 8x PSF, 2% nominal false alarms per
        honest frame) and the scan's coarse significance map (returned for PUB)."""
        p = self.profile
        if p is None:
            raise ServerError("a fidelity check needs a --profile")

        def fitting(name: str) -> np.ndarray | None:  # a map of another shape is left out
            v = p.array(name)
            return v if v is not None and v.shape == raw.shape else None

        offset_map = fitting("offset_map")
        if not self._schedule.due(key, raw.size):
            noise = noise_ratio(raw, raw, p.camera, offset_map=offset_map)
            self._watch_noise(stream, noise, raw.size)
            return {"noise": round(noise, 4), "checked": False}, None
        t = time.perf_counter()
        f = fidelity(
            enhanced,
            raw,
            p.camera,
            scale=self.chain.scale,
            scan=p.scan if self.config.correct_bidir else None,
            offset_map=offset_map,
            flat_field=fitting("flat_field"),
            # the output carries the camera's fixed pattern: an electrons engine converts back
            # with the profile's maps, an ADU engine (the zoo's are linear filters) passes it on
            pattern_in_output=True,
            noise=True,
            sigmas=default_sigmas((p.psf_sigma_um or psf_sigma_um(p.optics)) / p.pixel_size_um),
            map_bin=MAP_BIN,
        )
        self._schedule.record((time.perf_counter() - t) * 1e3, raw.size)
        self.frames_checked += 1
        if f.scan is not None and f.scan.flagged:
            self.frames_flagged += 1
        if f.noise is not None:
            self._watch_noise(stream, f.noise, raw.size)
        return f.as_dict(), None if f.scan is None else f.scan.map

    def _watch_noise(self, stream: str, value: float, pixels: int) -> None:
        """Feed one frame's noise ratio to its stream's monitor; warn once when it fires."""
        monitor = self._mismatch.get(stream)
        if monitor is None:
            monitor = MismatchMonitor(mismatch_band(min(pixels, NOISE_PIXELS)), run=MISMATCH_RUN)
            self._mismatch[stream] = monitor
        if monitor.update(value):
            log.warning(
                "stream %s: the profile does not match this camera, fidelity check unreliable "
                "(%s); recalibrate with `scopecast calibrate camera --profile DIR`",
                stream, monitor.mismatch,
            )  # fmt: skip
        bad = {k: m.mismatch for k, m in self._mismatch.items() if m.mismatch}
        self.fidelity_mismatch = (
            "the profile does not match this camera: fidelity check unreliable (stream "
            + "; stream ".join(f"{k}: {why}" for k, why in sorted(bad.items()))
            + "); run `scopecast calibrate camera --profile DIR`"
            if bad
            else None
        )

    def _publish(
        self,
        header: FrameHeader,
        frame: np.ndarray,
        *,
        kind: str,
        timings: dict[str, float] | None = None,
        fidelity: dict[str, Any] | None = None,
    ) -> None:
        """Send one frame on PUB from the calling stage (receive or engine). PUB never blocks:
        a subscriber that falls behind loses frames, the server does not wait, and libzmq does
        not tell (only a subscriber can count its gaps, from ``seq``)."""
        t0 = time.monotonic_ns()
        try:
            self._send_published(header, frame, kind, timings, fidelity)
        except Exception as e:  # noqa: BLE001 - publishing must never stop the caller's stage
            self._fault("publish", e, f"{kind} frame {header.key} seq {header.seq}: ")
        if kind == "enhanced":
            now = time.monotonic_ns()
            self.times.add("publish", (now - t0) / 1e6)
            self.times.add("total", (now - header.mono_ns) / 1e6)

    def _send_published(
        self,
        header: FrameHeader,
        frame: np.ndarray,
        kind: str,
        timings: dict[str, float] | None,
        fidelity: dict[str, Any] | None,
    ) -> None:
        if self._pub is not None:
            scale = self.chain.scale if kind == "enhanced" else 1
            size = header.pixel_size_um
            if size is not None:  # of the published pixels: finer, or a map's coarse cells
                size = size * MAP_BIN if kind == "significance" else size / scale
            fields = header.model_dump(exclude={"shape", "dtype", "pixel_size_um"})
            ph = PublishedHeader(
                **fields,
                shape=frame.shape,
                dtype=frame.dtype.name,
                pixel_size_um=size,
                kind=kind,
                engine=self.chain.name if kind == "enhanced" else None,
                backend=self._backend_name,
                scale=scale,
                timings_ms=timings or {},
                fidelity=fidelity,
            )
            with self._pub_lock:  # one socket, used by two stages, never at the same time
                # no copy: raw and enhanced arrays are never written again
                self._pub.send_multipart(encode_published(ph, frame), zmq.NOBLOCK, copy=False)
                self.published += 1

    def _control_loop(self) -> None:
        """Answer control requests; watch viewers connect and disappear on PUB. Every request
        gets exactly one reply (a REP socket that misses one answers nobody again)."""
        sock = self._control
        assert sock is not None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        monitor = self._pub_monitor
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        while not (self._finished.is_set() and not sock.poll(0)):
            owed = False
            try:
                ready = dict(poller.poll(50))
                if monitor is not None and monitor in ready:
                    event = recv_monitor_message(monitor)["event"]
                    self.viewers["connected" if event == zmq.EVENT_ACCEPTED else "gone"] += 1
                if sock in ready:
                    parts = sock.recv_multipart()
                    owed = True
                    answer = self._answer(parts)
                    if isinstance(answer, ServerStatus):
                        answer = answer.model_dump(mode="json")
                    reply = json.dumps(answer).encode()
                    sock.send(reply)
                    owed = False
            except Exception as e:  # noqa: BLE001 - the control loop answers every request
                self._fault("control", e)
                if owed:
                    sock.send(json.dumps({"error": f"internal error: {type(e).__name__}"}).encode())

    def _answer(self, parts: list[bytes]) -> ServerStatus | dict[str, Any] | None:
        try:
            if len(parts) != 1:
                raise ValueError(f"a request is one message part, not {len(parts)}")
            req = ControlRequest.model_validate_json(parts[0])
        except (ValueError, RecursionError) as e:  # pydantic's ValidationError is a ValueError
            self.requests_rejected += 1
            return {"error": f"{_first_line(e)}; {ControlRequest.__doc__}"}
        if req.cmd == "status":
            return self._summary or self.status()
        if req.cmd == "swap":
            try:
                return self.swap(req.engines, req.backend, req.threads)
            except SwapRefused as e:
                return {"error": str(e)}
        self.stop(req.expect, req.timeout_s)
        self._finished.wait()
        return self._summary

    # -- reporting ------------------------------------------------------------------------

    def status(self) -> ServerStatus:
        """Health, counters, latency percentiles per stage (ms), engine, backend, queue depths."""
        c = self.config
        rx = self._receiver().stats
        healthy = not self._check_stages()
        rings = self.rings.stats()
        chain = self.chain
        return ServerStatus(
            healthy=healthy,
            failure=self.failure,
            engine=EngineInfo.model_validate({**chain.describe(), "id": chain_id(chain)}),
            mode=c.mode,
            listen=c.listen,
            publish=c.publish,
            out_dir=str(self.run_dir),
            uptime_s=time.monotonic() - self.started,
            rss_mb=_rss_mb(),
            cpu_s=time.process_time(),
            frames_received=sum(self.received.values()),
            frames_received_by_stream=dict(self.received),
            frames_missing=rx.gaps,
            frames_rejected=dict(rx.rejected),
            frames_enhanced=self.enhanced,
            frames_skipped=self.scheduler.skipped,
            frames_spilled=self.scheduler.spilled,
            frames_not_enhanced=self.scheduler.not_enhanced,
            frames_written=FramesWritten(
                raw=self.written["raw"], enhanced=self.written["enhanced"]
            ),
            engine_errors=dict(self.engine_errors.counts),
            disk_errors=DiskErrors(**self.disk_errors.counts),
            stage_errors=StageErrors(
                **{k: dict(v.counts) for k, v in self.stage_errors.items() if v.counts}
            ),
            requests_rejected=self.requests_rejected,
            published=self.published,
            viewers=Viewers(connected=self.viewers["connected"], gone=self.viewers["gone"]),
            queues=Queues(engine=self.scheduler.depth, writer=len(self._writer_q)),
            rings=RingStats.model_validate(rings),
            latency_ms={k: Latency(**v) for k, v in self.times.summary().items()},
            files=[str(p) for p in self.writer.files],
            fidelity_mismatch=self.fidelity_mismatch,
            frames_flagged=self.frames_flagged,
            frames_checked=self.frames_checked,
            fidelity_every=self._schedule.every if self.profile is not None else None,
            swap=self.swapper.info,
            adapt=self.adapter.info if self.adapter is not None else None,
            transport={
                k: StreamTransport.model_validate(v.summary()) for k, v in rx.transport.items()
            },
        )


def _producer(chain: EngineChain) -> Producer:
    return Producer(chain.name, chain_id(chain), chain.scale)


def _close_quietly(chain: EngineChain) -> None:
    """Close a chain no stage uses any more; a failure is logged, never raised."""
    try:
        chain.close()
    except Exception as e:  # noqa: BLE001 - the new engine serves whatever happens here
        log.warning("closing engine %s after a swap: %s: %s", chain.name, type(e).__name__, e)


def _raise_open_files_limit() -> None:
    """Let this process keep one file open per position and kind of a large plate: raise the
    soft limit on open files to the hard one (the usual soft 1024 is too few)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = hard if hard != resource.RLIM_INFINITY else 65536
        if soft != resource.RLIM_INFINITY and soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError) as e:  # not POSIX, or not allowed: keep going
        log.info("open-files limit unchanged: %s", e)


def _first_line(e: BaseException) -> str:
    """A short, one-line reason (pydantic's messages run over several lines)."""
    text = str(e) or type(e).__name__
    return " ".join(text.split())[:300]


def _rss_mb() -> float | None:
    """Resident memory of this process (Linux /proc), for flat-memory checks."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
