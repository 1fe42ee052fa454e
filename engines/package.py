"""Engine packages: a folder holding ``manifest.json`` plus the files it lists by sha256.

A package is what the server runs and what training produces. Loading checks every file's
sha256 against the manifest and only ever reads listed, hash-checked bytes; nothing is unpickled
(the manifest is JSON parsed by pydantic, the model is ONNX run by a runtime backend).

Model I/O convention (every engine's ``model.onnx``; N, h and w are dynamic dimensions):

- input ``frames``: float32 (N, channels * window, h, w): the ``window`` most recent frames,
  oldest first, stacked as channels, already normalized as ``(x - offset) / scale``: ``x`` is
  the raw frame (``units`` "adu") or its photo-electrons per pixel (``units`` "electrons").
- input ``previous`` (only when ``temporal.previous_output``): float32
  (N, channels, h * scale, w * scale): the engine's own previous (normalized) output.
- input ``background`` (only when ``temporal.background``): float32 (N, channels, h, w): a
  normalized reference background for this stream key.
- one output (any name): float32 (N, channels, h * scale, w * scale); the caller maps it back
  with ``y * scale + offset`` (electrons: then to the rig's ADU) and, for
  ``output_dtype="input"``, rounds and clips to the raw dtype.

``io="raw"`` (made by ``scopecast engines raw-io``; the default ``"float"`` is the convention
above) moves all of that into the graph: ``frames`` are the raw frames in ``raw_dtype``,
``previous`` the previous written output (in the first output's dtype), ``background`` float32
raw ADU; the first output is the written frame (``raw_dtype``, or float32 ADU for
``output_dtype="float32"``), a second one, ``checksum`` (float32 scalar: the sum of the model's
float output), is finite exactly when that output was. An electrons engine also takes its rig's
conversion as float32 inputs ``offset_map`` (ADU) and ``gain_map`` (ADU per electron: gain x
flat field), each (N, 1, h, w) or (1, 1, 1, 1) for a scalar camera, plus ``offset_map_out`` and
``gain_map_out`` on the output grid when ``scale`` > 1.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from calibration.errors import ScopecastError

ENGINE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
ZOO_DIR = Path(__file__).parent / "zoo"
MANIFEST = "manifest.json"
ENGINE_PATH_ENV = "SCOPECAST_ENGINE_PATH"
WARNING = "warning: "
"""Prefix of a ``verify_package`` line that does not stop the package from loading."""

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib"})
_MAX_MANIFEST_BYTES = 1 << 20


class PackageError(ScopecastError, ValueError):
    """An engine package is missing, malformed or altered; the message says what and what to do."""


class PackageNotFoundError(PackageError):
    """No engine package has the requested name or path."""


def _safe_name(name: str) -> str:
    """Check a file name inside a package: relative, POSIX, no '..', no pickle-based formats."""
    absolute = name.startswith("/") or re.match(r"^[A-Za-z]:", name)
    if not name or "\\" in name or "\0" in name or absolute:
        raise ValueError(
            f"unsafe file name {name!r}: use a relative POSIX path inside the package folder"
        )
    if any(p in ("", ".", "..") for p in name.split("/")):
        raise ValueError(
            f"unsafe file name {name!r}: '.', '..' and empty path parts are not allowed"
        )
    if name == MANIFEST:
        raise ValueError(f"{MANIFEST!r} cannot list itself; it is written by write_package")
    if PurePosixPath(name).suffix.lower() in _PICKLE_SUFFIXES:
        raise ValueError(
            f"file {name!r} looks pickle-based ({PurePosixPath(name).suffix}); engine packages "
            "never unpickle: export the model to ONNX"
        )
    return name


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


BACKGROUND_FRAMES = 9
"""Raw frames in the running median a ``background`` engine input is: the server's rings keep
this many, and training and the benchmarks compute it alike."""


class Temporal(_Frozen):
    """Which inputs a temporal (tGAN-style) engine takes besides the current frame."""

    window: int = Field(
        1, ge=1, le=64, description="Consecutive frames, oldest first, as channels."
    )
    previous_output: bool = Field(False, description="Takes its own previous output as 'previous'.")
    background: bool = Field(False, description="Takes a reference background as 'background'.")


class Tiling(_Frozen):
    """How a frame is cut into overlapping tiles for this engine."""

    size: int | None = Field(
        None, ge=1, description="Tile side in input pixels; None = whole frame."
    )
    overlap: int = Field(
        0, ge=0, description="Pixels shared by neighbouring tiles (>= 2x RF radius)."
    )
    multiple: int = Field(1, ge=1, description="Input H and W must be multiples of this (padded).")
    batch: int = Field(1, ge=1, description="Most tiles per inference call.")

    @model_validator(mode="after")
    def _consistent(self) -> Tiling:
        if self.size is not None:
            if self.overlap >= self.size:
                raise ValueError(
                    f"tile overlap {self.overlap} must be smaller than tile size {self.size}"
                )
            if self.size % self.multiple:
                raise ValueError(
                    f"tile size {self.size} is not a multiple of {self.multiple}: pick a size the "
                    "model accepts"
                )
        return self


class UnitsCamera(_Frozen):
    """The camera an electrons engine assumes when the server has no calibration profile."""

    offset_adu: float = Field(ge=0, allow_inf_nan=False, description="Dark offset, in ADU.")
    gain_adu_per_electron: float = Field(
        gt=0, allow_inf_nan=False, description="System gain: ADU per photo-electron."
    )


class Normalization(_Frozen):
    """Map pixels to model units: ``(x - offset) / scale``; outputs map back.

    ``units="adu"`` (the default; manifests from before units existed): ``x`` is the raw frame
    in ADU, so the engine only suits cameras with the offset and gain it was trained on.
    ``units="electrons"``: ``x`` is photo-electrons per pixel (``calibration.units``), converted
    with the rig's calibration profile, else with ``camera`` (the assumption the engine makes
    without one); the output goes back to the rig's ADU the same way.
    """

    units: Literal["adu", "electrons"] = "adu"
    offset: float = Field(0.0, allow_inf_nan=False)
    scale: float = Field(1.0, gt=0, allow_inf_nan=False)
    camera: UnitsCamera | None = Field(
        None, description="electrons engines: the camera assumed without a profile"
    )

    @model_validator(mode="after")
    def _camera(self) -> Normalization:
        if self.units == "electrons" and self.camera is None:
            raise ValueError(
                "an electrons engine needs normalization.camera (offset_adu, "
                "gain_adu_per_electron): the camera assumed when serving without a profile"
            )
        if self.units == "adu" and self.camera is not None:
            raise ValueError(
                "normalization.camera is only for units 'electrons'; an ADU engine takes raw "
                "frames as they are"
            )
        return self


class PlanInfo(_Frozen):
    """A TensorRT plan inside the package and what it was built for.

    A plan runs only where every tag matches (TensorRT version, GPU, compute capability); it is
    rebuilt from ``onnx`` elsewhere. ``profiles`` holds one ``{input: {"min", "opt", "max"}}``
    dict per optimization profile. Fields after ``profiles`` are optional, so manifests written
    before they existed still load.
    """

    file: str
    tensorrt: str
    gpu: str
    compute_capability: str
    precision: str
    profiles: list[dict[str, Any]] = []
    onnx: str | None = Field(
        None, description="The listed ONNX file the plan was built from (its precision's model)."
    )
    build_seconds: float | None = Field(None, ge=0, allow_inf_nan=False)
    numerics: dict[str, Any] = Field(
        {}, description="The numerics guard's report from the build (errors vs ONNX Runtime fp32)."
    )

    @field_validator("file")
    @classmethod
    def _file(cls, v: str) -> str:
        return _safe_name(v)

    @field_validator("onnx")
    @classmethod
    def _onnx(cls, v: str | None) -> str | None:
        return None if v is None else _safe_name(v)


class HeldOutScore(_Frozen):
    """One held-out measurement ``bench quality --record`` wrote into the manifest: the engine on
    one data set, recorded by one rig, at one motion speed, against the best classical baseline
    of the same run. A metric that could not be computed (or was not finite) is None."""

    data: dict[str, Any] = Field(
        description="what was scored: simulated preset or folder, rig (and its definition), "
        "motion speed, pairs, truth, field, scale, seed"
    )
    psnr: float | None = Field(None, allow_inf_nan=False, description="mean PSNR, dB")
    ssim: float | None = Field(None, allow_inf_nan=False, description="mean SSIM")
    best_baseline: str | None = Field(None, description="the classical baseline of highest PSNR")
    baseline_psnr: float | None = Field(None, allow_inf_nan=False)
    baseline_ssim: float | None = Field(None, allow_inf_nan=False)
    margin_db: float | None = Field(
        None, allow_inf_nan=False, description="psnr - baseline_psnr (dB; > 0: the engine wins)"
    )
    date: str = Field(min_length=1, description="when it was measured (ISO 8601)")
    scopecast_version: str = Field(min_length=1)


class Manifest(_Frozen):
    """Everything a runtime needs to know about an engine, and the sha256 of each of its files."""

    format: Literal[1] = 1
    name: str
    version: str = Field("0.1.0", min_length=1)
    task: Literal["identity", "denoise", "deblur", "super-resolution", "denoise-super-resolution"]
    baseline: bool = False
    description: str = ""
    architecture: str = Field(min_length=1)
    scale: Literal[1, 2, 4] = 1
    channels: int = Field(1, ge=1)
    output_dtype: Literal["input", "float32"] = "input"
    io: Literal["float", "raw"] = Field(
        "float", description="float: normalized float32 model I/O; raw: frames in raw_dtype"
    )
    raw_dtype: Literal["uint8", "uint16"] | None = Field(
        None, description="io raw: the frames' dtype the graph takes (and returns)"
    )
    temporal: Temporal = Temporal()
    tile: Tiling = Tiling()
    normalization: Normalization = Normalization()
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    model: str = "model.onnx"
    plans: list[PlanInfo] = []
    provenance: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    held_out: list[HeldOutScore] = Field(
        [], description="Held-out metrics `bench quality --record` wrote (optional; not hashed)."
    )
    files: dict[str, str] = {}

    @model_serializer(mode="wrap")
    def _omit_empty_held_out(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Without held-out metrics (or with the default float I/O) those fields are left out,
        so manifests written before they existed are rewritten byte-identically."""
        data: dict[str, Any] = handler(self)
        if not self.held_out:
            data.pop("held_out", None)
        if self.io == "float":
            data.pop("io", None)
            data.pop("raw_dtype", None)
        return data

    @model_validator(mode="after")
    def _raw_io(self) -> Manifest:
        if self.io == "raw" and self.raw_dtype is None:
            raise ValueError("io 'raw' needs raw_dtype (uint8 or uint16): the frames' dtype")
        if self.io == "float" and self.raw_dtype is not None:
            raise ValueError(
                f"raw_dtype {self.raw_dtype!r} is only for io 'raw'; a float engine takes any dtype"
            )
        return self

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not ENGINE_NAME.match(v):
            raise ValueError(
                f"engine name {v!r} is not allowed: use 1-64 of a-z 0-9 . _ -, starting with a "
                "letter or digit"
            )
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        _safe_name(v)
        if not v.endswith(".onnx"):
            raise ValueError(f"model {v!r} must be an ONNX file ending in .onnx")
        return v

    @field_validator("files")
    @classmethod
    def _files(cls, v: dict[str, str]) -> dict[str, str]:
        for name, digest in v.items():
            _safe_name(name)
            if not _SHA256.match(digest):
                raise ValueError(f"sha256 of {name!r} is {digest!r}, not 64 lowercase hex digits")
        return v

    @property
    def input_names(self) -> list[str]:
        """The model's input names, in the order of the I/O convention."""
        names = ["frames"]
        if self.temporal.previous_output:
            names.append("previous")
        if self.temporal.background:
            names.append("background")
        if self.io == "raw" and self.normalization.units == "electrons":
            names += ["offset_map", "gain_map"]
            if self.scale > 1:
                names += ["offset_map_out", "gain_map_out"]
        return names

    @property
    def io_dtypes(self) -> dict[str, str]:
        """The numpy dtype of each model input and of its first output (key ``output``)."""
        raw = self.raw_dtype if self.io == "raw" else None
        types = dict.fromkeys(self.input_names, "float32")
        types["output"] = raw if raw is not None and self.output_dtype == "input" else "float32"
        if raw is not None:
            types["frames"] = raw
            if self.temporal.previous_output:  # the previous written output, as written
                types["previous"] = types["output"]
        return types


