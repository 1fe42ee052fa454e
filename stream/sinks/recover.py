"""Rebuild a readable file from one left by a crash (SIGKILL, power loss, full disk).

:func:`recover` hands the file to the recover function of the sink that wrote it (by its
suffix, see :data:`stream.sinks.base.SINKS`); this module holds the OME-TIFF one,
:func:`recover_ome_tiff`. The run's index says where every completed plane lies and its
crc32; each plane is read back, checked, and written through :class:`OmeTiffSink` (the same
metadata logic as a live run) to ``<name>.recovered.ome.tif``. Damaged index lines are
skipped and counted; a plane they leave without a record is taken from the file's own pages.
Every plane keeps its number, so a recovered raw file and its recovered enhanced file still line
up: a lost plane before the last good one (wrong crc32, cut off, no record and no readable page)
becomes a fill plane, and an enhanced file's fill planes (index lines with ``fill``) are written
as fills again (rebuilt from their record if their bytes are gone); ``scopecast.fills`` lists
both. Without an index the file's complete pages are used. The damaged original is never changed.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import zlib
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from pydantic import ValidationError

from calibration.errors import ScopecastError
from stream.protocol import FrameHeader, StagePosition
from stream.sinks.base import Recovered, sink_for_file, sink_type
from stream.sinks.index import scan_index
from stream.sinks.store import INDEX_NAME
from stream.sinks.tiff import (
    MAX_COMPONENTS,
    PLACEHOLDER_PREFIX,
    SOFTWARE,
    OmeTiffSink,
    SinkError,
    error_reason,
    fill_plane,
    no_room,
)

BIGTIFF_LE = b"II+\x00\x08\x00\x00\x00"
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_SUFFIX = re.compile(r"(\.ome)?\.tiff?$", re.IGNORECASE)
_EXAMPLE = "a file scopecast wrote, such as run-.../cam_p000_raw.ome.tif"

Plane = tuple[np.ndarray, FrameHeader]


class RecoverError(ScopecastError, ValueError):
    """A file recover cannot rebuild: says which file, why, and what to do."""


def recover(
    path: Path,
    *,
    index: Path | None = None,
    output: Path | None = None,
    sink: str | None = None,
) -> Recovered:
    """Rebuild ``path`` with the recover function of the sink that wrote it: the one named
    ``sink``, else the one whose file suffix ``path`` has (OME-TIFF when none has)."""
    row = sink_type(sink) if sink is not None else sink_for_file(Path(path))
    return row.recover(Path(path), index=index, output=output)


def recover_ome_tiff(
    path: Path, *, index: Path | None = None, output: Path | None = None
) -> Recovered:
    """Write ``<name>.recovered.ome.tif`` beside ``path`` from its index records (or pages).

    Raises RecoverError (a ValueError) when nothing can be recovered, OSError (SinkError,
    FileNotFoundError, FileExistsError) for a missing file or a failing disk.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "not found"
        raise FileNotFoundError(f"{path} {what}: pass {_EXAMPLE}")
    output = (
        Path(output)
        if output is not None
        else path.with_name(_SUFFIX.sub("", path.name) + ".recovered.ome.tif")
    )
    if output.exists():
        raise FileExistsError(
            f"{output} exists: recover never overwrites; remove or rename it, then run again"
        )
    size = path.stat().st_size
    if size == 0:
        raise RecoverError(
            f"{path} is empty (0 bytes): no plane was ever written to it, nothing to recover; "
            "delete it"
        )
    index_path = Path(index) if index is not None else path.parent / INDEX_NAME
    if index is not None and not index_path.is_file():
        raise FileNotFoundError(
            f"index {index_path} not found: pass the run's {INDEX_NAME} with --index, or "
            "leave --index out to use the one beside the file (or, with none, its own pages)"
        )
    records: list[dict[str, Any]] = []
    damaged = 0
    if index_path.is_file():
        scan = scan_index(index_path)
        records = [r for r in scan.records if r.get("file") == path.name]
        damaged = scan.damaged
    with _quiet_tifffile():
        if records:
            return _from_index(path, index_path, records, output, damaged)
        return _from_pages(path, output, index_path, damaged)


