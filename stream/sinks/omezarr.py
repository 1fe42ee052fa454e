"""One growing OME-Zarr image (NGFF 0.5, Zarr v3) of planes, written through ``ome-writers``
with its zarr-python backend, that survives a SIGKILL.

Each plane is its own chunk, written synchronously (zarr-python: the array's ``zarr.json`` is
resized first, then the chunk file is written), so when :meth:`OmeZarrSink.write` returns the
plane is in the OS and :class:`~stream.sinks.store.RunWriter` then appends its index line:
after a SIGKILL every indexed plane reads back (tensorstore writes asynchronously and
acquire-zarr buffers until close, which is why neither is used here).

Axes come from the acquisition: the (t, c, z) axes of ``FrameHeader.sizes`` (in the
acquisition's order; the first one grows as frames come, the others have the acquisition's
size), stored in NGFF order (TCZYX), each plane at its header's (t, c, z). A stream without
sizes is stored along T in arrival order. A frame that does not fit the file (another
acquisition size, an index past a size, a (t, c, z) at or before one already written: a
repeat) is refused by :meth:`OmeZarrSink.takes` before it is written, and RunWriter starts a
new part, so no recorded plane is ever overwritten. An enhanced image takes its raw image's
headers in the same order, so plane (t, c, z) of the enhanced image is plane (t, c, z) of the
raw one; a fill plane (every pixel 0, NaN for float pixels) stands where a raw frame got no
enhancement, and the group's ``scopecast`` attributes list them (``fills``).

The index line of a plane names the image (``file``), its plane number in arrival order
(``plane``) and, as ``offset``, its position in the acquisition's order (the flat index of
its (t, c, z) over the file's axes); ``nbytes`` and ``crc32`` are those of its pixels.
"""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from stream.protocol import FrameHeader
from stream.sinks.base import Recovered
from stream.sinks.tiff import (
    PlaneRecord,
    SinkError,
    _runs,
    check_new_sink,
    error_reason,
    fill_plane,
    fill_text,
    no_room,
)

log = logging.getLogger(__name__)

SUFFIX = ".ome.zarr"
#: The ome-writers backend: synchronous per-chunk writes (see the module's docstring).
BACKEND = "zarr-python"
#: Key of the root group's attributes that scopecast writes (beside NGFF's ``ome``).
NAMESPACE = "scopecast"
_AXES = ("t", "c", "z")
_TYPES = {"t": "time", "c": "channel", "z": "space"}
_DTYPES = ("uint8", "uint16", "uint32", "int8", "int16", "int32", "float32", "float64")