def _sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class EnginePackage:
    """A verified engine package folder and its manifest."""

    path: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model

    def read(self, name: str) -> bytes:
        """The bytes of a listed file, re-checked against its sha256 so only verified bytes run."""
        expected = self.manifest.files.get(name)
        if expected is None:
            raise PackageError(
                f"file {name!r} is not listed in {self.path / MANIFEST}; only listed, "
                "hash-checked files are read"
            )
        data = _read_plain(_resolve_inside(self.path, name))
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise PackageError(_mismatch(self.path, name, expected, actual))
        return data


@dataclass(frozen=True)
class PackageEntry:
    """One package folder found on the search path, loaded or with the problem that stopped it."""

    path: Path
    package: EnginePackage | None = None
    problem: str = ""

    @property
    def name(self) -> str:
        return self.package.manifest.name if self.package else self.path.name


def _mismatch(root: Path, name: str, expected: str, actual: str) -> str:
    return (
        f"sha256 mismatch for {name!r} in {root}: expected {expected}, got {actual}; the file "
        "was changed after packaging: rebuild or re-download the package"
    )


def _symlink_problem(root: Path, name: str) -> str | None:
    """Why ``name`` inside ``root`` is not a plain file: it, or a folder on the way, is a link."""
    part = root
    for piece in PurePosixPath(name).parts:
        part = part / piece
        if part.is_symlink():
            what = "" if part == root / name else f" (its folder {part.relative_to(root)!s})"
            return (
                f"{name!r} in {root} is a symbolic link{what}: an engine package holds only "
                "plain files; copy the file into the package instead of linking it"
            )
    return None


