"""The run directory: raw and enhanced files per (stream, position[, grid tile]), OME-TIFF
unless another sink of :data:`stream.sinks.base.SINKS` is named, plus one JSONL index."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from stream.protocol import FrameHeader
from stream.sinks.base import DEFAULT_SINK, Sink, sink_type
from stream.sinks.index import IndexWriter
from stream.sinks.tiff import PlaneRecord, SinkError

log = logging.getLogger(__name__)

INDEX_NAME = "index.jsonl"
#: One engine name ([a-z0-9._-]) or a chain of them joined by "+" (EngineChain.name).
ENGINE_NAME = re.compile(r"^[a-z0-9._-]{1,64}(\+[a-z0-9._-]{1,64}){0,7}$")
#: How many recent raw planes an enhanced frame can be linked back to.
RAW_LOOKUP = 4096
#: Files kept open at once (a 96-well plate with 9 fields, raw and enhanced, needs 1,728);
#: past it the least recently written file is closed, and its key continues in a new part.
MAX_OPEN_FILES = 2048


def fresh_run_dir(base: Path) -> Path:
    """Create and return a new, empty ``base/run-YYYYmmdd-HHMMSS[-n]``."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("run-%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        path = base / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise SinkError(f"no free run directory name {stamp}-N under {base}: clean it up", path=base)


#: One file per (stream, position p, grid tile g or None, kind).
FileKey = tuple[str, int, int | None, str]


