"""scopecast wire protocol: one image = two ZeroMQ frames, [header JSON | pixels].

The header is UTF-8 JSON validated by :class:`FrameHeader`; the pixels are one
C-contiguous buffer of ``shape`` and ``dtype`` (little-endian), sent without a copy.
Anything malformed raises a :class:`ProtocolError` subclass that names what was wrong,
so a receiver can count it by ``kind`` and keep serving.

Same host: a header may instead point at a shared-memory slot (``shm``, the pixel frame then
empty) after the receiver accepted the hook's ``shm_offer`` (:mod:`stream.shm`). Both fields
are optional, so version 1 stays: a hook that never sets them is served as before.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from calibration.errors import ScopecastError

if TYPE_CHECKING:
    from collections.abc import Callable

PROTOCOL_VERSION = 1

#: Pixel types on the wire (always little-endian).
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<") for name in ("uint8", "uint16", "uint32", "float32")
}
MAX_SIDE = 32768
MAX_PIXELS = 1 << 28  # 256 Mpx: far above any camera, far below what would exhaust memory
MAX_HEADER_BYTES = 64 * 1024
MAX_INDEX = 2**31 - 1  # useq indices and sizes; far beyond any acquisition, fits every file format
MAX_AXES = 16
MAX_INT64 = 2**63 - 1
#: Pixel sizes (um) a header may carry: 0.1 nm to 10 cm, far beyond any light microscope on
#: both sides, and every value in between fits a TIFF resolution tag.
MIN_PIXEL_UM, MAX_PIXEL_UM = 1e-4, 1e5
STREAM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_stream_id(stream: str) -> str:
    """Return ``stream`` if it is a valid stream id, else raise ValueError saying why."""
    if not STREAM_ID.match(stream):
        raise ValueError(f"stream id {stream!r} must be 1-64 characters of [A-Za-z0-9._-]")
    return stream


class ProtocolError(ScopecastError, ValueError):
    """A message that does not follow the scopecast protocol."""

    kind: ClassVar[str] = "protocol"


class MalformedMessage(ProtocolError):
    """Wrong number of frames, or a header that is not UTF-8 JSON."""

    kind = "malformed"


class UnsupportedVersion(ProtocolError):
    """A header whose ``version`` this build does not speak."""

    kind = "version"


class InvalidHeader(ProtocolError):
    """A header that is JSON but fails validation (missing field, bad value, absurd shape)."""

    kind = "header"


class BufferMismatch(ProtocolError):
    """A pixel buffer whose size does not match the header's shape and dtype."""

    kind = "buffer"


Index = Annotated[int, Field(ge=0, le=MAX_INDEX)]
#: Every float a header carries must be a real number: NaN and infinities break time axes,
#: file metadata and statistics downstream, so they are refused at the boundary.
Finite = Annotated[float, Field(allow_inf_nan=False)]


def _printable(v: str | None, what: str) -> str | None:
    """Names that end up in file metadata (OME-XML) must be short printable text."""
    if v is not None and (len(v) > 256 or not v.isprintable()):
        raise ValueError(f"{what} {v[:40]!r} must be at most 256 printable characters")
    return v


class StagePosition(BaseModel):
    """Stage position in micrometres at frame time (any axis may be unknown)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
    x: float | None = None
    y: float | None = None
    z: float | None = None


#: Shared-memory segment names (:mod:`stream.shm`): ``scopecast-{pid}-{8 hex digits}``.
SHM_NAME = r"^scopecast-[1-9][0-9]{0,9}-[0-9a-f]{8}$"


class ShmRef(BaseModel):
    """Where a frame's pixels wait in shared memory (same host): segment, slot, generation."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(pattern=SHM_NAME, description="segment in /dev/shm written by the hook")
    slot: int = Field(ge=0, le=1023, description="slot of the segment's ring")
    generation: int = Field(
        ge=2, le=MAX_INT64, multiple_of=2, description="the slot's generation once written (even)"
    )