def _from_index(
    path: Path, index_path: Path, records: list[dict[str, Any]], output: Path, damaged: int
) -> Recovered:
    with path.open("rb") as f:
        if f.read(len(BIGTIFF_LE)) != BIGTIFF_LE:
            raise RecoverError(
                f"{path} is not a scopecast file (no little-endian BigTIFF header) although "
                f"{index_path} lists it: check you passed the right file and index"
            )
        end = path.stat().st_size
        planes: dict[int, Plane] = {}
        producers: dict[int, str] = {}  # plane -> the engine that made it (enhanced files)
        fills: set[int] = set()  # planes written as fills (no enhancement, or lost)
        lost: dict[int, dict[str, Any]] = {}  # listed planes whose pixels are gone: records
        pairing: tuple[str, int] | None = None  # (raw file, its plane for plane 0)
        listed: set[int] = set()
        bad = missing = 0
        kind: tuple[tuple[int, ...], np.dtype] | None = None
        for r in sorted(records, key=_plane_number):
            where = _where(r)
            if where is None:
                damaged += 1  # a JSON object that is not a usable plane record
                continue
            number, offset, nbytes, crc, shape, dtype = where
            if number in listed:
                continue
            if kind is not None and (shape, dtype) != kind:
                damaged += 1  # one file holds one shape: this record is not about it
                continue
            listed.add(number)
            is_fill = r.get("fill") is True
            f.seek(offset)
            data = f.read(nbytes) if offset + nbytes <= end else b""
            if len(data) == nbytes and zlib.crc32(data) == crc:
                frame = np.frombuffer(data, dtype).reshape(shape)
            elif is_fill:  # a fill holds nothing: rebuilt from its record
                frame = fill_plane(shape, dtype)
            else:
                missing += offset + nbytes > end
                bad += offset + nbytes <= end
                lost[number] = r
                continue
            kind = shape, dtype
            planes[number] = frame, _header(r.get("header"), number, frame)
            if is_fill:
                fills.add(number)
            elif r.get("kind") == "enhanced" and isinstance(made := r.get("engine_id"), str):
                producers[number] = made
            if pairing is None and r.get("kind") == "enhanced":
                pairing = _pairing(r, number)
    unindexed = _unlisted_pages(path, listed, kind) if planes else {}
    planes.update(unindexed)
    filled = 0
    if planes and kind is not None:  # lost planes before the last good one keep their place
        for number in range(max(planes)):
            if number not in planes:
                frame = fill_plane(*kind)
                planes[number] = frame, _header((lost.get(number) or {}).get("header"), number,
                                                frame)  # fmt: skip
                fills.add(number)
                filled += 1
    if not planes:
        raise RecoverError(
            f"no plane of {path} could be recovered: {len(records)} records in {index_path}, "
            f"{bad} with a wrong crc32, {missing} beyond the end of the file, {damaged} "
            "damaged: check the file is the one the index describes"
        )
    first = records[0]
    size = _pixel_size_value(first.get("pixel_size_um", (first.get("header") or {})))
    note = f"recovered by scopecast from {path.name} and its index"
    if bad or missing:
        note += f"; {bad} planes with a wrong crc32 and {missing} cut-off planes"
    if filled:
        note += (
            f"; {filled} lost planes before the last good one are fill planes, so that every "
            "later plane keeps its number (raw and enhanced files still line up)"
        )
    if unindexed:
        note += (
            f"; {len(unindexed)} planes without a good index line were taken from the file's "
            "pages (their time, channel and position are unknown)"
        )
    order = sorted(planes)
    made = [producers.get(k, "unknown") for k in order] if producers else None
    written = _write(
        path, output, [planes[k] for k in order], size, note, made, fills=fills, pairing=pairing
    )
    return Recovered(path, output, written, bad, True, missing, damaged, len(unindexed), filled)


def _pairing(r: dict[str, Any], number: int) -> tuple[str, int] | None:
    """(raw file, its plane for this file's plane 0) from an enhanced index record."""
    raw = r.get("raw")
    if not isinstance(raw, dict) or _text(raw.get("file")) is None:
        return None
    try:
        first = int(raw["plane"]) - number
    except (KeyError, TypeError, ValueError):
        return None
    return (raw["file"], first) if first >= 0 else None


