"""The paired-image folder: ``FOLDER/low/NAME.tif`` and ``FOLDER/high/NAME.tif``, matched by NAME.

One reader and one writer for the layout everything shares: ``scopecast calibrate register`` and
``bench real-pairs`` write it; training (``kind='paired'`` or ``'stacks'``) and ``bench quality
--data`` read it. A file's pair NAME is its file name up to the first dot (``a.tif``, ``a.ome.tif``
and ``a.tiff`` are all pair ``a``); a TIFF is any file ending ``.tif`` or ``.tiff`` (any case).
What the images must hold (2-D or (T, H, W), which scale) is the reader's to check: this module
checks that the files pair up, can be read and hold finite values, and names the bad file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

LOW, HIGH = "low", "high"
"""The two sub-folders of a pair folder."""
TIFF_SUFFIXES = (".tif", ".tiff")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_NAMES_SHOWN = 5


@dataclass(frozen=True)
class PairFiles:
    """One pair's two files."""

    name: str
    low: Path
    high: Path


@dataclass(frozen=True)
class Matched:
    """Two folders' TIFFs matched by name: the pairs (sorted by name) and the names only one
    folder has."""

    pairs: list[PairFiles]
    only_low: list[str]
    only_high: list[str]

    @property
    def counts(self) -> tuple[int, int]:
        """How many TIFFs each folder holds."""
        return len(self.pairs) + len(self.only_low), len(self.pairs) + len(self.only_high)


def pair_name(path: Path) -> str:
    """The pair a file belongs to: its file name up to the first dot."""
    return Path(path).name.split(".")[0]


def few(names: Iterable[str]) -> str:
    """Up to five names, sorted, and how many there are in all when there are more."""
    shown = sorted(names)
    more = f", ... ({len(shown)} in all)" if len(shown) > _NAMES_SHOWN else ""
    return (", ".join(shown[:_NAMES_SHOWN]) or "none") + more


def tiffs(folder: Path) -> dict[str, Path]:
    """The TIFFs directly in ``folder`` by pair name, sorted ({} if it is not a folder);
    ValueError naming both files if two share a name."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in TIFF_SUFFIXES or not path.is_file():
            continue
        name = pair_name(path)
        if name in found:
            raise ValueError(
                f"{found[name].name} and {path.name} in {folder} are both pair {name!r} (a pair's "
                "name is the file name up to the first dot): rename or remove one"
            )
        found[name] = path
    return found


def match_files(low_dir: Path, high_dir: Path) -> Matched:
    """The TIFFs of ``low_dir`` and ``high_dir`` matched by pair name."""
    lows, highs = tiffs(low_dir), tiffs(high_dir)
    return Matched(
        pairs=[PairFiles(n, lows[n], highs[n]) for n in sorted(lows.keys() & highs.keys())],
        only_low=sorted(lows.keys() - highs.keys()),
        only_high=sorted(highs.keys() - lows.keys()),
    )


def pair_files(folder: Path) -> list[PairFiles]:
    """Every pair of a pair folder, sorted by name; ValueError if the folder is missing, lacks
    low/ or high/, holds no pairs, or holds a TIFF without a partner of the same name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"no pairs in {folder}: the folder does not exist")
    if not ((folder / LOW).is_dir() and (folder / HIGH).is_dir()):
        there = [p.name for p in folder.iterdir()]
        raise ValueError(
            f"no pairs in {folder}: it must hold low/ and high/ folders of TIFFs matched by name "
            f"(what `scopecast calibrate register` writes); it holds: {few(there)}"
        )
    m = match_files(folder / LOW, folder / HIGH)
    if not m.pairs or m.only_low or m.only_high:
        n_low, n_high = m.counts
        none = f"no pairs in {folder}: none matched; " if not m.pairs else ""
        raise ValueError(
            f"{none}low and high TIFFs in {folder} must match by name: low/ only has "
            f"[{few(m.only_low)}], high/ only has [{few(m.only_high)}] (found {n_low} low and "
            f"{n_high} high TIFFs); rename or remove the unmatched files"
        )
    return m.pairs


def read_tiff(path: Path) -> np.ndarray:
    """A TIFF's image data; ValueError naming the file if it cannot be read."""
    try:
        return np.asarray(tifffile.imread(path))
    except (OSError, ValueError) as e:  # tifffile.TiffFileError is a ValueError
        raise ValueError(f"{path} is not a readable TIFF image: {e}") from None


def read_pair(pair: PairFiles) -> tuple[np.ndarray, np.ndarray]:
    """A pair's (low, high) images as stored; ValueError naming the file that cannot be read
    or holds NaN or inf values."""
    low, high = read_tiff(pair.low), read_tiff(pair.high)
    for what, path, image in ((LOW, pair.low, low), (HIGH, pair.high, high)):
        if image.dtype.kind in "fc" and not np.isfinite(image).all():
            raise ValueError(
                f"{what}/{path.name} in {path.parent.parent} has NaN or inf values: crop or "
                "replace them"
            )
    return low, high


def _check(name: str, low: np.ndarray, high: np.ndarray, stacks: bool) -> None:
    if not (isinstance(name, str) and _NAME.match(name)):
        raise ValueError(
            f"pair names must be plain file stems (letters, digits, '_', '-'), got {name!r}."
        )
    for kind, data, dims in ((LOW, low, (2, 3) if stacks else (2,)), (HIGH, high, (2,))):
        image = np.asarray(data)
        if image.ndim not in dims or (image.dtype.kind in "fc" and not np.isfinite(image).all()):
            need = "2-D (or a (T, H, W) stack)" if len(dims) > 1 else "2-D"
            raise ValueError(
                f"{kind} image of pair {name!r} must be {need} and finite, got shape "
                f"{image.shape}; crop with registered_pair first."
            )


def write_pair(
    out_dir: Path, name: str, low: np.ndarray, high: np.ndarray, *, stacks: bool = False
) -> tuple[Path, Path]:
    """Write ``out_dir/low/NAME.tif`` and ``out_dir/high/NAME.tif``; the two paths. ``low`` may
    be a (T, H, W) stack of raw frames (oldest first) with ``stacks``; ``high`` is 2-D."""
    _check(name, low, high, stacks)
    out_dir = Path(out_dir)
    written = []
    for folder, image in ((out_dir / LOW, low), (out_dir / HIGH, high)):
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.tif"
        tifffile.imwrite(path, np.ascontiguousarray(image), photometric="minisblack")
        written.append(path)
    return written[0], written[1]


def write_pairs(
    pairs: Iterable[tuple[str, np.ndarray, np.ndarray]], out_dir: Path, *, stacks: bool = False
) -> list[Path]:
    """Write every (NAME, low, high) with :func:`write_pair`, after checking them all (names
    unique plain stems, images 2-D and finite); the paths in order, low before high."""
    items = list(pairs)
    names = [name for name, _, _ in items]
    bad = [n for n in names if not (isinstance(n, str) and _NAME.match(n))]
    if bad:
        raise ValueError(
            f"pair names must be plain file stems (letters, digits, '_', '-'), got {bad!r}."
        )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"pair names must be unique, {dupes!r} repeat; name each field once.")
    for name, low, high in items:
        _check(name, low, high, stacks)
    written: list[Path] = []
    for name, low, high in items:
        written.extend(write_pair(out_dir, name, low, high, stacks=stacks))
    return written