class ShmOffer(BaseModel):
    """The hook offers its segment; a reader that maps it writes ``token`` back into it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(pattern=SHM_NAME)
    token: int = Field(ge=1, le=MAX_INT64)


class FrameHeader(BaseModel):
    """Everything a receiver needs to place, time and interpret one frame."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = Field(PROTOCOL_VERSION, description="protocol version")
    stream: str = Field(description="stream id, also the PUB topic prefix: [A-Za-z0-9._-], 1-64")
    seq: Annotated[
        int,
        Field(ge=0, le=MAX_INT64, description="per-stream sequence number, from 0, +1 per frame"),
    ]
    index: dict[str, Index] = Field(
        default_factory=dict,
        max_length=MAX_AXES,
        description="useq event index, e.g. {'t': 3, 'p': 0, 'g': 1, 'c': 1, 'z': 2}",
    )
    shape: tuple[int, ...] = Field(description="(rows, cols) or (rows, cols, components)")
    dtype: str = Field(description="one of uint8, uint16, uint32, float32; little-endian")
    mono_ns: int = Field(
        ge=0, le=MAX_INT64, description="time.monotonic_ns() at frameReady (same-host latency)"
    )
    wall_time: Finite = Field(description="time.time() at frameReady, seconds since the epoch")
    exposure_ms: Finite | None = Field(None, ge=0)
    pixel_size_um: Finite | None = Field(
        None,
        ge=MIN_PIXEL_UM,
        le=MAX_PIXEL_UM,
        description="sample-plane pixel size, micrometres (None if unknown)",
    )
    stage: StagePosition | None = None
    channel: str | None = Field(None, description="channel config name, e.g. 'FITC'")
    acquisition: str | None = Field(None, description="id of the acquisition (useq sequence uid)")
    sizes: dict[str, Index] = Field(
        default_factory=dict,
        max_length=MAX_AXES,
        description="useq sizes of the acquisition, e.g. {'t': 100, 'p': 3, 'c': 2}; {} if unknown",
    )
    shm: ShmRef | None = Field(
        None,
        description="the pixels are in this shared-memory slot (same host); the pixel frame is "
        "then empty. Absent: the pixels are the second frame",
    )
    shm_offer: ShmOffer | None = Field(
        None, description="on an inline frame: the hook's shared-memory segment, offered"
    )

    @field_validator("stream")
    @classmethod
    def _stream_id(cls, v: str) -> str:
        return check_stream_id(v)

    @field_validator("channel")
    @classmethod
    def _channel_name(cls, v: str | None) -> str | None:
        return _printable(v, "channel")

    @field_validator("acquisition")
    @classmethod
    def _acquisition_id(cls, v: str | None) -> str | None:
        return _printable(v, "acquisition")

    @field_validator("index", "sizes")
    @classmethod
    def _index_keys(cls, v: dict[str, int]) -> dict[str, int]:
        bad = [k for k in v if not (0 < len(k) <= 16 and k.isidentifier())]
        if bad:
            raise ValueError(f"index axis names {bad!r} must be short identifiers like 't', 'p'")
        return v

    @field_validator("shape")
    @classmethod
    def _sane_shape(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(v) not in (2, 3) or any(not 0 < s <= MAX_SIDE for s in v[:2]):
            raise ValueError(
                f"shape {v} must be (rows, cols[, components]) with sides 1..{MAX_SIDE}"
            )
        if len(v) == 3 and not 1 <= v[2] <= 4:
            raise ValueError(f"shape {v}: components must be 1..4")
        if int(np.prod(v)) > MAX_PIXELS:
            raise ValueError(f"shape {v} has more than {MAX_PIXELS} values")
        return v

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"dtype {v!r} is not one of {sorted(DTYPES)}")
        return v

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * DTYPES[self.dtype].itemsize

    @property
    def key(self) -> str:
        """Stream key (stream, position[, grid tile], channel, z): PUB topic and file key.

        The grid part ``/g{g}`` appears only when the index has a ``g`` (a grid acquisition),
        so keys of acquisitions without grids keep their simple form."""
        i = self.index
        grid = f"/g{i['g']}" if "g" in i else ""
        return f"{self.stream}/p{i.get('p', 0)}{grid}/c{i.get('c', 0)}/z{i.get('z', 0)}"

    @property
    def state_key(self) -> str:
        """Temporal-state key: the stream key within one acquisition, so acquisitions that
        share a stream id (and interleave) never reset each other's rings."""
        return self.key if self.acquisition is None else f"{self.key}@{self.acquisition}"


def encode(header: FrameHeader, pixels: np.ndarray) -> list[Any]:
    """Return the two frames for ``send_multipart``; the pixels are not copied."""
    if pixels.shape != header.shape or pixels.dtype != DTYPES[header.dtype]:
        raise BufferMismatch(
            f"array {pixels.shape} {pixels.dtype} does not match header {header.shape} "
            f"{header.dtype}: build the header from the array you send"
        )
    if not pixels.flags.c_contiguous:
        raise BufferMismatch("pixels must be C-contiguous: pass np.ascontiguousarray(pixels)")
    return [header.model_dump_json(exclude_none=True).encode(), pixels]


