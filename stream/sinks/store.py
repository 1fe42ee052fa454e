"""The run directory: raw and enhanced files per (stream, acquisition, position[, grid tile]),
OME-TIFF unless another sink of :data:`stream.sinks.base.SINKS` is named, plus one JSONL index.

Raw and enhanced line up: plane i of an enhanced file is the enhancement of plane i of its raw
file, or a *fill* plane (every pixel :func:`~stream.sinks.tiff.fill_value`: 0, or NaN for float
pixels) where that raw frame got no enhancement (live mode skipped it, the engine failed on it,
the backlog had no room). The ordering rule: raw planes are written as they arrive, and each
opens a slot in its file pair; the slot is settled by its enhanced frame
(:meth:`RunWriter.write_enhanced`) or by the notice that none will come
(:meth:`RunWriter.not_enhanced`). Enhanced planes are written strictly in raw plane order: a
frame whose slot is settled while an earlier slot is still open waits in memory (at most
:data:`HOLD_BYTES` across the run; past it the earliest open slot becomes a fill, and its
enhancement, should it come after all, is refused and counted). Every plane's pixels reach the
OS before its index line, so after a SIGKILL every indexed plane is readable and planes 0..k of
an enhanced file are the enhancements (or fills) of raw planes 0..k.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stream.protocol import FrameHeader
from stream.sinks.base import DEFAULT_SINK, Sink, sink_type
from stream.sinks.index import IndexWriter
from stream.sinks.tiff import PlaneRecord, SinkError, fill_plane, fill_text

log = logging.getLogger(__name__)

INDEX_NAME = "index.jsonl"
#: One engine name ([a-z0-9._-]) or a chain of them joined by "+" (EngineChain.name).
ENGINE_NAME = re.compile(r"^[a-z0-9._-]{1,64}(\+[a-z0-9._-]{1,64}){0,7}$")
#: Files kept open at once (a 96-well plate with 9 fields, raw and enhanced, needs 1,728);
#: past it the least recently written pair of files is closed, and its key continues in a new
#: part (the raw frames of its key still waiting for their enhancement get fill planes).
MAX_OPEN_FILES = 2048
#: Pixels of enhanced frames waiting, across the run, for an earlier raw plane of their file to
#: be settled (live mode enhances the keys of one file out of raw order); past it the earliest
#: open slot becomes a fill.
HOLD_BYTES = 256 * 2**20
#: Fill planes that may wait for the first enhanced frame of a file (which gives their shape);
#: past them the raw planes so far get no enhanced planes and the enhanced file, if one ever
#: starts, starts at a later raw plane (named ``..._fromNNNNNN``, ``scopecast.raw_first_plane``).
MAX_SHAPELESS = 4096
#: Why a raw frame got a fill plane when nobody said why.
ENDED = "no enhancement had come when its file was closed"
EVICTED = "no enhancement had come when its files were closed (more than max_open files open)"
LATE = "its enhancement had not come while later ones waited (more than HOLD_BYTES held)"
DUPLICATE = "a later raw frame of the same stream, acquisition and seq replaced it"


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


#: One pair of files (raw and enhanced) per (stream, acquisition, position p, grid tile g).
FileKey = tuple[str, str | None, int, int | None]
#: A raw frame, as an enhanced frame names it: (stream, acquisition, seq).
FrameKey = tuple[str, str | None, int]


def _frame_key(header: FrameHeader) -> FrameKey:
    return header.stream, header.acquisition, header.seq


@dataclass(eq=False)
class _Slot:
    """A raw plane's place in its enhanced file: open until its enhanced frame (``frame``,
    written with ``made``) or the reason it has none (``fill``) is known."""

    header: FrameHeader
    raw: dict[str, Any]  # {"file", "plane"} of the raw plane
    frame: np.ndarray | None = None
    made: dict[str, Any] = field(default_factory=dict)
    fill: str | None = None

    @property
    def settled(self) -> bool:
        return self.frame is not None or self.fill is not None


@dataclass(eq=False)
class _Pair:
    """A raw file and its enhanced companion; ``slots``: the raw planes not yet in the
    enhanced file, in raw plane order."""

    key: FileKey
    raw: Sink
    stem: str  # "{stream}[_aNNN]_pNNN[_gNNN]"
    part: str  # the raw file's part suffix: "" or "_2", ...
    where: str  # for descriptions: "position 0, acquisition ..."
    slots: deque[_Slot] = field(default_factory=deque)
    enhanced: Sink | None = None
    name: str | None = None  # the enhanced file's engine name (file_as)
    scale: int = 1
    shape: tuple[int, ...] | None = None  # of the enhanced planes (fills take it)
    dtype: np.dtype | None = None
    held: int = 0  # bytes of settled enhanced frames waiting in ``slots``
    files: int = 0  # enhanced files opened for this raw file
    dropped: int = 0  # fills dropped while no enhanced frame gave their shape


class RunWriter:
    """Raw and enhanced files per (stream, acquisition, position, grid tile) plus the run's
    JSONL index; an enhanced file lines up plane for plane with its raw file.

    Files are named ``{stream}[_a{n:03d}]_p{p:03d}[_g{g:03d}]_{kind}[_{part}]{suffix}``: ``_a``
    for the n-th acquisition (n >= 2) of a stream in this run, so separate acquisitions never
    share a file; ``_g`` only when frames carry a grid index; ``_part`` when a key continues in a
    new raw file (shape or pixel size change, too many open files), its enhanced companion
    taking the same part; ``suffix`` the sink's, ``.ome.tif`` for the default ``sink``.
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
        #: Planes written by kind: "raw", "enhanced" (an engine's output) and "fill".
        self.written: Counter[str] = Counter()
        #: Why each file that failed to close failed (its OME-XML, or the index), in order.
        self.close_errors: list[str] = []
        self._sinks: OrderedDict[FileKey, _Pair] = OrderedDict()  # least recent first
        self._draining: list[_Pair] = []  # raw file closed, enhanced planes still to come
        self._parts: Counter[FileKey] = Counter()
        self._acquisitions: dict[str, dict[str | None, int]] = {}  # stream -> acq -> n
        self._open: dict[FrameKey, tuple[_Pair, _Slot]] = {}  # slots not yet settled
        self._held = 0
        self._names: set[str] = set()  # file names handed to sinks
        self._lock = threading.Lock()
        self.closed = False

    def write_raw(
        self,
        header: FrameHeader,
        frame: np.ndarray,
        *,
        timings_ms: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """Store a raw frame, then its index line; return the index record. Its enhanced
        plane waits for :meth:`write_enhanced` or :meth:`not_enhanced`."""
        with self._lock:
            self._check_open()
            t0 = time.perf_counter()
            try:
                pair = self._pair(header, frame)
            except SinkError:
                self.errors["disk"] += 1
                raise
            plane = self._write_plane(pair.raw, frame, header)
            self.written["raw"] += 1
            older = self._open.pop(_frame_key(header), None)
            if older is not None:  # a sender that repeats a seq: the first one is filled
                older[1].fill = DUPLICATE
            slot = _Slot(header, {"file": plane.file, "plane": plane.plane})
            pair.slots.append(slot)
            self._open[_frame_key(header)] = (pair, slot)
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
    ) -> dict[str, Any] | None:
        """Store an enhanced frame (``header`` is its raw frame's) at its raw plane's number,
        then its index line; ``extra`` (e.g. the fidelity residual) goes into the line as is.
        Return the index record, or None while the frame waits for an earlier raw plane of its
        file to be settled (it is written, in order, by a later call or by :meth:`close`).

        ``engine`` made the frame; ``engine_id`` (its ``name@version:sha``) goes into the index
        line and, through the sink's ``produced_by``, into the file's metadata. The file is
        named after ``file_as`` (default ``engine``): a server that swapped engines keeps
        writing the files named after its first one. SinkError (counted as
        ``errors['raw_missing']``) if no raw plane waits for this frame: its raw frame was not
        written (a disk error), or its plane was already filled."""
        for name in (engine, file_as or engine):
            if not ENGINE_NAME.match(name) or name == "raw":
                raise ValueError(
                    f"engine name {name!r} must be 1-64 of [a-z0-9._-] (chains joined "
                    "by '+') and not 'raw'"
                )
        if not (isinstance(scale, int) and scale >= 1):
            raise ValueError(f"scale={scale!r} must be an integer >= 1 (1 = same pixel size)")
        frame = np.asarray(frame)
        if frame.ndim not in (2, 3) or 0 in frame.shape or frame.dtype.kind not in "uif":
            raise ValueError(
                f"enhanced frame of {header.key} seq {header.seq}: shape {frame.shape} dtype "
                f"{frame.dtype} cannot be stored; give (rows, cols[, components]) of unsigned "
                "int or float pixels"
            )
        with self._lock:
            self._check_open()
            got = self._open.pop(_frame_key(header), None)
            if got is None:
                self.errors["raw_missing"] += 1
                raise SinkError(
                    f"enhanced frame of {header.key} seq {header.seq} (acquisition "
                    f"{header.acquisition}) not written: no raw plane waits for it (its raw "
                    "frame was not written, or its plane was already filled); the enhanced "
                    "file stays aligned with the raw file",
                    path=self.out_dir,
                )
            pair, slot = got
            slot.frame = frame
            slot.made = {
                "engine": engine,
                "engine_id": engine_id,
                "name": file_as or engine,
                "scale": scale,
                "timings_ms": timings_ms,
                "extra": extra,
            }
            pair.held += slot.frame.nbytes
            self._held += slot.frame.nbytes
            return self._settled(pair, slot)

    def not_enhanced(self, header: FrameHeader, reason: str) -> None:
        """Say that the raw frame ``header`` gets no enhancement (``reason``, e.g. "skipped"):
        its enhanced plane is a fill plane, written as soon as the planes before it are. A
        frame already settled, or whose raw plane was not written, is left as it is."""
        with self._lock:
            self._check_open()
            got = self._open.pop(_frame_key(header), None)
            if got is not None:
                pair, slot = got
                slot.fill = str(reason)[:200] or "not enhanced"
                self._settled(pair, slot)

    def close(self) -> list[Path]:
        """Write every enhanced plane still waiting (a raw frame whose enhancement never came
        gets a fill plane), close every sink (writing its OME-XML) and the index; return the
        files written.

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
            for pair in [*self._sinks.values(), *self._draining]:
                self._close_sink(pair.raw)
                self._finish(pair, ENDED)
            self._sinks.clear()
            self._draining.clear()
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

    def _check_open(self) -> None:
        if self.closed:
            raise SinkError(
                f"run {self.out_dir} is closed: start a new RunWriter", path=self.out_dir
            )

    def _write_plane(self, sink: Sink, frame: np.ndarray, header: FrameHeader) -> PlaneRecord:
        try:
            plane = sink.write(frame, header)
        except SinkError:
            self.errors["disk"] += 1
            raise
        if plane.plane == 0:
            self.files.extend(getattr(sink, "paths", [sink.path]))  # a file per format
        return plane

    def _pair(self, header: FrameHeader, frame: np.ndarray) -> _Pair:
        """The pair of files a raw frame goes to: the key's current one, or a new part."""
        p, g = header.index.get("p", 0), header.index.get("g")
        key = (header.stream, header.acquisition, p, g)
        pair = self._sinks.get(key)
        if pair is not None:
            self._sinks.move_to_end(key)
            raw = pair.raw
            if (
                raw.closed
                or raw.broken
                or not raw.accepts(frame)
                or not getattr(raw, "takes", lambda _: True)(header)
                or (raw.planes and raw.pixel_size_um != header.pixel_size_um)
            ):
                del self._sinks[key]
                self._retire(pair)
                pair = None
        if pair is not None:
            return pair
        numbers = self._acquisitions.setdefault(header.stream, {})
        n = numbers.setdefault(header.acquisition, len(numbers) + 1)
        stem = (
            f"{header.stream}{'' if n == 1 else f'_a{n:03d}'}_p{p:03d}"
            f"{'' if g is None else f'_g{g:03d}'}"
        )
        while True:  # a part number is taken even if opening fails: a retry gets a new name
            self._parts[key] += 1
            more = "" if self._parts[key] == 1 else f"_{self._parts[key]}"
            path = self.out_dir / f"{stem}_raw{more}{self.sink.suffix}"
            if self._free(path):  # stream "a" acquisition 2 and stream "a_a002" never collide
                break
        where = f"position {p}" + ("" if g is None else f", grid tile {g}")
        if header.acquisition is not None:
            where += f", acquisition {header.acquisition}"
        sink = self.sink.open(
            path,
            pixel_size_um=header.pixel_size_um,
            fsync=self.fsync,
            description=f"scopecast raw frames of stream {header.stream!r}, {where}",
        )
        # bounded file descriptors: a pair counts two (raw, enhanced), a draining pair one
        while (self._sinks or self._draining) and (
            2 * len(self._sinks) + len(self._draining) + 2 > self.max_open
        ):
            if self._sinks:
                old = self._sinks.popitem(last=False)[1]
                self._close_sink(old.raw)
            else:
                old = self._draining.pop(0)
            self._finish(old, EVICTED)
        pair = self._sinks[key] = _Pair(key, sink, stem, more, where)
        return pair

    def _free(self, path: Path) -> bool:
        """Whether ``path`` is a name no sink of this run took (and no file has); takes it."""
        if path.name in self._names or path.exists():
            return False
        self._names.add(path.name)
        return True

    def _retire(self, pair: _Pair) -> None:
        """Close a pair's raw file (its key goes on in a new part); its enhanced file stays
        open while enhancements of its raw planes may still come."""
        self._close_sink(pair.raw)
        if any(not slot.settled for slot in pair.slots):
            self._draining.append(pair)
        else:
            self._finish(pair, ENDED)

    def _settled(self, pair: _Pair, slot: _Slot) -> dict[str, Any] | None:
        """Write what ``slot`` being settled lets through; the record of ``slot`` if written."""
        try:
            done = self._flush(pair)
        finally:
            self._bound_held()
            if pair in self._draining and all(s.settled for s in pair.slots):
                self._draining.remove(pair)
                self._finish(pair, ENDED)
        return done.get(id(slot))

    def _flush(self, pair: _Pair, *, finishing: bool = False) -> dict[int, dict[str, Any]]:
        """Write the settled slots at the head of ``pair``, in raw order; their records by
        ``id(slot)``. Fills wait for the file's first enhanced frame (its shape), except past
        :data:`MAX_SHAPELESS` or when ``finishing``, when they are dropped (no enhanced file
        then has a plane for them). SinkError (counted) on a disk error: the slot stays."""
        done: dict[int, dict[str, Any]] = {}
        while pair.slots and pair.slots[0].settled:
            slot = pair.slots[0]
            if slot.frame is None and pair.shape is None:
                model = next((s for s in pair.slots if s.frame is not None), None)
                if model is None:
                    waiting = sum(1 for _ in _settled_prefix(pair.slots))
                    if finishing:  # no enhanced frame ever came: no enhanced file at all
                        pair.slots.clear()
                    elif waiting > MAX_SHAPELESS:
                        for _ in range(waiting):
                            pair.slots.popleft()
                        self.errors["fills_dropped"] += waiting
                        pair.dropped += waiting
                        if pair.dropped == waiting:  # warn once per file
                            log.warning(
                                "%s: %d raw planes got no enhancement before its first "
                                "enhanced frame (more than %d waited): no enhanced planes for "
                                "them", pair.raw.path.name, waiting, MAX_SHAPELESS,
                            )  # fmt: skip
                    break
                assert model.frame is not None
                self._adopt(pair, model)
            done[id(slot)] = self._write_slot(pair, slot)
        return done

    def _adopt(self, pair: _Pair, slot: _Slot) -> None:
        """Take the enhanced file's name, scale and plane shape from ``slot``'s frame."""
        assert slot.frame is not None
        pair.name = pair.name or slot.made["name"]
        pair.scale = slot.made["scale"]
        pair.shape, pair.dtype = slot.frame.shape, slot.frame.dtype

    def _write_slot(self, pair: _Pair, slot: _Slot) -> dict[str, Any]:
        """Write the head slot's enhanced frame (or its fill), then its index line."""
        t0 = time.perf_counter()
        if slot.frame is not None:
            pair.name = pair.name or slot.made["name"]
            pair.scale = slot.made["scale"]
            data = slot.frame
        else:
            assert pair.shape is not None and pair.dtype is not None
            data = fill_plane(pair.shape, pair.dtype)
        raw_size = slot.header.pixel_size_um
        size = None if raw_size is None else raw_size / pair.scale
        sink = self._enhanced_sink(pair, slot, data, size)
        made = slot.made
        if slot.frame is not None and (produced_by := getattr(sink, "produced_by", None)):
            produced_by(made["engine_id"] or made["engine"])
        plane = self._write_plane(sink, data, slot.header)
        pair.slots.popleft()  # on disk: whatever happens to its index line, never again
        if slot.frame is None:
            if filled := getattr(sink, "filled", None):
                filled(plane.plane)
            self.written["fill"] += 1
            record = self._record("enhanced", slot.header, data, plane, None, t0)
            record.update(fill=True, fill_value=fill_text(data.dtype), reason=slot.fill)
            record.update(scale=pair.scale, pixel_size_um=size, raw=slot.raw)
        else:
            pair.shape, pair.dtype = data.shape, data.dtype  # what later fills look like
            pair.held -= data.nbytes
            self._held -= data.nbytes
            slot.frame = None
            self.written["enhanced"] += 1
            record = self._record("enhanced", slot.header, data, plane, made["timings_ms"], t0)
            record.update(made["extra"] or {})
            record.update(engine=made["engine"], scale=pair.scale, pixel_size_um=size)
            record["raw"] = slot.raw
            if made["engine_id"] is not None:
                record["engine_id"] = made["engine_id"]
        return self._append(record)

    def _enhanced_sink(
        self, pair: _Pair, slot: _Slot, data: np.ndarray, size: float | None
    ) -> Sink:
        """The pair's enhanced file, opened at its first plane; a file that cannot take
        ``data`` (closed, broken, another shape) is followed by one that starts at this raw
        plane (``..._fromNNNNNN``), which its metadata says."""
        sink = pair.enhanced
        if sink is not None and (
            sink.closed
            or sink.broken
            or not sink.accepts(data)
            or (sink.planes and sink.pixel_size_um != size)
        ):
            self._close_sink(sink)
            sink = pair.enhanced = None
        if sink is not None:
            return sink
        first = int(slot.raw["plane"])
        from_ = "" if first == 0 else f"_from{first:06d}"
        path = self.out_dir / f"{pair.stem}_{pair.name}{pair.part}{from_}{self.sink.suffix}"
        n = 1
        while not self._free(path):  # another stream's name, or a restart at the same plane
            n += 1
            path = path.with_name(
                f"{pair.stem}_{pair.name}{pair.part}{from_}-{n}{self.sink.suffix}"
            )
        if first:
            log.warning(
                "%s: its enhanced planes start at raw plane %d in %s (not aligned from 0)",
                pair.raw.path.name, first, path.name,
            )  # fmt: skip
        sink = self.sink.open(
            path,
            pixel_size_um=size,
            fsync=self.fsync,
            description=(f"scopecast {pair.name} frames of stream {pair.key[0]!r}, {pair.where}"),
        )
        if pairs_with := getattr(sink, "pairs_with", None):
            pairs_with(pair.raw.path.name, first)
        pair.enhanced = sink
        pair.files += 1
        return sink

    def _bound_held(self) -> None:
        """Keep the enhanced frames waiting in memory under :data:`HOLD_BYTES`."""
        while self._held > HOLD_BYTES:
            pair = max([*self._sinks.values(), *self._draining], key=lambda q: q.held)
            head = pair.slots[0]
            if not head.settled:  # the frame everyone waits for: a fill, and on they go
                self._open.pop(_frame_key(head.header), None)
                head.fill = LATE
                self.errors["forced_fill"] += 1
            else:  # the disk refuses the head: the newest waiting frame becomes a fill
                victim = next(s for s in reversed(pair.slots) if s.frame is not None)
                pair.held -= victim.frame.nbytes  # type: ignore[union-attr]
                self._held -= victim.frame.nbytes  # type: ignore[union-attr]
                victim.frame, victim.fill = None, "dropped: the disk refused earlier planes"
                self.errors["enhanced_dropped"] += 1
                continue
            with contextlib.suppress(SinkError):  # counted; the loop drops frames next
                self._flush(pair)

    def _finish(self, pair: _Pair, why: str) -> None:
        """No slot of ``pair`` will settle any more: fill the open ones, write what the disk
        takes, close the enhanced file. Never raises (errors are counted)."""
        for slot in pair.slots:
            if not slot.settled:
                self._open.pop(_frame_key(slot.header), None)
                slot.fill = why
        try:
            self._flush(pair, finishing=True)
        except SinkError as e:
            self.errors["enhanced_unwritten"] += len(pair.slots)
            log.warning(
                "%s: %d enhanced planes not written (%s); the planes before are intact",
                pair.raw.path.name, len(pair.slots), e,
            )  # fmt: skip
        self._held -= pair.held
        pair.held = 0
        pair.slots.clear()
        if pair.enhanced is not None:
            self._close_sink(pair.enhanced)

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


def _settled_prefix(slots: deque[_Slot]):
    """The settled slots at the head of ``slots``."""
    for slot in slots:
        if not slot.settled:
            return
        yield slot
