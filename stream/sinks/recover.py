"""Rebuild a readable OME-TIFF from a file left by a crash (SIGKILL, power loss, full disk).

The run's index says where every completed plane lies and its crc32; each plane is read
back, checked, and written through :class:`OmeTiffSink` (the same metadata logic as a live
run) to ``<name>.recovered.ome.tif``. The damaged original is never changed.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from stream.protocol import FrameHeader
from stream.sinks.index import read_index
from stream.sinks.store import INDEX_NAME
from stream.sinks.tiff import PLACEHOLDER_PREFIX, SOFTWARE, OmeTiffSink

BIGTIFF_LE = b"II+\x00\x08\x00\x00\x00"
_SUFFIX = re.compile(r"(\.ome)?\.tiff?$", re.IGNORECASE)


@dataclass
class Recovered:
    """What :func:`recover` wrote: ``planes`` good planes; ``bad_crc`` and ``missing`` skipped."""

    source: Path
    output: Path
    planes: int
    bad_crc: int
    from_index: bool
    missing: int = 0


def recover(path: Path, *, index: Path | None = None, output: Path | None = None) -> Recovered:
    """Write ``<name>.recovered.ome.tif`` beside ``path`` from its index records (or pages)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: pass a scopecast OME-TIFF such as run-.../cam_p000_raw.ome.tif"
        )
    output = (
        Path(output)
        if output is not None
        else path.with_name(_SUFFIX.sub("", path.name) + ".recovered.ome.tif")
    )
    if output.exists():
        raise FileExistsError(
            f"{output} exists: recover never overwrites; remove it or pass another output"
        )
    index_path = Path(index) if index is not None else path.parent / INDEX_NAME
    if index is not None and not index_path.is_file():
        raise FileNotFoundError(
            f"index {index_path} not found: pass the run's {INDEX_NAME}, "
            "or no index to recover from the file's own pages"
        )
    records = []
    if index_path.is_file():
        records = [r for r in read_index(index_path) if r.get("file") == path.name]
    if records:
        return _from_index(path, records, output)
    return _from_pages(path, output, index_path)


def _from_index(path: Path, records: list[dict[str, Any]], output: Path) -> Recovered:
    with path.open("rb") as f:
        if f.read(len(BIGTIFF_LE)) != BIGTIFF_LE:
            raise ValueError(
                f"{path} is not a scopecast file (no little-endian BigTIFF header) "
                "although the index lists it: check you passed the right file"
            )
        planes: dict[int, tuple[np.ndarray, FrameHeader]] = {}
        bad = missing = 0
        for r in sorted(records, key=lambda r: int(r["plane"])):
            if r["plane"] in planes:
                continue
            f.seek(int(r["offset"]))
            data = f.read(int(r["nbytes"]))
            if len(data) < int(r["nbytes"]):
                missing += 1
                continue
            if zlib.crc32(data) != int(r["crc32"]):
                bad += 1
                continue
            dtype = np.dtype(r["dtype"]).newbyteorder("<")
            frame = np.frombuffer(data, dtype).reshape(r["shape"])
            planes[r["plane"]] = frame, FrameHeader.model_validate(r["header"])
    if not planes:
        raise ValueError(
            f"no plane of {path} could be recovered: {len(records)} index records, "
            f"{bad} with a wrong crc32, {missing} beyond the end of the file"
        )
    first = records[0]
    size = (
        first["pixel_size_um"] if "pixel_size_um" in first else first["header"].get("pixel_size_um")
    )
    note = f"recovered by scopecast from {path.name} and its index"
    if bad or missing:
        note += f"; skipped {bad} planes with a wrong crc32 and {missing} cut-off planes"
    written = _write(output, [planes[k] for k in sorted(planes)], size, note)
    return Recovered(path, output, written, bad, True, missing)


def _from_pages(path: Path, output: Path, index_path: Path) -> Recovered:
    try:
        tif = tifffile.TiffFile(path)
    except Exception as e:
        raise ValueError(
            f"{path}: the index {index_path} has no record of it and tifffile "
            f"cannot read it ({e}): nothing to recover from"
        ) from e
    with tif:
        first = tif.pages.first
        if first.software != SOFTWARE:
            raise ValueError(
                f"{path} was not written by scopecast (Software tag "
                f"{first.software!r}): recover only rebuilds scopecast files"
            )
        size = _pixel_size(first.description, tif)
        planes: list[tuple[np.ndarray, FrameHeader]] = []
        while True:
            try:
                frame = tif.pages[len(planes)].asarray()  # type: ignore[union-attr]
            except Exception:  # end of the chain, or the page cut off by the crash
                break
            if (
                frame.ndim != 2
                or frame.size == 0
                or (
                    planes
                    and (frame.shape, frame.dtype) != (planes[0][0].shape, planes[0][0].dtype)
                )
            ):
                break  # an empty IFD: the page being written when the process died
            header = FrameHeader.model_validate(
                {
                    "stream": "recovered",
                    "seq": len(planes),
                    "shape": frame.shape,
                    "dtype": frame.dtype.name,
                    "mono_ns": 0,
                    "wall_time": 0.0,
                }
            )
            planes.append((frame, header))
    note = f"recovered by scopecast from the readable pages of {path.name} (no index)"
    written = _write(output, planes, size, note)
    return Recovered(path, output, written, 0, False)


def _write(
    output: Path, planes: list[tuple[np.ndarray, FrameHeader]], size: float | None, note: str
) -> int:
    sink = OmeTiffSink(output, pixel_size_um=size, description=note)
    try:
        for frame, header in planes:
            sink.write(frame, header)
    finally:
        sink.close()
    return sink.planes


def _pixel_size(description: str, tif: tifffile.TiffFile) -> float | None:
    prefix = PLACEHOLDER_PREFIX.decode()
    if description.startswith(prefix):
        try:
            return json.loads(description[len(prefix) :]).get("pixel_size_um")
        except (json.JSONDecodeError, AttributeError):
            return None
    if tif.is_ome and tif.ome_metadata:
        match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
        return float(match.group(1)) if match else None
    return None
