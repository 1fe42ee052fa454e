"""What a disk sink is, and the table of sinks: name -> opener, file suffix, recover.

:class:`~stream.sinks.store.RunWriter` opens one sink per (stream, position, grid tile, kind)
through :data:`SINKS` and :func:`~stream.sinks.recover.recover` rebuilds a file through the
row its suffix names, so a new format is one module (a class that fits :class:`Sink` and a
recover function) plus one :func:`register_sink` row. The OME-TIFF row is in
``stream/sinks/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from calibration.errors import InvalidInput
from stream.protocol import FrameHeader
from stream.sinks.tiff import PlaneRecord

DEFAULT_SINK = "ome-tiff"


class Sink(Protocol):
    """One growing file of planes of one shape and dtype, written so that a killed process
    loses at most the plane being written (what RunWriter writes through).

    ``write`` raises SinkError on a disk error (the planes before stay intact, a later write
    may retry); ``broken`` says why no plane can be appended any more ("" while usable), and
    RunWriter then continues the key in a new file, as it does when ``accepts`` is false.
    ``close`` writes the final metadata (idempotent); a file never closed is what ``recover``
    is for. A sink may also have ``produced_by(engine: str)``: RunWriter calls it before each
    enhanced plane with the engine that made it (``name@version:sha``), for the sink to record
    which engine made which planes (OME-TIFF: ``scopecast.engines`` in its OME-XML). An
    enhanced file lines up with its raw file: RunWriter writes a fill plane
    (:func:`~stream.sinks.tiff.fill_plane`) where a raw frame got no enhancement, and tells a
    sink that has them ``pairs_with(raw_file: str, first_plane: int)`` once before its first
    plane and ``filled(plane: int)`` after each fill plane, for its metadata to say so. A sink
    whose planes have places of their own (OME-Zarr: the acquisition's (t, c, z)) may have
    ``takes(header) -> bool``: false for a raw frame that has no free place in it, and RunWriter
    continues the key in a new file, as for ``accepts``.
    """

    path: Path
    pixel_size_um: float | None
    planes: int
    closed: bool
    broken: str

    def write(self, frame: np.ndarray, header: FrameHeader) -> PlaneRecord: ...

    def accepts(self, frame: np.ndarray) -> bool: ...

    def close(self) -> None: ...


class SinkOpener(Protocol):
    """Creates a new file at ``path`` (SinkError if it exists: recorded data are never
    overwritten); usually the sink class itself."""

    def __call__(
        self, path: Path, *, pixel_size_um: float | None, description: str, fsync: bool
    ) -> Sink: ...


@dataclass
class Recovered:
    """What :func:`recover` wrote: ``planes`` good planes; ``bad_crc`` and ``missing`` skipped.

    ``damaged`` counts index lines (or records) that could not be used, ``unindexed`` the
    planes taken from the file's pages because no good index line described them, ``filled``
    the lost planes (bad crc32, cut off, no record) before the last good one that were written
    as fill planes, so that every later plane keeps its number (raw and enhanced stay aligned).
    """

    source: Path
    output: Path
    planes: int
    bad_crc: int
    from_index: bool
    missing: int = 0
    damaged: int = 0
    unindexed: int = 0
    filled: int = 0


class Recoverer(Protocol):
    """Rebuilds a readable file from one its sink left unclosed, using the run's index
    (``index``; None: the one beside ``path``) and writing ``output`` (None: its own name
    beside ``path``); never changes ``path``."""

    def __call__(
        self, path: Path, *, index: Path | None = None, output: Path | None = None
    ) -> Recovered: ...


@dataclass(frozen=True)
class SinkType:
    """One row of :data:`SINKS`."""

    name: str
    open: SinkOpener
    suffix: str  # of every file it writes, e.g. ".ome.tif"; recover finds the row by it
    recover: Recoverer


#: Sinks by name, in registration order.
SINKS: dict[str, SinkType] = {}


def register_sink(
    name: str, open: SinkOpener | Callable[..., Sink], *, suffix: str, recover: Recoverer
) -> SinkType:
    """Add (or replace) the sink ``name``; its files end in ``suffix``."""
    if not suffix.startswith(".") or any(
        t.suffix.lower() == suffix.lower() and t.name != name for t in SINKS.values()
    ):
        raise ValueError(
            f"sink {name!r}: suffix {suffix!r} must start with '.' and not be another "
            f"sink's ({', '.join(f'{t.name} {t.suffix}' for t in SINKS.values())})"
        )
    SINKS[name] = row = SinkType(name, open, suffix, recover)
    return row


def sink_type(name: str) -> SinkType:
    """The row ``name``; InvalidInput (a ValueError) naming the known sinks if there is none.
    Names joined by "+" (``"ome-tiff+ome-zarr"``) give a row that writes every format
    (:mod:`stream.sinks.multi`)."""
    if "+" in name:
        return _tee_type([sink_type(part) for part in name.split("+")])
    try:
        return SINKS[name]
    except KeyError:
        raise InvalidInput(
            f"unknown sink {name!r}: choose one of {', '.join(SINKS) or 'none registered'}"
        ) from None


def sink_for_file(path: Path) -> SinkType:
    """The row whose suffix ``path``'s name ends with (the longest match), else the default
    sink's (whose recover explains what is wrong with a file that is none of them)."""
    name = Path(path).name.lower()
    matches = [t for t in SINKS.values() if name.endswith(t.suffix.lower())]
    return max(matches, key=lambda t: len(t.suffix)) if matches else sink_type(DEFAULT_SINK)


def _tee_type(rows: list[SinkType]) -> SinkType:
    """A row that writes every plane through each of ``rows``; the first names the files and
    recovers them (:class:`~stream.sinks.multi.TeeSink`)."""
    names = [r.name for r in rows]
    if dup := next((n for i, n in enumerate(names) if n in names[:i]), None):
        raise InvalidInput(f"format {dup!r} named twice: name each format once")

    def open_tee(path: Path, *, pixel_size_um: float | None, description: str, fsync: bool):
        from stream.sinks.multi import TeeSink

        return TeeSink(
            rows, Path(path), pixel_size_um=pixel_size_um, description=description, fsync=fsync
        )

    return SinkType("+".join(names), open_tee, rows[0].suffix, rows[0].recover)
