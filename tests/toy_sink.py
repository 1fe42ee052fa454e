"""A toy sink (tests only): planes back to back in one flat binary file, shape and dtype in a
JSON sidecar written at close; recover rebuilds both from the run's index."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from stream.sinks import PlaneRecord, Recovered, SinkError, read_index
from stream.sinks.recover import RecoverError
from stream.sinks.store import INDEX_NAME

SUFFIX = ".flat"


class FlatSink:
    def __init__(self, path: Path, *, pixel_size_um=None, description="", fsync=False) -> None:
        self.path, self.pixel_size_um = Path(path), pixel_size_um
        self.planes, self.closed, self.broken = 0, False, ""
        self.shape = self.dtype = None
        try:
            self._file = open(self.path, "xb", buffering=0)  # noqa: SIM115 - open until close()
        except OSError as e:
            raise SinkError(f"{self.path}: {e.strerror}", path=self.path, code=e.errno) from e

    def accepts(self, frame: np.ndarray) -> bool:
        return self.shape is None or (frame.shape, frame.dtype) == (self.shape, self.dtype)

    def write(self, frame: np.ndarray, header) -> PlaneRecord:
        data = np.ascontiguousarray(frame).tobytes()
        offset = self._file.tell()
        try:
            self._file.write(data)
        except OSError as e:
            self._file.truncate(offset)
            raise SinkError(f"{self.path}: {e.strerror}", path=self.path, code=e.errno) from e
        self.shape, self.dtype = frame.shape, frame.dtype
        self.planes += 1
        return PlaneRecord(self.path.name, self.planes - 1, offset, len(data), zlib.crc32(data))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._file.close()
            meta = {"shape": self.shape, "dtype": str(self.dtype), "planes": self.planes}
            Path(f"{self.path}.json").write_text(json.dumps(meta))


def read_flat(path: Path) -> np.ndarray:
    """Every plane of a closed flat file, stacked."""
    meta = json.loads(Path(f"{path}.json").read_text())
    data = np.fromfile(path, dtype=meta["dtype"])
    return data.reshape(meta["planes"], *meta["shape"])


def recover_flat(path: Path, *, index: Path | None = None, output: Path | None = None):
    records = [r for r in read_index(index or path.parent / INDEX_NAME) if r["file"] == path.name]
    output = output or path.with_name(path.name.removesuffix(SUFFIX) + ".recovered" + SUFFIX)
    data, good, bad, missing = path.read_bytes(), [], 0, 0
    for r in sorted(records, key=lambda r: r["plane"]):
        chunk = data[r["offset"] : r["offset"] + r["nbytes"]]
        if len(chunk) < r["nbytes"]:
            missing += 1
        elif zlib.crc32(chunk) != r["crc32"]:
            bad += 1
        else:
            good.append(np.frombuffer(chunk, r["dtype"]).reshape(r["shape"]))
    if not good:
        raise RecoverError(f"{path}: no plane of its {len(records)} index records is intact")
    sink = FlatSink(output)
    for frame in good:
        sink.write(frame, None)
    sink.close()
    return Recovered(path, output, len(good), bad, True, missing)
