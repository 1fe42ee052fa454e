"""The run's append-only JSONL index: one JSON object per line, each line handed to the OS whole."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from stream.sinks.tiff import SinkError


class CorruptIndex(ValueError):
    """An index line before the last one that is not a JSON object."""


class IndexWriter:
    """Append-only JSONL file, created new; each line reaches the OS (optionally the disk) whole."""

    def __init__(self, path: Path, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.lines = 0
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        except FileExistsError as e:
            raise SinkError(
                f"{self.path} already exists: an index is never appended to twice; "
                "write into a fresh run directory",
                path=self.path,
                code=e.errno,
            ) from e
        except OSError as e:
            raise SinkError(
                f"cannot create {self.path} ({e.strerror}): check the directory is "
                "writable and has free space",
                path=self.path,
                code=e.errno,
            ) from e

    def append(self, record: dict[str, Any]) -> None:
        """Write ``record`` as one line; on failure nothing of it stays in the file."""
        if self._fd < 0:
            raise SinkError(f"{self.path} is closed: open a new IndexWriter", path=self.path)
        line = (json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
        end = os.fstat(self._fd).st_size
        try:
            view = memoryview(line)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            if self.fsync:
                os.fsync(self._fd)
        except OSError as e:
            try:
                os.ftruncate(self._fd, end)  # no half line, so later lines stay readable
            except OSError:
                self.close()
                raise SinkError(
                    f"{self.path}: a half-written line could not be removed ({e}); "
                    "the index is closed, start a new run",
                    path=self.path,
                    code=e.errno,
                ) from e
            raise SinkError(
                f"{self.path}: index line {self.lines + 1} not written "
                f"({e.strerror}); free disk space, the next line retries",
                path=self.path,
                code=e.errno,
            ) from e
        self.lines += 1

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def read_index(path: Path) -> list[dict[str, Any]]:
    """Every record of an index; a cut-off last line (killed mid-write) is ignored."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"index {path} not found: pass the run's index.jsonl") from None
    lines = data.split(b"\n")
    records: list[dict[str, Any]] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        last = number == len(lines)  # no newline after it: the write may have been cut off
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if last:
                break
            raise CorruptIndex(
                f"{path}:{number}: not JSON ({e}); the index is damaged before "
                "its last line: recover files from their TIFF pages "
                "(scopecast recover without an index)"
            ) from e
        if not isinstance(obj, dict):
            if last:
                break
            raise CorruptIndex(
                f"{path}:{number}: a {type(obj).__name__}, not a JSON object; "
                "is this a scopecast index.jsonl?"
            )
        records.append(obj)
    return records