class RunWriter:
    """Raw and enhanced files per (stream, position, grid tile) plus the run's JSONL index.

    Files are named ``{stream}_p{p:03d}[_g{g:03d}]_{kind}{suffix}`` (``_g`` only when frames
    carry a grid index; ``suffix`` the sink's, ``.ome.tif`` for the default ``sink``).
    Thread-safe. A disk error raises SinkError after counting ``errors['disk']``; the caller
    keeps going and later writes retry.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        fsync: bool = False,
        max_open: int = MAX_OPEN_FILES,
        sink: str = DEFAULT_SINK,
    ) -> None:
        if max_open < 1:
            raise ValueError(f"max_open={max_open} must be >= 1")
        self.sink = sink_type(sink)
        self.max_open = max_open
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        index = self.out_dir / INDEX_NAME
        if index.exists():
            raise SinkError(
                f"{self.out_dir} already holds a recorded run ({INDEX_NAME}); "
                "recorded data are never overwritten: pass fresh_run_dir(base)",
                path=index,
            )
        self.fsync = fsync
        self.index = IndexWriter(index, fsync=fsync)
        self.files: list[Path] = [index]
        self.errors: Counter[str] = Counter()
        #: Why each file that failed to close failed (its OME-XML, or the index), in order.
        self.close_errors: list[str] = []
        self._sinks: OrderedDict[FileKey, Sink] = OrderedDict()  # least recent first
        self._parts: Counter[FileKey] = Counter()
        self._raw: OrderedDict[tuple[str, str | None, int], dict[str, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self.closed = False

    def write_raw(
        self,
        header: FrameHeader,
        frame: np.ndarray,
        *,
        timings_ms: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """Store a raw frame, then its index line; return the index record."""
        with self._lock:
            t0 = time.perf_counter()
            plane = self._write("raw", header, frame, header.pixel_size_um)
            key = (header.stream, header.acquisition, header.seq)
            self._raw[key] = {"file": plane.file, "plane": plane.plane}
            self._raw.move_to_end(key)
            while len(self._raw) > RAW_LOOKUP:
                self._raw.popitem(last=False)
            record = self._record("raw", header, frame, plane, timings_ms, t0)
            record["pixel_size_um"] = header.pixel_size_um
            return self._append(record)

    def write_enhanced(
        self,
        header: FrameHeader,
        frame: np.ndarray,
        *,
        engine: str,
        scale: int,
        timings_ms: dict[str, float] | None = None,
        extra: dict[str, Any] | None = None,
        engine_id: str | None = None,
        file_as: str | None = None,
    ) -> dict[str, Any]:
        """Store an enhanced frame (``header`` is its raw frame's), then its index line;
        ``extra`` (e.g. the fidelity residual) goes into the line as is.

        ``engine`` made the frame; ``engine_id`` (its ``name@version:sha``) goes into the index
        line and, through the sink's ``produced_by``, into the file's metadata. The file is
        named after ``file_as`` (default ``engine``): a server that swapped engines keeps
        writing the files named after its first one."""
        for name in (engine, file_as or engine):
            if not ENGINE_NAME.match(name) or name == "raw":
                raise ValueError(
                    f"engine name {name!r} must be 1-64 of [a-z0-9._-] (chains joined "
                    "by '+') and not 'raw'"
                )
        if not (isinstance(scale, int) and scale >= 1):
            raise ValueError(f"scale={scale!r} must be an integer >= 1 (1 = same pixel size)")
        with self._lock:
            t0 = time.perf_counter()
            size = None if header.pixel_size_um is None else header.pixel_size_um / scale
            plane = self._write(file_as or engine, header, frame, size, engine_id or engine)
            raw = self._raw.get((header.stream, header.acquisition, header.seq))
            if raw is None:
                self.errors["raw_missing"] += 1
            record = self._record("enhanced", header, frame, plane, timings_ms, t0)
            record.update(extra or {})
            record.update(engine=engine, scale=scale, pixel_size_um=size, raw=raw)
            if engine_id is not None:
                record["engine_id"] = engine_id
            return self._append(record)

    def close(self) -> list[Path]:
        """Close every sink (writing its OME-XML) and the index; return the files written.

        Everything is closed even if some closes fail; then one SinkError lists every
        failure, including files closed earlier in the run (a shape change), so the caller
        can count them: ``close_errors`` holds one message per failure and
        ``errors['close']`` their number. The planes of such files stay intact for
        ``recover``. A second call returns the files and raises nothing.
        """
        with self._lock:
            if self.closed:
                return list(self.files)
            self.closed = True
            for sink in self._sinks.values():
                self._close_sink(sink)
            try:
                self.index.close()
            except OSError as e:
                self._close_failed(f"{self.index.path}: closing the index failed ({e})")
            if self.close_errors:
                n = len(self.close_errors)
                raise SinkError(
                    f"run {self.out_dir}: {n} file{'s' if n > 1 else ''} did not close "
                    f"cleanly: {'; '.join(self.close_errors)}",
                    path=self.out_dir,
                )
            return list(self.files)

    # -- internals --------------------------------------------------------------------------

    def _write(
        self,
        kind: str,
        header: FrameHeader,
        frame: np.ndarray,
        pixel_size_um: float | None,
        producer: str | None = None,
    ) -> PlaneRecord:
        if self.closed:
            raise SinkError(
                f"run {self.out_dir} is closed: start a new RunWriter", path=self.out_dir
            )
        try:
            sink = self._sink(kind, header, frame, pixel_size_um)
            if producer is not None and (produced_by := getattr(sink, "produced_by", None)):
                produced_by(producer)
            plane = sink.write(frame, header)
        except SinkError:
            self.errors["disk"] += 1
            raise
        if plane.plane == 0:
            self.files.append(sink.path)
        return plane

    def _sink(
        self, kind: str, header: FrameHeader, frame: np.ndarray, pixel_size_um: float | None
    ) -> Sink:
        p, g = header.index.get("p", 0), header.index.get("g")
        key = (header.stream, p, g, kind)
        sink = self._sinks.get(key)
        if sink is not None:
            self._sinks.move_to_end(key)
        if sink is not None and (
            sink.closed
            or sink.broken
            or not sink.accepts(frame)
            or (sink.planes and sink.pixel_size_um != pixel_size_um)
        ):
            self._close_sink(sink)
            sink = None
        if sink is None:
            self._parts[key] += 1
            part = self._parts[key]
            more = "" if part == 1 else f"_{part}"
            tile = "" if g is None else f"_g{g:03d}"
            name = f"{header.stream}_p{p:03d}{tile}_{kind}{more}{self.sink.suffix}"
            path = self.out_dir / name
            where = f"position {p}" + ("" if g is None else f", grid tile {g}")
            sink = self.sink.open(
                path,
                pixel_size_um=pixel_size_um,
                fsync=self.fsync,
                description=f"scopecast {kind} frames of stream {header.stream!r}, {where}",
            )
            while len(self._sinks) >= self.max_open:  # bounded file descriptors
                self._close_sink(self._sinks.popitem(last=False)[1])
            self._sinks[key] = sink
        return sink

    def _close_sink(self, sink: Sink) -> None:
        """Close ``sink``; a failure is recorded for close() to report, never raised here."""
        try:
            sink.close()
        except Exception as e:  # noqa: BLE001 - one bad file must not keep the others from closing
            self._close_failed(str(e) if isinstance(e, SinkError) else f"{sink.path}: {e!r}")

    def _close_failed(self, message: str) -> None:
        self.errors["close"] += 1
        self.close_errors.append(message)
        log.warning("%s", message)

    def _record(
        self,
        kind: str,
        header: FrameHeader,
        frame: np.ndarray,
        plane: PlaneRecord,
        timings_ms: dict[str, float] | None,
        t0: float,
    ) -> dict[str, Any]:
        timings = dict(timings_ms or {})
        timings["disk"] = (time.perf_counter() - t0) * 1e3
        return {
            "kind": kind,
            "file": plane.file,
            "plane": plane.plane,
            "offset": plane.offset,
            "nbytes": plane.nbytes,
            "shape": list(frame.shape),
            "dtype": np.dtype(frame.dtype).name,
            "crc32": plane.crc32,
            "header": header.model_dump(mode="json", exclude_none=True),
            "timings_ms": timings,
        }

    def _append(self, record: dict[str, Any]) -> dict[str, Any]:
        record["written_ns"] = time.monotonic_ns()
        try:
            self.index.append(record)
        except SinkError as e:
            self.errors["disk"] += 1
            raise SinkError(
                f"{record['file']} plane {record['plane']} is on disk but not in the index: {e}",
                path=self.index.path,
                code=e.errno,
            ) from e
        return record
