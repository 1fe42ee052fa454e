"""One growing OME-TIFF of planes that survives a SIGKILL, a full disk and odd metadata.

An enhanced file lines up with its raw file plane for plane (:class:`~stream.sinks.store.RunWriter`
writes a *fill* plane of :func:`fill_value` where a raw frame got no enhancement); the OME-XML
names the raw file (``scopecast.raw``) and lists the fill planes (``scopecast.fills``).

Every frame, (rows, cols) or (rows, cols, components), is its own uncompressed BigTIFF page,
written by tifffile straight to the OS (no user-space buffer), so a killed process loses at
most the plane being written and the file stays readable page by page. The first page
carries a placeholder description padded to :data:`PLACEHOLDER_BYTES`;
:meth:`OmeTiffSink.close` replaces it with OME-XML that describes the planes written.
"""

from __future__ import annotations

import errno
import io
import itertools
import json
import logging
import math
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple, cast

import numpy as np
import tifffile

from calibration.errors import ScopecastError
from stream.protocol import FrameHeader

log = logging.getLogger(__name__)

#: Software tag of every page: how :func:`stream.sinks.recover.recover` knows our files.
SOFTWARE = "scopecast"
#: The first page's description until close; JSON after it tells recover() the pixel size.
PLACEHOLDER_PREFIX = b"scopecast OME-TIFF not closed (run `scopecast recover`) "
#: Bytes reserved for the OME-XML in the first page (padded with spaces, which TIFF readers
#: keep and XML parsers ignore); longer XML is appended at close, then linked.
PLACEHOLDER_BYTES = 16384
#: Samples per pixel a frame may carry as its third axis (rows, cols, components).
MAX_COMPONENTS = 4
_GRID_AXES = ("t", "c", "z")
_MAX_VALUES_NOTE = 64
#: Stage z steps within this fraction of their median count as one z spacing.
_Z_STEP_TOLERANCE = 0.1
#: Longest ``scopecast.fills`` note written in full; past it the note says how many and where the
#: index lists them (a live run that skips every other frame would otherwise grow the OME-XML
#: by about 7 bytes a plane).
MAX_FILLS_NOTE = 1 << 20
#: errno values that mean "no room": the advice is then to free disk space.
_NO_ROOM = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


