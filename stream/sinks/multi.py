"""Several formats at once (``scopecast serve --format ome-tiff --format ome-zarr``): one sink
that writes every plane to one file of each format.

The sink name is the formats joined by ``+`` (``"ome-tiff+ome-zarr"``), which
:func:`~stream.sinks.base.sink_type` resolves into a row that opens this sink. RunWriter names
the files after the first format; each other format's file has the same name with its own
suffix (``scope_p000_raw.ome.tif`` and ``scope_p000_raw.ome.zarr``) and the same plane numbers.
The index line of a plane describes the first format's file; it is written once the plane is in
every format's file. Should a later format fail on a plane that the first one stored, the plane
stays recorded (its index line is written), the failure is logged and counted in ``lagging``,
and the set of files is marked broken so that the key continues in new files of every format.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from stream.protocol import FrameHeader
from stream.sinks.tiff import PlaneRecord, SinkError

log = logging.getLogger(__name__)


class TeeSink:
    """One file per format of ``rows``, written plane by plane together."""

    def __init__(
        self,
        rows: list[Any],  # stream.sinks.base.SinkType rows (base builds this sink)
        path: Path,
        *,
        pixel_size_um: float | None,
        description: str,
        fsync: bool,
    ) -> None:
        stem = path.name.removesuffix(rows[0].suffix)
        self.sinks: list[Any] = []  # Sink
        try:
            for row in rows:
                self.sinks.append(
                    row.open(
                        path.with_name(stem + row.suffix),
                        pixel_size_um=pixel_size_um,
                        description=description,
                        fsync=fsync,
                    )
                )
        except BaseException:
            for sink in self.sinks:
                sink.close()
            raise
        self.path = self.sinks[0].path
        self.paths = [s.path for s in self.sinks]
        self.suffixes = [row.suffix for row in rows]
        self.pixel_size_um = pixel_size_um
        self.lagging = 0  # planes a later format could not store
        self._broken = ""

    @property
    def planes(self) -> int:
        return self.sinks[0].planes

    @property
    def closed(self) -> bool:
        return all(s.closed for s in self.sinks)

    @property
    def broken(self) -> str:
        return self._broken or "; ".join(
            f"{s.path.name}: {s.broken}" for s in self.sinks if s.broken
        )

    def accepts(self, frame: np.ndarray) -> bool:
        return all(s.accepts(frame) for s in self.sinks)

    def takes(self, header: FrameHeader) -> bool:
        return all(getattr(s, "takes", None) is None or s.takes(header) for s in self.sinks)

    def write(self, frame: np.ndarray, header: FrameHeader) -> PlaneRecord:
        record = self.sinks[0].write(frame, header)  # a SinkError here: nothing was stored
        for sink in self.sinks[1:]:
            try:
                sink.write(frame, header)
            except SinkError as e:
                self.lagging += 1
                self._broken = f"{sink.path.name} lacks plane {record.plane} ({e})"
                log.warning("%s; the key goes on in new files", self._broken)
        return record

    def pairs_with(self, raw_file: str, first_plane: int = 0) -> None:
        stem = raw_file.removesuffix(self.suffixes[0])
        for sink, suffix in zip(self.sinks, self.suffixes, strict=True):
            if pairs := getattr(sink, "pairs_with", None):
                pairs(stem + suffix, first_plane)

    def filled(self, plane: int) -> None:
        self._each("filled", plane)

    def produced_by(self, engine: str) -> None:
        self._each("produced_by", engine)

    def close(self) -> None:
        errors = []
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001 - close every format, then report
                errors.append(str(e))
        if errors:
            raise SinkError("; ".join(errors), path=self.path)

    def _each(self, method: str, *args: Any) -> None:
        for sink in self.sinks:
            if fn := getattr(sink, method, None):
                fn(*args)