def _from_pages(path: Path, output: Path, index_path: Path, damaged: int) -> Recovered:
    known = (
        f"{index_path} has no record of it"
        if index_path.is_file()
        else f"there is no {INDEX_NAME} beside it"
    )
    with path.open("rb") as f:
        magic = f.read(4)
    if magic not in TIFF_MAGIC:
        raise RecoverError(
            f"{path} is not a TIFF file (no TIFF header) and {known}: nothing to recover; "
            f"pass {_EXAMPLE}"
        )
    try:
        tif = tifffile.TiffFile(path)
    except Exception as e:
        raise RecoverError(
            f"{path}: its TIFF structure cannot be read ({e or type(e).__name__}) and "
            f"{known}: nothing to recover; pass {_EXAMPLE}"
        ) from e
    with tif:
        try:
            first = tif.pages.first
            software = first.software
            description = first.description
        except Exception as e:
            raise RecoverError(
                f"{path}: its first page cannot be read ({e}) and {known}: nothing to recover"
            ) from e
        if software != SOFTWARE:
            raise RecoverError(
                f"{path} was not written by scopecast (Software tag {software!r}): it needs no "
                "recovery, open it with any TIFF reader; recover rebuilds scopecast files only"
            )
        size = _pixel_size(description, tif)
        planes = [plane for _, plane in _pages(tif, itertools.count(), None)]
    if not planes:
        raise RecoverError(
            f"{path}: no complete page to recover and {known}: the process died while "
            "writing its first plane"
        )
    note = f"recovered by scopecast from the readable pages of {path.name} (no index)"
    written = _write(path, output, planes, size, note)
    return Recovered(path, output, written, 0, False, damaged=damaged)


def _unlisted_pages(
    path: Path, listed: set[int], kind: tuple[tuple[int, ...], np.dtype] | None
) -> dict[int, Plane]:
    """Planes before the last listed one that no good index line describes (a damaged line,
    or an index line a full disk refused), read from the file's pages."""
    gaps = [n for n in range(max(listed)) if n not in listed]
    if not gaps or kind is None:
        return {}
    try:
        with tifffile.TiffFile(path) as tif:
            return dict(_pages(tif, gaps, kind))
    except Exception:  # noqa: BLE001 - the pages are a second source; the index's planes stand
        return {}


def _pages(
    tif: tifffile.TiffFile,
    numbers: Iterable[int],
    kind: tuple[tuple[int, ...], np.dtype] | None,
) -> Iterator[tuple[int, Plane]]:
    """The complete planes of pages ``numbers`` of ``tif``, stopping at the first page that
    cannot be read, lies beyond the file's end, or has another shape than ``kind`` (the
    first page's if None)."""
    size = tif.filehandle.size
    for n in numbers:
        try:
            page = tif.pages[n]
            if not isinstance(page, tifffile.TiffPage) or any(
                o + c > size for o, c in zip(page.dataoffsets, page.databytecounts, strict=True)
            ):
                return  # an empty IFD or cut-off pixels: the page being written at the crash
            frame = page.asarray()
        except Exception:  # noqa: BLE001 - the end of the chain, or a page damaged by the crash
            return
        if kind is None:
            if not _storable(frame.shape) or frame.dtype.kind not in "uif":
                return
            kind = frame.shape, frame.dtype
        if frame.size != int(np.prod(kind[0])) or frame.dtype != kind[1]:
            return
        frame = frame.reshape(kind[0])
        yield n, (frame, _header(None, n, frame))


def _storable(shape: tuple[int, ...]) -> bool:
    """Whether a sink stores planes of ``shape``: (rows, cols) or (rows, cols, 1-4)."""
    return (
        len(shape) in (2, 3) and min(shape) > 0 and (len(shape) == 2 or shape[2] <= MAX_COMPONENTS)
    )


def _where(r: dict[str, Any]) -> tuple[int, int, int, int, tuple[int, ...], np.dtype] | None:
    """(plane, offset, nbytes, crc32, shape, dtype) of an index record, or None if unusable."""
    try:
        number, offset, nbytes, crc = (int(r[k]) for k in ("plane", "offset", "nbytes", "crc32"))
        shape = tuple(int(s) for s in r["shape"])
        dtype = np.dtype(str(r["dtype"])).newbyteorder("<")
    except (KeyError, TypeError, ValueError):
        return None
    ok = (
        min(number, offset) >= 0
        and _storable(shape)
        and dtype.kind in "uif"
        and nbytes == int(np.prod(shape)) * dtype.itemsize
    )
    return (number, offset, nbytes, crc, shape, dtype) if ok else None