class SinkError(ScopecastError, OSError):
    """A write that failed (disk full, permission, wrong frame): says which file and what to do."""

    def __init__(
        self,
        message: str,
        *,
        path: Path | None = None,
        planes: int | None = None,
        code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.errno = code
        self.filename = None if path is None else str(path)
        self.path = path
        self.planes = planes

    def __str__(self) -> str:
        return str(self.args[0])


def fill_value(dtype: np.dtype | str) -> float:
    """The value of every pixel of a fill plane (an enhanced plane that holds no enhancement):
    0 for integer pixels (black in every viewer; an engine's output is never a whole plane of 0
    unless its input was one, which the index and ``scopecast.fills`` tell apart), NaN for float
    pixels (an engine's output is always finite: the server refuses NaN outputs)."""
    return math.nan if np.dtype(dtype).kind == "f" else 0


def check_new_sink(path: Path, pixel_size_um: float | None) -> None:
    """A new sink's file must not exist (nothing recorded is overwritten: SinkError EEXIST) and
    its pixel size must be > 0 or unknown (ValueError)."""
    if path.exists():
        raise SinkError(
            f"{path} already exists: a sink never overwrites recorded data; choose a new name "
            "or a fresh run directory",
            path=path,
            planes=0,
            code=errno.EEXIST,
        )
    if pixel_size_um is not None and not pixel_size_um > 0:
        raise ValueError(f"pixel_size_um={pixel_size_um!r} must be > 0 (or None if unknown)")


def fill_plane(shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
    """A fill plane of ``shape`` and ``dtype`` (see :func:`fill_value`)."""
    return np.full(shape, fill_value(dtype), np.dtype(dtype))


def fill_text(dtype: np.dtype | str) -> str:
    """The fill value as written in metadata and the index: "0" or "NaN"."""
    value = fill_value(dtype)
    return "NaN" if value != value else str(int(value))


def no_room(e: BaseException) -> bool:
    """Whether ``e`` is the disk (or a file size limit) running out of room."""
    return isinstance(e, OSError) and e.errno in _NO_ROOM


def error_reason(e: BaseException) -> str:
    """What went wrong, in words: an OSError's strerror, else the exception's repr."""
    return e.strerror if isinstance(e, OSError) and e.strerror else repr(e)


@dataclass(frozen=True)
class PlaneRecord:
    """Where one written plane's pixels lie: ``nbytes`` at ``offset`` of ``file``."""

    file: str
    plane: int
    offset: int
    nbytes: int
    crc32: int


class Layout(NamedTuple):
    """How the planes of one file map onto OME dimensions."""

    axes: str  # e.g. "TC" (without YX)
    shape: tuple[int, ...]
    values: dict[str, list[int]]  # index values along each declared axis, in file order
    reason: str  # why the planes are not a grid ("" when they are)


class _PlaneFile:
    """A seekable binary file on a bare file descriptor: every write reaches the OS or raises.

    ``fileno`` is hidden on purpose: numpy's ``tofile`` ignores a short write (full disk),
    so tifffile must fall back to ``write``, which loops until done or raises OSError.
    """

    mode = "r+b"

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        self.fd = os.open(
            path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644
        )

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            n = os.write(self.fd, view[done:])
            if n <= 0:
                raise OSError(errno.ENOSPC, "no bytes written", self.name)
            done += n
        return done

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = self.size() - self.tell()
        return os.read(self.fd, size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return os.lseek(self.fd, offset, whence)

    def tell(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_CUR)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno hidden so that every write is checked")

    def flush(self) -> None:
        """Nothing is buffered; durability is :meth:`fsync`."""

    def fsync(self) -> None:
        os.fsync(self.fd)

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass(frozen=True)
class _Plane:
    """What close() needs of one written plane to describe it in OME-XML."""

    tcz: tuple[int, int, int]
    channel: str | None
    wall_time: float | None
    exposure_ms: float | None
    stage: tuple[float | None, float | None, float | None]


class _PlaneTable:
    """What close() needs of every plane, at flat memory however long the file grows: packed
    records (76 bytes a plane) in a buffer of ``chunk`` planes that moves to an anonymous
    temporary file when full (gone with the process, crash or not); read back at close."""

    RECORD = np.dtype([("tcz", "<i8", 3), ("floats", "<f8", 5), ("channel", "<i4")])

    def __init__(self, chunk: int = 4096) -> None:
        self._buffer = np.empty(chunk, self.RECORD)
        self._n = 0  # planes in the buffer
        self._spilled = 0  # planes in the file
        self._file: IO[bytes] | None = None
        self._names: dict[str | None, int] = {None: -1}  # channel name -> id
        self._by_id: dict[int, str | None] = {-1: None}

    def append(self, p: _Plane) -> None:
        cid = self._names.setdefault(p.channel, len(self._names) - 1)
        self._by_id[cid] = p.channel
        floats = [_known(v) for v in (p.wall_time, p.exposure_ms, *p.stage)]
        self._buffer[self._n] = (p.tcz, floats, cid)
        self._n += 1
        if self._n == len(self._buffer):
            if self._file is None:
                # lives as long as the table; closed by close()
                self._file = tempfile.TemporaryFile(prefix="scopecast-planes-")  # noqa: SIM115
            self._file.seek(0, os.SEEK_END)
            self._file.write(self._buffer.tobytes())
            self._spilled += self._n
            self._n = 0

    def __len__(self) -> int:
        return self._spilled + self._n

    def __getitem__(self, i: int) -> _Plane:
        if not 0 <= i < len(self):
            raise IndexError(f"plane {i} of {len(self)}")
        if i >= self._spilled:
            return self._plane(self._buffer[i - self._spilled])
        assert self._file is not None
        self._file.seek(i * self.RECORD.itemsize)
        return self._plane(np.frombuffer(self._file.read(self.RECORD.itemsize), self.RECORD)[0])

    def __iter__(self) -> Iterator[_Plane]:
        size = len(self._buffer)
        for start in range(0, self._spilled, size):
            assert self._file is not None
            self._file.seek(start * self.RECORD.itemsize)
            count = min(size, self._spilled - start)
            chunk = np.frombuffer(self._file.read(count * self.RECORD.itemsize), self.RECORD)
            yield from map(self._plane, chunk)
        yield from map(self._plane, self._buffer[: self._n])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _plane(self, r: np.void) -> _Plane:
        t, c, z = (int(v) for v in r["tcz"])
        wall, exposure, sx, sy, sz = (None if v != v else float(v) for v in r["floats"])
        return _Plane((t, c, z), self._by_id[int(r["channel"])], wall, exposure, (sx, sy, sz))


def _known(value: Any) -> float:
    """``value`` as a float, or NaN (unknown) if it is missing, not a number or not finite."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


class OmeTiffSink:
    """One growing OME-TIFF (BigTIFF) of planes of one shape and dtype, crash-safe.

    A plane is (rows, cols), or (rows, cols, k) stored as k samples per pixel (axes YXS).
    """

    def __init__(
        self,
        path: Path,
        *,
        pixel_size_um: float | None,
        channel_names: list[str] | None = None,
        description: str = "",
        fsync: bool = False,
    ) -> None:
        self.path = Path(path)
        check_new_sink(self.path, pixel_size_um)
        self.pixel_size_um = pixel_size_um
        self.channel_names = list(channel_names) if channel_names else None
        self.description = description
        self.fsync = fsync
        self.planes = 0
        self.closed = False
        self.shape: tuple[int, ...] | None = None
        self.dtype: np.dtype | None = None
        self.broken = ""  # why no further plane can be appended ("" while usable)
        self._file: _PlaneFile | None = None
        self._writer: tifffile.TiffWriter | None = None
        self._meta = _PlaneTable()
        self._sizes: dict[str, int] | None = None
        self._notes: set[str] = set()
        self._extra: set[tuple[tuple[str, int], ...]] = set()
        self._acquisitions: set[str] = set()
        self._producers: list[tuple[str, int]] = []  # (engine, first plane), in plane order
        self._fills: list[list[int]] = []  # [first, last] runs of fill planes, in plane order
        self._raw: tuple[str, int] | None = None  # (raw file, its plane for this file's plane 0)

    def pairs_with(self, raw_file: str, first_plane: int = 0) -> None:
        """Say that this (enhanced) file's plane i is plane ``first_plane + i`` of ``raw_file``
        (``scopecast.raw`` in its OME-XML)."""
        self._raw = (raw_file, first_plane)

    def filled(self, plane: int) -> None:
        """Mark ``plane`` (already written) as a fill plane (``scopecast.fills``)."""
        if self._fills and self._fills[-1][1] == plane - 1:
            self._fills[-1][1] = plane
        elif not self._fills or self._fills[-1][1] < plane:
            self._fills.append([plane, plane])
        else:
            raise ValueError(f"fill plane {plane} marked out of order (after {self._fills[-1]})")

    def fills(self) -> list[int]:
        """Every plane marked by :meth:`filled`, in order."""
        return [n for first, last in self._fills for n in range(first, last + 1)]

    def produced_by(self, engine: str) -> None:
        """Name the engine that makes the planes written from now on (a hot swap changes it):
        the OME-XML lists each engine with its plane range (``scopecast.engines``)."""
        if self._producers and self._producers[-1][1] == self.planes:
            self._producers.pop()  # nothing written under the previous name since it was given
        if not self._producers or self._producers[-1][0] != engine:
            self._producers.append((engine, self.planes))

    def producers(self) -> list[tuple[str, int, int]]:
        """Each engine named by :meth:`produced_by` with the first and last plane it made."""
        ranges = []
        for i, (engine, first) in enumerate(self._producers):
            last = (self._producers[i + 1][1] if i + 1 < len(self._producers) else self.planes) - 1
            if last >= first:
                ranges.append((engine, first, last))
        return ranges

    def write(self, frame: np.ndarray, header: FrameHeader) -> PlaneRecord:
        """Append ``frame`` as the next page; return where its pixels lie once they are written."""
        if self.closed:
            raise SinkError(
                f"{self.path} is closed: open a new sink to write more planes",
                path=self.path,
                planes=self.planes,
            )
        if self.broken:
            raise SinkError(
                f"{self.path} cannot take more planes ({self.broken}); its "
                f"{self.planes} planes are intact: start a new file",
                path=self.path,
                planes=self.planes,
            )
        data = self._check(frame)
        if self._writer is None:
            self._open()
        assert self._file is not None and self._writer is not None
        end = self._file.size()
        link = getattr(self._writer, "_ifdoffset", None)  # previous page's next-IFD pointer
        try:
            written = self._writer.write(
                data[..., 0] if data.ndim == 3 and data.shape[2] == 1 else data,  # no 1-px pages
                returnoffset=True,
                metadata=None,
                contiguous=False,
                photometric="minisblack",
                planarconfig="contig" if data.ndim == 3 and data.shape[2] > 1 else None,
                software=SOFTWARE,
                **self._resolution(),
                description=self._placeholder() if self.planes == 0 else None,
            )
            assert written is not None, "tifffile returns (offset, nbytes) with returnoffset"
            offset, nbytes = written
            if self.fsync:
                self._file.fsync()
        except Exception as e:
            self._undo(end, link)
            advice = (
                "Free disk space and keep writing (the next write retries), or close() the sink"
                if no_room(e)
                else "Check the frame and the disk; the next write retries, or close() the sink"
            )
            raise SinkError(
                f"{self.path}: writing plane {self.planes} failed ({error_reason(e)}); the "
                f"{self.planes} planes written before are intact. {advice}",
                path=self.path,
                planes=self.planes,
                code=e.errno if isinstance(e, OSError) else None,
            ) from e
        if nbytes != data.nbytes or offset + nbytes > self._file.size():
            self.broken = (
                f"tifffile reported {nbytes} bytes at {offset} for a {data.nbytes}-byte plane"
            )
            raise SinkError(
                f"{self.path}: {self.broken}; report this as a bug",
                path=self.path,
                planes=self.planes,
            )
        if self.planes == 0:
            self.shape, self.dtype = data.shape, data.dtype
        self._remember(header)
        record = PlaneRecord(
            self.path.name, self.planes, int(offset), int(nbytes), zlib.crc32(data.data)
        )
        self.planes += 1
        return record

    def accepts(self, frame: np.ndarray) -> bool:
        """Whether ``frame`` has this file's shape and dtype (any frame fits an empty file)."""
        if self.shape is None or self.dtype is None:
            return True
        return frame.shape == self.shape and frame.dtype.newbyteorder("<") == self.dtype

    def close(self) -> None:
        """Write the final OME-XML (best effort) and close; data are never truncated. Idempotent.

        Raises SinkError, after closing, if the OME-XML could not be written; the file then
        keeps its planes as plain BigTIFF pages and ``recover`` rebuilds the metadata.
        """
        if self.closed:
            return
        self.closed = True
        if self._file is None or self.planes == 0:
            self._meta.close()
        if self._file is None:
            return
        if self.planes == 0:
            self._discard()  # only a TIFF header: no valid file to keep
            return
        step = "describing its planes"
        try:
            if self._writer is not None:
                self._writer.close()  # non-contiguous pages: writes nothing, keeps our handle
            xml = self.omexml().encode("utf-8")
            step = "writing the OME-XML"
            self._write_description(xml)
        except Exception as e:
            advice = (
                "free disk space, then run `scopecast recover` on it to get an OME-TIFF"
                if no_room(e)
                else "run `scopecast recover` on it to get an OME-TIFF, and report this error"
            )
            raise SinkError(
                f"{self.path}: {step} failed ({error_reason(e)}); its {self.planes} planes are "
                f"intact as BigTIFF pages: {advice}",
                path=self.path,
                planes=self.planes,
                code=e.errno if isinstance(e, OSError) else None,
            ) from e
        finally:
            self._file.close()
            self._meta.close()

    def layout(self) -> Layout:
        """How the planes written so far map onto OME dimensions."""
        layout = plane_layout([p.tcz for p in self._meta], self._sizes or {})
        if not self._notes:
            return layout
        reason = "; ".join(
            [layout.reason, *sorted(self._notes)] if layout.reason else sorted(self._notes)
        )
        return plane_layout([], {}, n=len(self._meta), reason=reason)

    def omexml(self) -> str:
        """OME-XML describing the planes written so far."""
        assert self.shape is not None and self.dtype is not None
        layout = self.layout()
        rows, cols, *samples = self.shape
        axes = layout.axes + ("YXS" if samples else "YX")
        shape = (*layout.shape, *self.shape)
        meta: dict[str, Any] = {"Name": self.path.name.split(".")[0]}
        description = self.description
        if layout.reason:
            description = (f"{description}\n" if description else "") + (
                f"planes stored in arrival order along T: {layout.reason}; the run's "
                "index.jsonl holds each plane's exact (t, c, z)"
            )
        if self._raw is not None:
            raw, first = self._raw
            description = (f"{description}\n" if description else "") + (
                f"plane i is the enhancement of plane {first}+i of {raw}"
                if first
                else f"plane i is the enhancement of plane i of {raw}: they line up"
            )
        if self._fills:
            description = (f"{description}\n" if description else "") + (
                f"planes listed in scopecast.fills hold no enhancement (their raw frame was "
                f"skipped or not enhanced): every pixel is {fill_text(self.dtype)}"
            )
        if description:
            meta["Description"] = description
        if self.pixel_size_um is not None:
            meta.update(
                PhysicalSizeX=self.pixel_size_um,
                PhysicalSizeXUnit="µm",
                PhysicalSizeY=self.pixel_size_um,
                PhysicalSizeYUnit="µm",
            )
        z_step = self._z_step()
        if z_step is not None:
            meta.update(PhysicalSizeZ=z_step, PhysicalSizeZUnit="µm")
        names = self._channel_names(layout)
        if names:
            meta["Channel"] = {"Name": names}
        planes = self._plane_attributes()
        if planes:
            meta["Plane"] = planes
        notes = {"scopecast.layout": axes}
        if layout.reason:
            notes["scopecast.reason"] = layout.reason
        for ax, vals in layout.values.items():
            if vals != list(range(len(vals))):
                notes[f"scopecast.{ax}"] = _compact(vals)
        if len(self._acquisitions) == 1:
            notes["scopecast.acquisition"] = next(iter(self._acquisitions))
        if self._raw is not None:
            notes["scopecast.raw"] = self._raw[0]
            if self._raw[1]:
                notes["scopecast.raw_first_plane"] = str(self._raw[1])
        if self._fills:
            notes["scopecast.fills"] = _runs(self._fills)
            notes["scopecast.fill_value"] = fill_text(self.dtype)
        if producers := self.producers():
            notes["scopecast.engines"] = "; ".join(
                f"{engine}: planes {first}..{last}" for engine, first, last in producers
            )
        meta["MapAnnotation"] = {"Namespace": "scopecast", "Value": notes}
        ome = tifffile.OmeXml(Creator=SOFTWARE)
        stored = (self.planes, 1, 1, rows, cols, samples[0] if samples else 1)
        ome.addimage(self.dtype, shape, stored, axes=axes, **meta)
        return ome.tostring(declaration=True)

    # -- internals --------------------------------------------------------------------------

    def _check(self, frame: np.ndarray) -> np.ndarray:
        frame = np.asarray(frame)
        if (
            frame.ndim not in (2, 3)
            or 0 in frame.shape
            or (frame.ndim == 3 and frame.shape[2] > MAX_COMPONENTS)
        ):
            raise SinkError(
                f"{self.path}: frame shape {frame.shape} cannot be stored; send (rows, cols) "
                f"or (rows, cols, components) with 1-{MAX_COMPONENTS} components",
                path=self.path,
                planes=self.planes,
            )
        if frame.dtype.kind not in "uif" or frame.dtype.itemsize > 8:
            raise SinkError(
                f"{self.path}: dtype {frame.dtype} cannot be stored; send one of "
                "uint8, uint16, uint32, float32",
                path=self.path,
                planes=self.planes,
            )
        data = np.ascontiguousarray(frame, frame.dtype.newbyteorder("<"))
        if self.shape is not None and (data.shape != self.shape or data.dtype != self.dtype):
            raise SinkError(
                f"{self.path}: frame {data.shape} {data.dtype} does not match this file's "
                f"{self.shape} {self.dtype}: start a new file for the new shape",
                path=self.path,
                planes=self.planes,
            )
        return data

    def _open(self) -> None:
        try:
            self._file = _PlaneFile(self.path)
        except OSError as e:
            raise SinkError(
                f"cannot create {self.path} ({e.strerror}): check the directory "
                "exists, is writable and has free space",
                path=self.path,
                planes=0,
                code=e.errno,
            ) from e
        try:
            self._writer = tifffile.TiffWriter(cast(IO[bytes], self._file), bigtiff=True, ome=False)
        except OSError as e:
            self._discard()
            raise SinkError(
                f"cannot start {self.path} ({e.strerror}): free disk space; the next write retries",
                path=self.path,
                planes=0,
                code=e.errno,
            ) from e

    def _discard(self) -> None:
        """Remove the file this sink created while it holds no plane."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._writer = None
        self.path.unlink(missing_ok=True)

    def _resolution(self) -> dict[str, Any]:
        """TIFF resolution tags, so plain TIFF readers (ImageJ) know the pixel size too."""
        if self.pixel_size_um is None:
            return {}
        per_cm = 1e4 / self.pixel_size_um
        if not 1e-3 <= per_cm <= 2**31:  # not a TIFF rational: the OME-XML still says it
            return {}
        return {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}

    def _placeholder(self) -> bytes:
        """The first page's description until close, ``PLACEHOLDER_BYTES`` long on disk.

        Padded with spaces, not NULs: tifffile stores a description only up to its first
        double NUL, which would leave no room for the OME-XML.
        """
        info = json.dumps({"pixel_size_um": self.pixel_size_um}).encode()
        text = PLACEHOLDER_PREFIX + info
        return text + b" " * max(0, PLACEHOLDER_BYTES - 1 - len(text))  # + tifffile's NUL

    def _undo(self, end: int, link: int | None) -> None:
        """Drop a partly written page: unlink it from the page chain, cut the file to ``end``."""
        assert self._file is not None
        try:
            if link is not None and link < end:
                self._file.seek(link)
                self._file.write(b"\0" * 8)
            self._file.truncate(end)
            self._file.seek(end)
        except OSError as e:  # the chain may now point at garbage: append nothing more
            self.broken = f"undoing a failed write failed: {e}"
            log.error("%s: %s", self.path, self.broken)

    def _write_description(self, xml: bytes) -> None:
        """Put ``xml`` into the first page's description without ever breaking the file.

        XML that fits the reserved room is written in place (the file does not grow); longer
        XML is appended first and linked only once all of it is on disk, so a full disk
        leaves the placeholder and every plane as they were.
        """
        assert self._file is not None
        with tifffile.TiffFile(self.path) as tif:  # the pages are in the OS: readable now
            tag = tif.pages.first.tags.get(270)
            if tag is None or not tif.is_bigtiff or tag.dtype != 2:
                raise ValueError(f"the first page has no BigTIFF ImageDescription ({tag!r})")
            entry, count, at = tag.offset, tag.count, tag.valueoffset
        if len(xml) < count:
            self._file.seek(at)
            self._file.write(xml + b" " * (count - 1 - len(xml)) + b"\0")
        else:
            end = self._file.size()
            at = end + end % 2  # TIFF values start on a word boundary
            try:
                self._file.seek(end)
                self._file.write(b"\0" * (at - end) + xml + b"\0")
                if self.fsync:
                    self._file.fsync()
            except BaseException:
                self._file.truncate(end)
                raise
            self._file.seek(entry + 4)  # BigTIFF entry: code, type, count (Q), offset (Q)
            self._file.write(struct.pack("<QQ", len(xml) + 1, at))
        if self.fsync:
            self._file.fsync()

    def _remember(self, header: FrameHeader) -> None:
        i = header.index
        stage = header.stage
        self._meta.append(
            _Plane(
                (i.get("t", 0), i.get("c", 0), i.get("z", 0)),
                header.channel,
                header.wall_time,
                header.exposure_ms,
                (None, None, None) if stage is None else (stage.x, stage.y, stage.z),
            )
        )
        extra = tuple(sorted((k, v) for k, v in i.items() if k not in ("t", "p", "c", "z")))
        self._extra.add(extra)
        if len(self._extra) > 1:
            axes = sorted({k for e in self._extra for k, _ in e})
            self._notes.add(f"index axes {axes} vary but are not OME dimensions")
        if header.acquisition is not None:
            self._acquisitions.add(header.acquisition)
            if len(self._acquisitions) > 1:
                self._notes.add("planes come from more than one acquisition")
        if self._sizes is None:
            self._sizes = dict(header.sizes)
        elif header.sizes != self._sizes:
            self._notes.add(f"acquisition sizes changed from {self._sizes} to {header.sizes}")

    def _channel_names(self, layout: Layout) -> list[str] | None:
        sizec = layout.shape[layout.axes.index("C")] if "C" in layout.axes else 1
        if self.channel_names is not None:
            if len(self.channel_names) == sizec:
                return self.channel_names
            log.warning(
                "%s: %d channel names given for %d channels; using frame headers",
                self.path,
                len(self.channel_names),
                sizec,
            )
        if "C" in layout.axes:
            first: dict[int, str | None] = {}
            for p in self._meta:
                first.setdefault(p.tcz[1], p.channel)
            names = [first[c] for c in layout.values["C"]]
        else:
            names = list({p.channel for p in self._meta})
        if len(names) != sizec or any(n is None for n in names):
            return None
        return [str(n) for n in names]

    def _plane_attributes(self) -> dict[str, list[Any]] | list[dict[str, Any]]:
        """Per-plane OME attributes; an unknown value (no wall time, NaN) is left out.

        Columns (one list per attribute) when every plane knows what it says, else one dict
        per plane, so a plane with an unknown value simply lacks that attribute.
        """
        t0 = next((p.wall_time for p in self._meta if p.wall_time is not None), None)
        columns: dict[str, tuple[str, list[Any]]] = {
            "DeltaT": (
                "s",
                [
                    None if p.wall_time is None or t0 is None else round(p.wall_time - t0, 6)
                    for p in self._meta
                ],
            ),
            "ExposureTime": ("ms", [p.exposure_ms for p in self._meta]),
        }
        for k, ax in enumerate("XYZ"):
            columns[f"Position{ax}"] = ("µm", [p.stage[k] for p in self._meta])
        known = {k: v for k, v in columns.items() if any(x is not None for x in v[1])}
        n = len(self._meta)
        if all(None not in values for _, values in known.values()):
            attrs: dict[str, list[Any]] = {}
            for name, (unit, values) in known.items():
                attrs[name], attrs[f"{name}Unit"] = values, [unit] * n
            return attrs
        planes: list[dict[str, Any]] = [{} for _ in range(n)]
        for name, (unit, values) in known.items():
            for plane, value in zip(planes, values, strict=True):
                if value is not None:
                    plane[name], plane[f"{name}Unit"] = value, unit
        return planes

    def _z_step(self) -> float | None:
        """The z spacing in µm from the stage z of planes at consecutive z indices of each
        (t, c) stack, if the planes have more than one z and the steps agree; else None."""
        stacks: dict[tuple[int, int], dict[int, float]] = {}
        for p in self._meta:
            if p.stage[2] is not None:
                stacks.setdefault(p.tcz[:2], {}).setdefault(p.tcz[2], p.stage[2])
        steps: list[float] = []
        for zs in stacks.values():
            idx = sorted(zs)
            steps += [(zs[b] - zs[a]) / (b - a) for a, b in itertools.pairwise(idx)]
        if not steps:
            return None
        step = float(np.median(steps))
        if step == 0 or any(abs(s - step) > _Z_STEP_TOLERANCE * abs(step) for s in steps):
            return None
        return round(abs(step), 9) or None  # a step that rounds to 0 is no spacing


def plane_layout(
    tcz: Sequence[tuple[int, int, int]],
    sizes: Mapping[str, int],
    *,
    n: int | None = None,
    reason: str = "",
) -> Layout:
    """Map planes with indices ``tcz`` (in file order) onto OME axes.

    The planes form a grid if they run through every combination of the (t, c, z) values
    present, nested in the acquisition's axis order (the order of ``sizes``); otherwise, or
    if ``reason`` is given, all planes lie along T and the reason says why.
    """
    count = len(tcz) if n is None else n
    if reason or count == 0:
        return Layout("T", (count,), {"T": list(range(count))}, reason)
    values = {ax: sorted({p[k] for p in tcz}) for k, ax in enumerate(_GRID_AXES)}
    varying = [ax for ax in _GRID_AXES if len(values[ax]) > 1]
    order = [ax for ax in sizes if ax in varying]
    unlisted = [ax for ax in varying if ax not in order]
    if not sizes and not varying:
        return Layout("T", (count,), {"T": list(range(count))}, "")  # a plain stream of frames
    if unlisted:
        why = f"index axes {unlisted} vary but the acquisition sizes {dict(sizes)} omit them"
        return plane_layout(tcz, sizes, reason=why)
    if not order:
        order = ["t"]
    pos = [_GRID_AXES.index(ax) for ax in order]
    expected = itertools.product(*(values[ax] for ax in order))
    for i, (plane, want) in enumerate(zip(tcz, expected, strict=False)):
        got = tuple(plane[k] for k in pos)
        if got != want:
            names = ",".join(order)
            why = f"plane {i} has ({names})={got}, a full grid needs {want}"
            return plane_layout(tcz, sizes, reason=why)
    full = int(np.prod([len(values[ax]) for ax in order]))
    if count > full:
        why = f"{count} planes for {full} distinct ({','.join(order)}) values: some repeat"
        return plane_layout(tcz, sizes, reason=why)
    if count < full:
        inner = int(np.prod([len(values[ax]) for ax in order[1:]]))
        why = (
            f"stopped within a {order[0]} step: {count} planes do not fill whole steps of "
            f"{inner} planes"
        )
        return plane_layout(tcz, sizes, reason=why)
    axes = "".join(order).upper()
    return Layout(
        axes, tuple(len(values[ax]) for ax in order), {ax.upper(): values[ax] for ax in order}, ""
    )


def _runs(runs: list[list[int]]) -> str:
    """Runs of planes as "3,5..9,12"; past :data:`MAX_FILLS_NOTE` characters, a summary."""
    text = ",".join(str(a) if a == b else f"{a}..{b}" for a, b in runs)
    if len(text) <= MAX_FILLS_NOTE:
        return text
    count = sum(b - a + 1 for a, b in runs)
    return f"{count} planes from {runs[0][0]} to {runs[-1][1]}: index.jsonl marks each (fill)"


def parse_runs(text: str) -> list[int]:
    """The planes of a ``scopecast.fills`` note ("3,5..9,12"); ValueError naming a bad part."""
    planes: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, _, last = part.partition("..")
        try:
            a, b = int(first), int(last or first)
        except ValueError:
            raise ValueError(f"fill runs {text[:80]!r}: {part!r} is not N or N..M") from None
        planes.extend(range(a, b + 1))
    return planes


def _compact(values: list[int]) -> str:
    if values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    text = ",".join(map(str, values[:_MAX_VALUES_NOTE]))
    return text + (",..." if len(values) > _MAX_VALUES_NOTE else "")
