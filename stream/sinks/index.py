"""The run's append-only JSONL index: one JSON object per line, each line handed to the OS whole."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

from calibration.errors import ScopecastError
from stream.sinks.tiff import SinkError


class CorruptIndex(ScopecastError, ValueError):
    """An index line before the last one that is not a JSON object."""


#: How many damaged lines an :class:`IndexScan` describes (it counts them all).
MAX_PROBLEMS = 10


class IndexScan(NamedTuple):
    """An index read line by line: its good records, and its damaged lines counted."""

    records: list[dict[str, Any]]
    damaged: int  # lines before the last that are not JSON objects
    problems: list[str]  # what was wrong with the first few, e.g. "index.jsonl:7: not JSON"


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
        line = (_dumps(record) + "\n").encode()
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


def _dumps(record: dict[str, Any]) -> str:
    """``record`` as one line of standard JSON: NaN and infinities (which JSON lacks) become
    null, numpy numbers and arrays plain numbers and lists, anything else its text."""
    options: dict[str, Any] = {"separators": (",", ":"), "ensure_ascii": False}
    try:
        return json.dumps(record, allow_nan=False, default=_plain, **options)
    except ValueError:
        return json.dumps(_finite(record), default=_plain, **options)


def _plain(obj: Any) -> Any:
    tolist = getattr(obj, "tolist", None)  # numpy scalars and arrays
    return _finite(tolist()) if callable(tolist) else str(obj)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if callable(getattr(obj, "tolist", None)):
        return _finite(obj.tolist())
    return obj


def scan_index(path: Path) -> IndexScan:
    """Every good record of an index, and each damaged line (not a JSON object) noted instead
    of stopping there; a cut-off last line (killed mid-write) is neither."""
    path = Path(path)
    records: list[dict[str, Any]] = []
    problems: list[str] = []
    damaged = 0
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"index {path} not found: pass the run's index.jsonl") from None
    with f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
                problem = "" if isinstance(obj, dict) else f"a {type(obj).__name__}, not an object"
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                problem = f"not JSON ({e})"
            if not problem:
                records.append(obj)
            elif raw.endswith(b"\n"):  # not the last line, which a crash may have cut off
                damaged += 1
                if len(problems) < MAX_PROBLEMS:
                    problems.append(f"{path}:{number}: {problem}")
    return IndexScan(records, damaged, problems)


def read_index(path: Path) -> list[dict[str, Any]]:
    """Every record of an index; a cut-off last line (killed mid-write) is ignored.

    Raises CorruptIndex at a damaged line before the last; :func:`scan_index` skips them.
    """
    records, damaged, problems = scan_index(path)
    if damaged:
        more = f" (and {damaged - 1} more damaged lines)" if damaged > 1 else ""
        raise CorruptIndex(
            f"{problems[0]}{more}: the index is damaged before its last line; "
            "`scopecast recover FILE` skips damaged lines and recovers from the good ones"
        )
    return records