def _resolve_inside(root: Path, name: str) -> Path:
    """The path of a listed file, refusing symbolic links (inside or out of the folder)."""
    path = root / name
    problem = _symlink_problem(root, name)
    if problem:
        raise PackageError(problem)
    if not path.resolve().is_relative_to(root.resolve()):
        raise PackageError(
            f"{name!r} in {root} resolves outside the package folder ({path.resolve()}); "
            "copy the file into the package instead of linking it"
        )
    return path


def _read_plain(path: Path) -> bytes:
    """The bytes of ``path``, refusing a symbolic link even if one appeared since the check."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        return f.read()


def one_line(problems: list[str]) -> str:
    """Several problems as one line (the CLI prints an error as one line); a prefix they share
    ("invalid manifest: ") is said once."""
    lines = [" ".join(p.split()) for p in problems]
    prefix = "invalid manifest: "
    if len(lines) > 1 and all(line.startswith(prefix) for line in lines):
        lines = [lines[0], *(line.removeprefix(prefix) for line in lines[1:])]
    return "; ".join(lines)


def _describe_errors(e: ValidationError) -> list[str]:
    """pydantic's multi-line report as one short line per field."""
    out = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        shown = "" if err["type"] == "missing" else f" (got {err['input']!r:.80})"
        msg = " ".join(str(err["msg"]).split())
        out.append(f"invalid manifest: {where}: {msg}{shown}")
    return out