class PublishedHeader(FrameHeader):
    """A frame the server publishes: the acquisition's header plus what the server did.

    ``seq`` and ``index`` are those of the raw frame, so an enhanced frame points at its raw
    frame; ``shape`` and ``pixel_size_um`` are those of the published pixels.
    """

    kind: Literal["raw", "enhanced", "significance"] = Field(
        description="raw: the frame as received; enhanced: the engine's output; significance: "
        "the fidelity scan's coarse map for that enhanced frame (float32, one value per "
        "calibration.fidelity.MAP_BIN raw px square: the signed matched-filter significance of "
        "largest magnitude there, positive where the raw frame holds more signal than the "
        "output explains, negative where the output shows signal the raw data do not support)"
    )
    pixel_size_um: Finite | None = Field(
        None, gt=0, description="pixel size of the published pixels (the raw one / scale)"
    )
    engine: str | None = Field(None, description="engine (chain) that made an enhanced frame")
    backend: str | None = None
    scale: int = 1
    timings_ms: dict[str, float] = Field(
        default_factory=dict, description="per-stage server timings for this frame"
    )
    fidelity: dict[str, Any] | None = Field(
        None,
        description="raw frame's chi-square against the enhanced one and the regions its scan "
        "flagged (needs a profile)",
    )

    @property
    def topic(self) -> bytes:
        """PUB topic: the stream key, then the kind ('scope/p0/c1/z0/enhanced')."""
        return f"{self.key}/{self.kind}".encode()


def encode_published(header: PublishedHeader, pixels: np.ndarray) -> list[Any]:
    """The three frames [topic, header, pixels] the server publishes; pixels not copied."""
    return [header.topic, *encode(header, pixels)]


def decode_published(frames: list[Any]) -> tuple[PublishedHeader, np.ndarray]:
    """Decode a message received on a SUB socket into its header and a read-only array."""
    if len(frames) != 3:
        raise MalformedMessage(f"expected 3 frames [topic, header, pixels], got {len(frames)}")
    return decode(frames[1:], model=PublishedHeader)  # type: ignore[return-value]


def decode_header(raw: bytes | memoryview, model: type[FrameHeader] = FrameHeader) -> FrameHeader:
    """Parse and validate a header frame; raise a ProtocolError naming the problem."""
    raw = bytes(raw)
    if len(raw) > MAX_HEADER_BYTES:
        raise MalformedMessage(f"header is {len(raw)} bytes, more than {MAX_HEADER_BYTES}")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # ValueError: not JSON, or an integer past Python's digit limit; RecursionError:
        # nesting deeper than the parser's stack (both valid JSON to a human, not to us)
        why = str(e) if not isinstance(e, RecursionError) else "nested too deeply"
        raise MalformedMessage(
            f"header is not UTF-8 JSON we can parse ({why[:200]}); first bytes {raw[:40]!r}"
        ) from e
    if not isinstance(obj, dict):
        raise MalformedMessage(f"header must be a JSON object, got {type(obj).__name__}")
    version = obj.get("version")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"protocol version {repr(version)[:40]} is not supported (this build speaks "
            f"{PROTOCOL_VERSION}): upgrade the older side so both match"
        )
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc']))[:60] or 'header'}: {err['msg']}"
            for err in e.errors()[:5]
        )
        raise InvalidHeader(f"invalid header: {problems[:600]}") from e


def decode(
    frames: list[Any],
    model: type[FrameHeader] = FrameHeader,
    *,
    shm: Callable[[FrameHeader], np.ndarray] | None = None,
) -> tuple[FrameHeader, np.ndarray]:
    """Decode ``recv_multipart`` output (bytes or zmq.Frame) into a header and a read-only array.

    The array is a view on the received buffer (no copy). A header whose pixels are in shared
    memory (``shm``) needs an empty pixel frame and a reader ``shm`` (:class:`stream.shm.ShmReader`
    ``.read``), which returns them; without one it is a BufferMismatch.
    """
    if len(frames) != 2:
        raise MalformedMessage(f"expected 2 frames [header, pixels], got {len(frames)}")
    header = decode_header(_buffer(frames[0]), model)
    buf = _buffer(frames[1])
    if header.shm is not None and shm is not None:
        if buf.nbytes:
            raise BufferMismatch(
                f"header points at shared memory but {buf.nbytes} pixel bytes came inline too"
            )
        return header, shm(header)
    if buf.nbytes != header.nbytes:
        raise BufferMismatch(
            f"pixel buffer has {buf.nbytes} bytes but header says {header.shape} "
            f"{header.dtype} = {header.nbytes} bytes"
        )
    arr = np.frombuffer(buf, dtype=DTYPES[header.dtype]).reshape(header.shape)
    return header, arr


def _buffer(frame: Any) -> memoryview:
    return memoryview(getattr(frame, "buffer", frame)).cast("B")