def _grid(sizes: dict[str, int]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The file's index axes and their sizes (the first one grows) from acquisition sizes."""
    axes = tuple(ax for ax in sizes if ax in _AXES and sizes[ax] >= 1)
    if not axes:
        return ("t",), (0,)
    if "t" not in axes:  # a single time point of a c/z acquisition: T counts passes
        axes = ("t", *axes)
    return axes, tuple(0 if i == 0 else int(sizes[ax]) for i, ax in enumerate(axes))


class OmeZarrSink:
    """One OME-Zarr image of planes of one shape and dtype; see the module's docstring."""

    def __init__(
        self,
        path: Path,
        *,
        pixel_size_um: float | None,
        description: str = "",
        fsync: bool = False,
    ) -> None:
        self.path = Path(path)
        check_new_sink(self.path, pixel_size_um)
        self.pixel_size_um = pixel_size_um
        self.description = description
        self.fsync = fsync
        self.planes = 0
        self.closed = False
        self.broken = ""
        self.shape: tuple[int, ...] | None = None
        self.dtype: np.dtype | None = None
        self.axes: tuple[str, ...] = ()
        self.counts: tuple[int, ...] = ()
        self._sizes: dict[str, int] | None = None
        self._arrival = False  # no acquisition sizes: T in arrival order
        self._cursor = 0  # the next flat position in acquisition order
        self._stream: Any = None
        self._channels: dict[int, str] = {}
        self._acquisitions: set[str] = set()
        self._notes: set[str] = set()
        self._producers: list[tuple[str, int]] = []
        self._fills: list[list[int]] = []
        self._raw: tuple[str, int] | None = None

    # -- what RunWriter tells an enhanced image ------------------------------------------

    def pairs_with(self, raw_file: str, first_plane: int = 0) -> None:
        """This (enhanced) image's plane i is plane ``first_plane + i`` of ``raw_file``."""
        self._raw = (raw_file, first_plane)

    def filled(self, plane: int) -> None:
        """Mark ``plane`` (already written) as a fill plane."""
        if self._fills and self._fills[-1][1] == plane - 1:
            self._fills[-1][1] = plane
        elif not self._fills or self._fills[-1][1] < plane:
            self._fills.append([plane, plane])
        else:
            raise ValueError(f"fill plane {plane} marked out of order (after {self._fills[-1]})")

    def fills(self) -> list[int]:
        return [n for first, last in self._fills for n in range(first, last + 1)]

    def produced_by(self, engine: str) -> None:
        """Name the engine that makes the planes written from now on."""
        if self._producers and self._producers[-1][1] == self.planes:
            self._producers.pop()
        if not self._producers or self._producers[-1][0] != engine:
            self._producers.append((engine, self.planes))

    # -- the Sink protocol ----------------------------------------------------------------

    def accepts(self, frame: np.ndarray) -> bool:
        """Whether ``frame`` has this image's shape and dtype (any frame fits an empty one)."""
        if self.shape is None or self.dtype is None:
            return True
        frame = np.asarray(frame)
        return _plane_shape(frame.shape) == self.shape and frame.dtype == self.dtype

    def takes(self, header: FrameHeader) -> bool:
        """Whether the frame of ``header`` has a place in this image that no plane took: the
        same acquisition sizes, an index within them, after every plane written so far."""
        if self._sizes is None:
            return True
        if dict(header.sizes) != self._sizes:
            return False
        if self._arrival:
            return True
        coords = self._coords(header)
        if any(not 0 <= v < n for v, n in zip(coords[1:], self.counts[1:], strict=True)):
            return False
        return coords[0] >= 0 and self._flat(coords) >= self._cursor

    def write(self, frame: np.ndarray, header: FrameHeader) -> PlaneRecord:
        """Write ``frame`` as the chunk at its header's (t, c, z); return its record once the
        chunk is in the OS (with ``fsync``: on disk)."""
        if self.closed:
            raise SinkError(
                f"{self.path} is closed: open a new sink to write more planes",
                path=self.path,
                planes=self.planes,
            )
        if self.broken:
            raise SinkError(
                f"{self.path} cannot take more planes ({self.broken}); its {self.planes} "
                "planes are intact: start a new image",
                path=self.path,
                planes=self.planes,
            )
        data = self._check(frame)
        if self._stream is None:
            self._open(data, header)
        if self._arrival:
            flat = self._cursor
        else:
            flat = self._flat(self._coords(header))
            if flat < self._cursor:  # never overwrite: RunWriter asks takes() first
                self._notes.add("some planes were placed after their acquisition position")
                flat = self._cursor
        try:
            if flat > self._cursor:
                self._stream.skip(frames=flat - self._cursor)
                self._cursor = flat
            self._stream.append(data)
            self._cursor = flat + 1
            if self.fsync:
                self._sync(flat)
        except Exception as e:
            self.broken = f"writing plane {self.planes} failed ({error_reason(e)})"
            advice = "free disk space" if no_room(e) else "check the disk"
            raise SinkError(
                f"{self.path}: {self.broken}; the {self.planes} planes written before are "
                f"intact: {advice}; the next frame goes to a new image",
                path=self.path,
                planes=self.planes,
                code=e.errno if isinstance(e, OSError) else None,
            ) from e
        self._remember(header)
        record = PlaneRecord(self.path.name, self.planes, flat, data.nbytes, zlib.crc32(data.data))
        self.planes += 1
        return record

    def close(self) -> None:
        """Finish the image and write scopecast's attributes; idempotent. SinkError, after
        closing, if the metadata could not be written (the planes stay readable)."""
        if self.closed:
            return
        self.closed = True
        if self._stream is None:
            return
        try:
            self._stream.close()
            self._stream.set_global_metadata(NAMESPACE, self.attributes(closed=True))
        except Exception as e:
            raise SinkError(
                f"{self.path}: finishing its metadata failed ({error_reason(e)}); its "
                f"{self.planes} planes are intact and readable (the run's index.jsonl says "
                "which are fills)",
                path=self.path,
                planes=self.planes,
                code=e.errno if isinstance(e, OSError) else None,
            ) from e

    def attributes(self, *, closed: bool) -> dict[str, Any]:
        """What the root group's ``scopecast`` attributes say (JSON)."""
        attrs: dict[str, Any] = {
            "closed": closed,
            "axes": list(self.axes),
            "planes": self.planes,
            "order": "arrival" if self._arrival else "acquisition",
            "pixel_size_um": self.pixel_size_um,
        }
        if self.description:
            attrs["description"] = self.description
        if not closed:
            attrs["note"] = (
                "not closed: every plane the run's index.jsonl lists is readable; the index "
                "says which enhanced planes are fills (`scopecast recover` writes them here)"
            )
        if self._channels:
            attrs["channels"] = [self._channels.get(c) for c in range(max(self._channels) + 1)]
        if len(self._acquisitions) == 1:
            attrs["acquisition"] = next(iter(self._acquisitions))
        if self._raw is not None:
            attrs["raw"] = self._raw[0]
            attrs["raw_first_plane"] = self._raw[1]
        if self._fills and self.dtype is not None:
            attrs["fills"] = _runs(self._fills)
            attrs["fill_value"] = fill_text(self.dtype)
            attrs["fill_note"] = (
                "planes (in arrival order) listed in fills hold no enhancement: their raw "
                f"frame was skipped or not enhanced; every pixel is {fill_text(self.dtype)}"
            )
        if self._producers:
            ranges = []
            for i, (engine, first) in enumerate(self._producers):
                nxt = self._producers[i + 1][1] if i + 1 < len(self._producers) else self.planes
                if nxt - 1 >= first:
                    ranges.append(f"{engine}: planes {first}..{nxt - 1}")
            attrs["engines"] = "; ".join(ranges)
        if self._notes:
            attrs["notes"] = sorted(self._notes)
        return attrs

    # -- internals --------------------------------------------------------------------------

    def _check(self, frame: np.ndarray) -> np.ndarray:
        frame = np.asarray(frame)
        if frame.ndim == 3 and frame.shape[2] == 1:
            frame = frame[..., 0]
        if frame.ndim != 2 or 0 in frame.shape:
            raise SinkError(
                f"{self.path}: frame shape {frame.shape} cannot be stored in OME-Zarr here; "
                "send (rows, cols) frames, or use --format ome-tiff for (rows, cols, "
                "components)",
                path=self.path,
                planes=self.planes,
            )
        if frame.dtype.name not in _DTYPES:
            raise SinkError(
                f"{self.path}: dtype {frame.dtype} cannot be stored; send one of "
                f"{', '.join(_DTYPES)}",
                path=self.path,
                planes=self.planes,
            )
        data = np.ascontiguousarray(frame, frame.dtype.newbyteorder("="))
        if self.shape is not None and (data.shape != self.shape or data.dtype != self.dtype):
            raise SinkError(
                f"{self.path}: frame {data.shape} {data.dtype} does not match this image's "
                f"{self.shape} {self.dtype}: start a new image for the new shape",
                path=self.path,
                planes=self.planes,
            )
        return data

    def _open(self, data: np.ndarray, header: FrameHeader) -> None:
        from ome_writers import AcquisitionSettings, Dimension, OmeZarrFormat, create_stream

        sizes = {k: int(v) for k, v in header.sizes.items()}
        self.axes, self.counts = _grid(sizes)
        self._arrival = not any(ax in _AXES and n >= 1 for ax, n in sizes.items())
        dims = [
            Dimension(name=ax, count=None if i == 0 else n, type=_TYPES[ax])
            for i, (ax, n) in enumerate(zip(self.axes, self.counts, strict=True))
        ]
        space: dict[str, Any] = {"type": "space"}
        if self.pixel_size_um is not None:
            space.update(unit="micrometer", scale=self.pixel_size_um)
        dims += [
            Dimension(name="y", count=data.shape[0], **space),
            Dimension(name="x", count=data.shape[1], **space),
        ]
        try:
            settings = AcquisitionSettings(
                root_path=str(self.path),
                dimensions=dims,
                dtype=data.dtype.name,
                format=OmeZarrFormat(backend=BACKEND),
                storage_order="ome",
                overwrite=False,
            )
            self._stream = create_stream(settings)
            self._sizes = sizes
            self.shape, self.dtype = data.shape, data.dtype
            self._stream.set_global_metadata(NAMESPACE, self.attributes(closed=False))
        except Exception as e:
            self._stream = None
            advice = "free disk space" if no_room(e) else "check the directory is writable"
            raise SinkError(
                f"cannot create {self.path} ({error_reason(e)}): {advice}; the next write retries",
                path=self.path,
                planes=0,
                code=e.errno if isinstance(e, OSError) else None,
            ) from e

    def _coords(self, header: FrameHeader) -> tuple[int, ...]:
        return tuple(int(header.index.get(ax, 0)) for ax in self.axes)

    def _flat(self, coords: tuple[int, ...]) -> int:
        flat = 0
        for i, (v, n) in enumerate(zip(coords, self.counts, strict=True)):
            flat = v if i == 0 else flat * n + v
        return flat

    def _storage(self, flat: int) -> tuple[int, ...]:
        """The (t, c, z) of the flat position ``flat``, in NGFF (storage) order."""
        coords = [0] * len(self.axes)
        for i in range(len(self.axes) - 1, 0, -1):
            flat, coords[i] = divmod(flat, self.counts[i])
        coords[0] = flat
        by_axis = dict(zip(self.axes, coords, strict=True))
        return tuple(by_axis[ax] for ax in _AXES if ax in by_axis)

    def _sync(self, flat: int) -> None:
        """fsync the plane's chunk file and the array's metadata."""
        chunk = self.path / "0" / "c"
        for v in self._storage(flat):
            chunk = chunk / str(v)
        for f in (chunk / "0" / "0", self.path / "0" / "zarr.json"):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _remember(self, header: FrameHeader) -> None:
        if header.channel is not None and "c" in self.axes:
            self._channels.setdefault(int(header.index.get("c", 0)), header.channel)
        if header.acquisition is not None:
            self._acquisitions.add(header.acquisition)
            if len(self._acquisitions) > 1:
                self._notes.add("planes come from more than one acquisition")


def _plane_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[:2] if len(shape) == 3 and shape[2] == 1 else tuple(shape)


def read_plane(path: Path, record: dict[str, Any]) -> np.ndarray:
    """The pixels of the plane an index line describes: a line of this image by its ``offset``
    (the flat position), a line of another format's file written with it (``--format
    ome-tiff --format ome-zarr``: the index names the first format's file) by its header's
    (t, c, z), or its plane number when the image is in arrival order."""
    import zarr

    path = Path(path)
    root = zarr.open_group(str(path), mode="r")
    array: Any = root["0"]
    attrs: dict[str, Any] = dict(root.attrs.get(NAMESPACE) or {})  # type: ignore[arg-type]
    axes: list[str] = list(attrs.get("axes") or ["t"])  # acquisition order
    order = [ax for ax in _AXES if ax in axes]  # storage (NGFF) order
    counts = {ax: array.shape[order.index(ax)] for ax in axes}
    if record.get("file") == path.name:
        flat = int(record["offset"])
    elif attrs.get("order") == "arrival":
        flat = int(record["plane"])
    else:
        index = record["header"].get("index", {})
        flat = 0
        for i, ax in enumerate(axes):
            flat = int(index.get(ax, 0)) if i == 0 else flat * counts[ax] + int(index.get(ax, 0))
    coords = {}
    for ax in reversed(axes[1:]):  # every axis but the first has the acquisition's size
        flat, coords[ax] = divmod(flat, counts[ax])
    coords[axes[0]] = flat
    return np.asarray(array[tuple(coords[ax] for ax in order)])


def recover_ome_zarr(
    path: Path, *, index: Path | None = None, output: Path | None = None
) -> Recovered:
    """Check every plane the run's index lists for ``path`` against its crc32 and write a
    closed copy (``NAME.recovered.ome.zarr``) with scopecast's attributes (fills, raw file)
    rebuilt from the index; a plane whose pixels are gone or wrong becomes a fill plane."""
    from stream.sinks.index import read_index
    from stream.sinks.recover import RecoverError
    from stream.sinks.store import INDEX_NAME

    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise RecoverError(f"{path} is not an OME-Zarr image (no zarr.json)")
    index_path = index or path.parent / INDEX_NAME
    records = sorted(
        (r for r in read_index(index_path) if r.get("file") == path.name),
        key=lambda r: r["plane"],
    )
    if not records:
        raise RecoverError(f"{path}: {index_path} lists none of its planes")
    output = output or path.with_name(path.name.removesuffix(SUFFIX) + ".recovered" + SUFFIX)
    raw = next((r["raw"]["file"] for r in records if r.get("raw")), None)
    size = records[0].get("pixel_size_um", records[0]["header"].get("pixel_size_um"))
    sink = OmeZarrSink(output, pixel_size_um=size, description=f"recovered from {path.name}")
    if raw is not None:
        sink.pairs_with(raw, int(records[0]["raw"]["plane"]))
    good = bad = filled = 0
    for r in records:
        header = FrameHeader.model_validate(r["header"])
        data = fill_plane(tuple(r["shape"]), r["dtype"])
        try:
            got = read_plane(path, r).reshape(r["shape"]).astype(r["dtype"], copy=False)
            ok = zlib.crc32(np.ascontiguousarray(got).data) == r["crc32"]
        except Exception:  # noqa: BLE001 - a missing chunk or metadata: that plane is lost
            ok = False
        if ok:
            data = got
        else:
            bad += 1
        if r.get("engine_id") or r.get("engine"):
            sink.produced_by(r.get("engine_id") or r["engine"])
        rec = sink.write(data, header)
        if r.get("fill") or not ok:
            sink.filled(rec.plane)
            filled += not ok
        good += ok
    sink.close()
    return Recovered(path, output, sink.planes, bad, True, filled=filled)