def _read_manifest(path: Path) -> tuple[Manifest | None, list[str]]:
    """Parse ``manifest.json`` from JSON only; return it or the problems that stop it."""
    file = path / MANIFEST
    if not path.is_dir():
        return None, [f"{path} is not a folder; an engine package is a folder with {MANIFEST}"]
    if file.is_symlink():
        return None, [_symlink_problem(path, MANIFEST) or f"{file} is a symbolic link"]
    if not file.is_file():
        return None, [f"missing {MANIFEST} in {path}: this folder is not an engine package"]
    if file.stat().st_size > _MAX_MANIFEST_BYTES:
        return None, [f"{file} is larger than {_MAX_MANIFEST_BYTES} bytes: not a manifest"]
    try:
        text = _read_plain(file)
    except OSError as e:
        return None, [f"{file} cannot be read: {e.strerror or e}"]
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, [f"invalid manifest: {file} is not valid JSON ({e})"]
    if isinstance(raw, dict) and raw.get("format", 1) != 1:
        return None, [
            (
                f"unsupported manifest format {raw['format']!r} in {file}: this scopecast reads "
                "format 1; upgrade scopecast"
            )
        ]
    try:
        return Manifest.model_validate_json(text), []
    except ValidationError as e:
        return None, _describe_errors(e)


def _check_files(path: Path, manifest: Manifest) -> list[str]:
    problems = []
    if manifest.model not in manifest.files:
        problems.append(f"model {manifest.model!r} is not listed in manifest files: repackage it")
    for plan in manifest.plans:
        if plan.file not in manifest.files:
            problems.append(f"plan {plan.file!r} is not listed in manifest files: repackage it")
    for name, expected in sorted(manifest.files.items()):
        try:
            file = _resolve_inside(path, name)
        except PackageError as e:
            problems.append(str(e))
            continue
        if not file.is_file():
            problems.append(
                f"missing file {name!r} listed in {path / MANIFEST}: restore it or rebuild the "
                "package"
            )
            continue
        actual = _sha256_file(file)
        if actual != expected:
            problems.append(_mismatch(path, name, expected, actual))
    for file in sorted(p for p in path.rglob("*") if p.is_file() or p.is_symlink()):
        rel = file.relative_to(path).as_posix()
        if rel != MANIFEST and rel not in manifest.files:
            link = " (a symbolic link)" if file.is_symlink() else ""
            problems.append(
                f"{WARNING}{rel!r}{link}: not listed, will not be loaded (not in {MANIFEST})"
            )
    return problems