def _plane_number(r: dict[str, Any]) -> int:
    try:
        return int(r["plane"])
    except (KeyError, TypeError, ValueError):
        return -1


def _header(raw: Any, number: int, frame: np.ndarray) -> FrameHeader:
    """The frame header an index record holds or, if it is not valid, what of it is:
    missing or non-finite times, exposures and stage values become unknown."""
    if raw is not None:
        try:
            return FrameHeader.model_validate(raw)
        except ValidationError:
            pass
    raw = raw if isinstance(raw, dict) else {}
    stage = raw.get("stage")
    return FrameHeader.model_construct(
        stream=_text(raw.get("stream")) or "recovered",
        seq=number,
        index=_axes(raw.get("index")),
        shape=frame.shape,
        dtype=frame.dtype.name,
        mono_ns=0,
        # unvalidated on purpose: a lost wall time stays None (FrameHeader would refuse it;
        # the TIFF writer, this header's only reader, writes it as unknown)
        wall_time=_number(raw.get("wall_time")),  # type: ignore[arg-type]
        exposure_ms=_number(raw.get("exposure_ms")),
        stage=(
            StagePosition.model_construct(
                x=_number(stage.get("x")), y=_number(stage.get("y")), z=_number(stage.get("z"))
            )
            if isinstance(stage, dict)
            else None
        ),
        channel=_text(raw.get("channel")),
        acquisition=_text(raw.get("acquisition")),
        sizes=_axes(raw.get("sizes")),
    )


def _number(v: Any) -> float | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def _text(v: Any) -> str | None:
    return v if isinstance(v, str) and len(v) <= 256 and v.isprintable() else None


def _axes(v: Any) -> dict[str, int]:
    if not isinstance(v, dict):
        return {}
    return {
        k: n
        for k, n in v.items()
        if isinstance(k, str) and isinstance(n, int) and not isinstance(n, bool) and n >= 0
    }


def _write(
    source: Path,
    output: Path,
    planes: list[Plane],
    size: float | None,
    note: str,
    producers: list[str] | None = None,
    *,
    fills: Collection[int] = (),
    pairing: tuple[str, int] | None = None,
) -> int:
    """Write ``planes`` to a new ``output`` (``producers``: the engine that made each, from
    the index; ``fills``: which are fill planes; ``pairing``: the raw file an enhanced file
    lines up with); on failure remove it (the source is untouched)."""
    sink = OmeTiffSink(output, pixel_size_um=size, description=note)
    if pairing is not None:
        sink.pairs_with(*pairing)
    try:
        for i, (frame, header) in enumerate(planes):
            if producers is not None and i not in fills:
                sink.produced_by(producers[i])
            sink.write(frame, header)
            if i in fills:
                sink.filled(i)
        sink.close()
    except SinkError as e:
        with suppress(SinkError):
            sink.close()
        output.unlink(missing_ok=True)
        cause = e.__cause__ or e
        advice = (
            "free disk space and run `scopecast recover` again"
            if no_room(cause)
            else f"report this error ({e})"
        )
        raise SinkError(
            f"recovering {source} failed ({error_reason(cause)}) while writing {output}; it was "
            f"removed and {source} is unchanged: {advice}",
            path=output,
            code=e.errno,
        ) from e
    return sink.planes


def _pixel_size(description: str, tif: tifffile.TiffFile) -> float | None:
    prefix = PLACEHOLDER_PREFIX.decode()
    if description.startswith(prefix):
        try:
            info = json.loads(description[len(prefix) :])
        except json.JSONDecodeError:
            return None
        return _pixel_size_value(info)
    if tif.is_ome and tif.ome_metadata:
        match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
        return _pixel_size_value(match.group(1)) if match else None
    return None


def _pixel_size_value(v: Any) -> float | None:
    """A usable pixel size (finite, > 0) from a number, a numeric string or a dict holding
    ``pixel_size_um``; None otherwise."""
    if isinstance(v, dict):
        v = v.get("pixel_size_um")
    try:
        size = float(v)
    except (TypeError, ValueError):
        return None
    return size if math.isfinite(size) and size > 0 else None


@contextmanager
def _quiet_tifffile():
    """tifffile logs a warning for every odd page of a damaged file; recover reports its own
    findings instead, so a damaged file gives one clear message, not a screenful."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.ERROR + 1)
    try:
        yield
    finally:
        logger.setLevel(level)