def verify_package(path: Path) -> list[str]:
    """Everything wrong with a package folder; lines starting with ``WARNING`` do not stop it."""
    path = Path(path)
    manifest, problems = _read_manifest(path)
    if manifest is None:
        return problems
    return _check_files(path, manifest)


def is_warning(problem: str) -> bool:
    """Whether a ``verify_package`` line is a warning rather than an error."""
    return problem.startswith(WARNING)


def engine_dirs() -> list[Path]:
    """Folders searched for packages by name: ``$SCOPECAST_ENGINE_PATH`` entries, then the zoo."""
    extra = [Path(p) for p in os.environ.get(ENGINE_PATH_ENV, "").split(os.pathsep) if p]
    return [*extra, ZOO_DIR]


def _candidates() -> list[Path]:
    found = []
    for directory in engine_dirs():
        if directory.is_dir():
            found += sorted(d for d in directory.iterdir() if (d / MANIFEST).is_file())
    return found


def find_package(name_or_path: str | Path) -> Path:
    """The folder of a package given by name (search path) or by folder path."""
    text = str(name_or_path)
    if isinstance(name_or_path, str) and ENGINE_NAME.match(text):
        for directory in engine_dirs():
            if (directory / text / MANIFEST).is_file():
                return directory / text
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if isinstance(name_or_path, Path) or not ENGINE_NAME.match(text):
        raise PackageNotFoundError(
            f"no engine package folder at {path}: give an existing package folder or an engine name"
        )
    names = sorted({d.name for d in _candidates()})
    searched = os.pathsep.join(str(d) for d in engine_dirs())
    raise PackageNotFoundError(
        f"engine {text!r} not found; available: {', '.join(names) or 'none'}; or give a path to "
        f"a package folder (searched {searched}; add folders with ${ENGINE_PATH_ENV}; "
        "`scopecast engines list` shows them)"
    )


def load_package(name_or_path: str | Path) -> EnginePackage:
    """Find a package, check its manifest and every file's sha256, and return it."""
    path = find_package(name_or_path)
    manifest, problems = _read_manifest(path)
    if manifest is not None:
        problems = [p for p in _check_files(path, manifest) if not is_warning(p)]
    if problems or manifest is None:
        raise PackageError(f"engine package {path} cannot be loaded: {one_line(problems)}")
    return EnginePackage(path=path, manifest=manifest)


def list_packages() -> list[PackageEntry]:
    """Every package folder on the search path, loaded, or with the problem that stops it."""
    entries = []
    for path in _candidates():
        try:
            entries.append(PackageEntry(path=path, package=load_package(path)))
        except PackageError as e:
            entries.append(PackageEntry(path=path, problem=str(e)))
    return entries


def manifest_json(manifest: Manifest) -> str:
    """The manifest as written to disk: indent 2, sorted keys, so rebuilds are byte-identical."""
    return json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def write_package(directory: Path, manifest: Manifest, files: dict[str, bytes]) -> EnginePackage:
    """Write ``files`` and a manifest listing their sha256 (replacing ``manifest.files``)."""
    directory = Path(directory)
    for name in files:
        try:
            _safe_name(name)
        except ValueError as e:
            raise PackageError(str(e)) from None
    needed = [manifest.model, *(p.file for p in manifest.plans)]
    missing = [n for n in needed if n not in files]
    if missing:
        raise PackageError(
            f"write_package for {manifest.name!r} got no bytes for {missing}: pass the model and "
            "every plan the manifest names"
        )
    digests = {name: hashlib.sha256(files[name]).hexdigest() for name in sorted(files)}
    final = Manifest.model_validate({**manifest.model_dump(), "files": digests})
    old, _ = _read_manifest(directory) if (directory / MANIFEST).is_file() else (None, [])
    directory.mkdir(parents=True, exist_ok=True)
    for name in sorted(files):
        _atomic_write(directory / name, files[name])
    if old is not None:
        for stale in set(old.files) - set(digests):
            (directory / stale).unlink(missing_ok=True)
    _atomic_write(directory / MANIFEST, manifest_json(final).encode())
    return EnginePackage(path=directory, manifest=final)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
