"""Hostile messages against a running engine server, and proof that it kept serving.

``scopecast bench fuzz --messages 100000`` starts ``scopecast serve`` (identity engine, complete
mode) in another process and sends it every kind of message a careless or hostile client could:
wrong multipart shapes, headers that are not UTF-8, not JSON, not an object, nested 60,000 deep,
with 5,000-digit integers, NaN and infinities, negative and huge values, unknown fields, wrong
versions; buffers too short, too long or empty; plus valid but unusual frames (3-D shapes,
float32 with NaN, extreme metadata) and good frames, interleaved; and malformed control
requests (never a valid ``stop``). Then it checks that no stage died, that the server counted
every rejected message under the kind this module expected, and that every accepted frame is
on disk bit-exact where the index says.

The generator is plain functions of a :class:`random.Random` (``message``, ``control_message``,
``catalog``), so the tests drive it from hypothesis (``st.randoms()``) and the bench from a
seed. Each :class:`Message` carries the ``ProtocolError`` kind the server must count it under
(``malformed``, ``version``, ``header``, ``buffer``), or ``accepted`` with a :class:`FrameRef`
that regenerates its pixels. A message of zero frames cannot be sent with ZeroMQ (every
message has at least one part); the nearest, one empty frame, is in the mix.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from stream.acquire import free_endpoint
from stream.control import ControlError, parse_status, wait_ready
from stream.control import status as server_status
from stream.control import stop as server_stop
from stream.protocol import DTYPES, MAX_INDEX, MAX_INT64, MAX_PIXEL_UM, MAX_SIDE, MIN_PIXEL_UM
from stream.sinks import read_index
from stream.sinks.store import INDEX_NAME
from stream.status import ServerStatus

#: What the server must do with a message: accept it, or reject it under this kind.
KINDS = ("accepted", "malformed", "version", "header", "buffer")
REJECTED = KINDS[1:]
GOOD_STREAM = "good"
GOOD_SHAPE = (24, 32)
#: JSON nesting the server's parser surely takes (depth < ~990 here), and surely refuses.
PARSED_DEPTH = 600
TOO_DEEP = 2000
#: Integer digits Python's int() refuses by default (4300), and a size it takes.
TOO_MANY_DIGITS = 4400
MAX_HEADER_BYTES = 64 * 1024


# -- messages -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameRef:
    """An accepted frame: where the server files it, and its pixels (from ``seed``)."""

    stream: str
    seq: int
    shape: tuple[int, ...]
    dtype: str
    seed: int

    def pixels(self) -> np.ndarray:
        g = np.random.default_rng(self.seed)
        dt = DTYPES[self.dtype]
        if dt.kind == "f":
            a = (g.standard_normal(self.shape) * 1000).astype(dt)
            flat = a.reshape(-1)
            specials = np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45, 3.4e38], dt)
            where = g.integers(0, flat.size, max(1, flat.size // 8))
            flat[where] = specials[g.integers(0, specials.size, where.size)]
            return a
        return g.integers(0, np.iinfo(dt).max, self.shape, dtype=dt, endpoint=True)


@dataclass(frozen=True)
class Message:
    """One multipart message for the server's PULL socket and what the server must do."""

    label: str  # category: detail
    parts: tuple[bytes, ...]
    expect: str  # one of KINDS
    frame: FrameRef | None = None

    @property
    def category(self) -> str:
        return self.label.split(":", 1)[0]


@dataclass(frozen=True)
class ControlMessage:
    """One request for the control socket; ``rejected``: the answer must be an error."""

    label: str
    parts: tuple[bytes, ...]
    rejected: bool = True

    @property
    def category(self) -> str:
        return self.label.split(":", 1)[0]


@dataclass
class FuzzState:
    """Sequence numbers per stream of accepted frames, so each stream has no gaps."""

    seqs: Counter[str] = field(default_factory=Counter)

    def next_seq(self, stream: str) -> int:
        seq = self.seqs[stream]
        self.seqs[stream] += 1
        return seq


class _Raw:
    """A JSON value written as is (NaN, 1e999, a 5000-digit integer, ...)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text if len(self.text) <= 12 else f"{self.text[:6]}...({len(self.text)} chars)"


def dumps(obj: Any, *, ascii_only: bool = True) -> bytes:
    """``obj`` as compact JSON bytes; :class:`_Raw` values are spliced in verbatim."""
    raws: list[str] = []

    def swap(v: Any) -> Any:
        if isinstance(v, _Raw):
            raws.append(v.text)
            return f"@@raw{len(raws) - 1}@@"
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [swap(x) for x in v]
        return v

    text = json.dumps(swap(obj), separators=(",", ":"), ensure_ascii=ascii_only)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@raw{i}@@"', raw, 1)
    return text.encode("utf-8", "surrogatepass")


def header(stream: str, seq: int, shape: Iterable[int], dtype: str, **fields: Any) -> dict:
    """A valid header as a dict (``fields`` override or add)."""
    h = {
        "version": 1,
        "stream": stream,
        "seq": seq,
        "index": {"t": seq},
        "shape": list(shape),
        "dtype": dtype,
        "mono_ns": time.monotonic_ns(),
        "wall_time": time.time(),
        "exposure_ms": 10.0,
        "pixel_size_um": 0.5,
    }
    h.update(fields)
    return h


def _nbytes(shape: Iterable[int], dtype: str) -> int:
    return math.prod(shape) * DTYPES[dtype].itemsize


def _local(rng: random.Random) -> random.Random:
    """A plain Random seeded by one draw: bulk randomness (digits, bytes) costs the caller's
    generator (hypothesis's, in the tests) one choice, not thousands."""
    return random.Random(rng.getrandbits(32))


def _noise(rng: random.Random, n: int) -> bytes:
    return _local(rng).randbytes(n)


def _target(rng: random.Random) -> tuple[dict, bytes]:
    """A valid header of a small frame (stream ``fuzz``) and a buffer of the right size.
    (No ``choice`` here: a category's first ``choice`` picks its variant, see ``catalog``.)"""
    shape = [rng.randint(1, 16), rng.randint(1, 16)]
    if rng.random() < 0.2:
        shape.append(rng.randint(1, 4))
    dtype = sorted(DTYPES)[rng.randint(0, len(DTYPES) - 1)]
    return header("fuzz", rng.randint(0, 1000), shape, dtype), _noise(rng, _nbytes(shape, dtype))


def _nested(depth: int, inner: str = "0") -> _Raw:
    return _Raw("[" * depth + inner + "]" * depth)


def _digits(rng: random.Random, n: int) -> _Raw:
    """An ``n``-digit integer as JSON text (Python refuses to print one past 4300 digits)."""
    r = _local(rng)
    return _Raw(str(r.randint(1, 9)) + "".join(r.choices("0123456789", k=n - 1)))


NON_FINITE = ("NaN", "Infinity", "-Infinity", "1e999", "-1e999")


def _h(label: str, h: dict, pixels: bytes, **kw: Any) -> Message:
    return Message(f"header:{label}", (dumps(h), pixels), "header", **kw)


# Every hostile category: a function of (rng, state) -> Message. --------------------------------


def _parts(rng: random.Random, state: FuzzState) -> Message:
    h, px = _target(rng)
    hb = dumps(h)
    shapes = {
        "1 part: header": (hb,),
        "1 part: empty": (b"",),
        "1 part: pixels": (px,),
        "3 parts": (hb, px, b""),
        "3 parts: empty": (b"", b"", b""),
        "3 parts: header twice": (hb, px, hb),
        "5 parts": (hb, px, hb, px, b""),
        "2 parts: empty header": (b"", px),
        "2 parts: pixels first": (b"\xff" + px, hb),
    }
    name = rng.choice(sorted(shapes))
    return Message(f"parts:{name}", shapes[name], "malformed")


def _not_utf8(rng: random.Random, state: FuzzState) -> Message:
    h, px = _target(rng)
    text = dumps(h)
    how = rng.choice(["byte", "latin-1", "utf-16", "bom", "truncated sequence"])
    if how == "byte":
        cut = rng.randint(0, len(text))
        raw = text[:cut] + bytes([rng.choice([0x80, 0xC0, 0xFE, 0xFF])]) + text[cut:]
    elif how == "latin-1":
        raw = dumps({**h, "channel": "GFP-grün"}, ascii_only=False).decode().encode("latin-1")
    elif how == "utf-16":
        raw = text.decode().encode("utf-16")  # with its BOM: not UTF-8
    elif how == "bom":
        raw = b"\xef\xbb\xbf" + text  # UTF-8, but json refuses a BOM
    else:
        raw = text[:-2] + b"\xe2\x82" + text[-2:]  # a 3-byte sequence cut after 2
    return Message(f"not-utf8:{how}", (raw, px), "malformed")


def _not_json(rng: random.Random, state: FuzzState) -> Message:
    h, px = _target(rng)
    text = dumps(h)
    how = rng.choice(["garbage", "truncated", "trailing", "single quotes", "empty", "nul"])
    if how == "garbage":
        r = _local(rng)
        raw = b"x" + bytes(r.randint(32, 126) for _ in range(r.randint(0, 200)))
    elif how == "truncated":
        raw = text[: rng.randint(1, len(text) - 1)]
    elif how == "trailing":
        raw = text + rng.choice([b"}", b",", b"x", b"{}", b"\x00"])
    elif how == "single quotes":
        raw = text.replace(b'"', b"'")
    elif how == "empty":
        raw = b" " * rng.randint(0, 8)
    else:
        raw = b"\x00" * rng.randint(1, 64)
    return Message(f"not-json:{how}", (raw, px), "malformed")


def _non_object(rng: random.Random, state: FuzzState) -> Message:
    h, px = _target(rng)
    values = ["[]", "[" + dumps(h).decode() + "]", "1", '"header"', "null", "true", "1.5",
              "NaN", "-Infinity", '"{\\"version\\": 1}"']  # fmt: skip
    raw = rng.choice(values)
    return Message(f"non-object:{raw[:20]}", (raw.encode(), px), "malformed")


def _too_deep(rng: random.Random, state: FuzzState) -> Message:
    h, px = _target(rng)
    depth = rng.randint(TOO_DEEP, 60_000)
    how = rng.choice(["top-level list", "in a field", "objects", "unclosed"])
    if how == "top-level list":
        raw = b"[" * depth + b"]" * depth
    elif how == "in a field":
        depth = min(depth, 32_000)  # the header stays under 64 KiB
        raw = dumps({**h, "channel": _nested(depth)})
    elif how == "objects":
        depth = min(depth, 10_000)
        raw = b'{"version":1,"a":' + b'{"a":' * depth + b"0" + b"}" * (depth + 1)
    else:
        raw = b"[" * 60_000
    return Message(f"too-deep:{how}", (raw[:MAX_HEADER_BYTES], px), "malformed")


def _huge_int(rng: random.Random, state: FuzzState) -> Message:
    h, px = _target(rng)
    n = rng.randint(TOO_MANY_DIGITS, 20_000)
    where = rng.choice(["seq", "version", "mono_ns", "index.t", "shape[0]", "extra", "top-level"])
    if where == "top-level":
        return Message("huge-int:top-level", (dumps(_digits(rng, n)), px), "malformed")
    if where == "index.t":
        h["index"] = {"t": _digits(rng, n)}
    elif where == "shape[0]":
        h["shape"] = [_digits(rng, n), 4]
    elif where == "extra":
        h["x"] = _digits(rng, n)
    else:
        h[where] = _digits(rng, n)
    return Message(f"huge-int:{where}", (dumps(h), px), "malformed")


def _too_big(rng: random.Random, state: FuzzState) -> Message:
    h, px = _target(rng)
    n = rng.randint(MAX_HEADER_BYTES, 3 * MAX_HEADER_BYTES)
    h["channel"] = "c" * n  # valid JSON, past the header size limit
    return Message("too-big:header over 64 KiB", (dumps(h), px), "malformed")


def _version(rng: random.Random, state: FuzzState) -> Message:
    h, px = _target(rng)
    # never 1.0 or true: Python's 1.0 == True == 1, and the model takes them as 1
    versions = [None, 0, 2, -1, 99, _Raw("1" + "0" * 300), "1", "v1", [1], {"v": 1}, 1.5,
                _Raw("NaN"), _Raw("Infinity"), _Raw("1e999"), False]  # fmt: skip
    v = rng.choice(versions)
    if v is None and rng.random() < 0.5:
        del h["version"]
        label = "missing"
    else:
        h["version"] = v
        label = repr(v)
    return Message(f"version:{label}", (dumps(h), px), "version")


def _bad_float(rng: random.Random, state: FuzzState) -> Message:
    h, px = _target(rng)
    name = rng.choice(["pixel_size_um", "wall_time", "exposure_ms", "stage"])
    bad = [*NON_FINITE, '"fast"', "[1]", "{}"]
    if name == "pixel_size_um":
        bad += ["-1", "0", "-0.0", "-5e-324", "-1e308", "5e-324", "1e-7", "1e6", "1e308"]
    elif name == "exposure_ms":
        bad += ["-1", "-1e-300"]
    elif name == "wall_time":
        bad += ["null"]
    text = rng.choice(bad)
    if name == "stage":
        h["stage"] = {rng.choice("xyz"): _Raw(text)}
    else:
        h[name] = _Raw(text)
    return _h(f"{name}={text}", h, px)


def _bad_int(rng: random.Random, state: FuzzState) -> Message:
    h, px = _target(rng)
    name = rng.choice(["seq", "mono_ns"])
    # never "5" or true: pydantic's lax mode takes numeric strings and booleans as integers
    bad = ["-1", str(MAX_INT64 + 1), "1" + "0" * 300, "2.5", "NaN", "Infinity", "null", '"x"',
           "[]", "-" + "9" * 100]  # fmt: skip
    text = rng.choice(bad)
    h[name] = _Raw(text)
    return _h(f"{name}={text[:20]}", h, px)


def _bad_index(rng: random.Random, state: FuzzState) -> Message:
    h, px = _target(rng)
    name = rng.choice(["index", "sizes"])
    how = rng.choice(["huge", "negative", "past 2**31-1", "float", "nan", "name", "too many",
                      "not a dict", "string"])  # fmt: skip
    axis = rng.choice("tpczg")
    value: Any = {
        "huge": {axis: _Raw("1" + "0" * 300)},
        "negative": {axis: -rng.randint(1, 10**6)},
        "past 2**31-1": {axis: MAX_INDEX + rng.randint(1, 2**40)},
        "float": {axis: 1.5},
        "nan": {axis: _Raw(rng.choice(NON_FINITE))},
        "name": {rng.choice(["", "1t", "t t", "t-1", "x" * 17, "t.", "ü-1"]): 0},
        "too many": {f"a{i}": 0 for i in range(17)},
        "not a dict": [0, 1],
        "string": {axis: "three"},
    }[how]
    h[name] = value
    return _h(f"{name} {how}", h, px)


def _bad_stream(rng: random.Random, state: FuzzState) -> Message:
    h, px = _target(rng)
    bad = ["", "a b", "scope/1", "-lead", "x" * 65, "スコープ", "\ud800", "a\x00", 5, None,
           ["s"]]  # fmt: skip
    s = rng.choice(bad)
    if s is None and rng.random() < 0.5:
        del h["stream"]
    else:
        h["stream"] = s
    return _h(f"stream={s!r}"[:40], h, px)


def _bad_shape(rng: random.Random, state: FuzzState) -> Message:
    h, px = _target(rng)
    bad = [[], [4], [0, 4], [4, 0], [-4, 4], [4, 4, 0], [4, 4, 5], [4, 4, 4, 4], [MAX_SIDE + 1, 1],
           [16384, 16385], [4.5, 4], None, "4x4", {"rows": 4}, [_Raw("1" + "0" * 300), 1],
           [_Raw("NaN"), 4]]  # fmt: skip
    s = rng.choice(bad)
    h["shape"] = s
    return _h(f"shape={s!r}"[:40], h, px)


def _bad_dtype(rng: random.Random, state: FuzzState) -> Message:
    h, px = _target(rng)
    d = rng.choice(["int16", "float64", ">u2", "<u2", "uint16 ", "", "UINT16", "bool", 16, None])
    h["dtype"] = d
    return _h(f"dtype={d!r}", h, px)


def _unknown_field(rng: random.Random, state: FuzzState) -> Message:
    h, px = _target(rng)
    key = rng.choice(["extra", "Version", "seq ", "ç", "🔬", "__class__", "", "\ud800"])
    h[key] = rng.choice([1, "x", None, [1, 2], {"a": 1}, _Raw("NaN")])
    return _h(f"unknown field {key!r}", h, px)


def _bad_text(rng: random.Random, state: FuzzState) -> Message:
    h, px = _target(rng)
    name = rng.choice(["channel", "acquisition"])
    v = rng.choice(["a\x00b", "line\nbreak", "tab\t", "\u200b", "x" * 257, "\ud800", "\x7f", 5])
    h[name] = v
    return _h(f"{name}={v!r}"[:40], h, px)


def _missing_field(rng: random.Random, state: FuzzState) -> Message:
    h, px = _target(rng)
    name = rng.choice(["stream", "seq", "shape", "dtype", "mono_ns", "wall_time"])
    del h[name]
    return _h(f"missing {name}", h, px)


def _nested_field(rng: random.Random, state: FuzzState) -> Message:
    """Nesting the parser takes, in a field that must be flat: a validation failure."""
    h, px = _target(rng)
    name = rng.choice(["stream", "seq", "shape", "index", "stage", "extra"])
    h[name] = _nested(rng.randint(1, PARSED_DEPTH))
    return _h(f"{name} nested", h, px)


def _buffer(rng: random.Random, state: FuzzState) -> Message:
    h, px = _target(rng)
    n = len(px)
    how = rng.choice(["empty", "one short", "one long", "half", "double", "absurd shape"])
    if how == "absurd shape":  # allowed by the protocol (256 Mpx), never sent in full
        h["shape"], h["dtype"] = [MAX_SIDE, 8192], "uint16"
        data = _noise(rng, rng.randint(0, 4096))
    else:
        size = {"empty": 0, "one short": n - 1, "one long": n + 1, "half": n // 2,
                "double": 2 * n}[how]  # fmt: skip
        data = (px * 3)[:size]
        if size == n:  # half of a 1-byte frame is 0 bytes, not 1; make sure it differs
            data = px + b"\x00"
    return Message(f"buffer:{how}", (dumps(h), data), "buffer")


HOSTILE: dict[str, Callable[[random.Random, FuzzState], Message]] = {
    "parts": _parts,
    "not-utf8": _not_utf8,
    "not-json": _not_json,
    "non-object": _non_object,
    "too-deep": _too_deep,
    "huge-int": _huge_int,
    "too-big": _too_big,
    "version": _version,
    "bad-float": _bad_float,
    "bad-int": _bad_int,
    "bad-index": _bad_index,
    "bad-stream": _bad_stream,
    "bad-shape": _bad_shape,
    "bad-dtype": _bad_dtype,
    "unknown-field": _unknown_field,
    "bad-text": _bad_text,
    "missing-field": _missing_field,
    "nested-field": _nested_field,
    "buffer": _buffer,
}


# -- accepted frames ----------------------------------------------------------------------------


def _accepted(
    label: str, state: FuzzState, stream: str, shape: tuple[int, ...], dtype: str, seed: int,
    *, text: Callable[[dict], bytes] = dumps, **fields: Any,
) -> Message:  # fmt: skip
    seq = state.next_seq(stream)
    ref = FrameRef(stream, seq, tuple(shape), dtype, seed)
    h = header(stream, seq, shape, dtype, **fields)
    return Message(label, (text(h), ref.pixels().tobytes()), "accepted", ref)


def good_frame(rng: random.Random, state: FuzzState) -> Message:
    """A plain frame: stream ``good``, uint16, positions 0-2."""
    return _accepted("good:uint16", state, GOOD_STREAM, GOOD_SHAPE, "uint16",
                     rng.getrandbits(32), index={"t": state.seqs[GOOD_STREAM],
                                                 "p": rng.randint(0, 2)})  # fmt: skip


#: Valid but unusual frames, one stream each (a fixed shape per stream, so each stream's frames
#: share a file): samples per pixel, float32 with NaN and infinities, extreme metadata.
_EDGE_STREAMS: dict[str, tuple[tuple[int, ...], str]] = {
    "edge-k1": ((6, 7, 1), "uint16"),
    "edge-k2": ((5, 3, 2), "uint8"),
    "edge-rgb": ((9, 8, 3), "uint8"),
    "edge-k4": ((4, 4, 4), "uint32"),
    "edge-f32": ((9, 11), "float32"),
    "edge-meta": ((8, 8), "uint16"),
    "edge-px-tiny": ((4, 6), "uint16"),
    "edge-px-small": ((6, 4), "uint16"),
    "edge-text": ((3, 5), "uint8"),
    "edge-p": ((5, 5), "uint16"),
}
_PRINTABLE = ["GFP-grün", "DAPI 🔬", "Cy5", "ミトコンドリア", "ΔF/F", "x" * 256,
              "α-tubulin"]  # fmt: skip


def edge_frame(rng: random.Random, state: FuzzState) -> Message:
    stream = rng.choice(sorted(_EDGE_STREAMS))
    shape, dtype = _EDGE_STREAMS[stream]
    seed = rng.getrandbits(32)
    seq = state.seqs[stream]
    if stream == "edge-meta":
        extreme = rng.choice([0, 1, MAX_INDEX])
        fields = {
            "index": {"t": rng.choice([seq, MAX_INDEX]), "c": rng.choice([0, 1, MAX_INDEX]),
                      "z": extreme, **{f"a{i}": MAX_INDEX for i in range(rng.randint(0, 13))}},
            "sizes": {"t": MAX_INDEX, "c": MAX_INDEX},
            "mono_ns": rng.choice([0, 1, MAX_INT64]),
            "wall_time": rng.choice([0.0, -1e308, 1e308, 5e-324, time.time()]),
            "exposure_ms": rng.choice([0.0, 5e-324, 1e308, None]),
            "stage": {"x": rng.choice([-1e308, 0.0, 1e308]), "y": None, "z": -0.0},
            "acquisition": "ü" + "a" * 255,  # one value: seq is counted per acquisition
        }  # fmt: skip
        return _accepted("edge:extreme metadata", state, stream, shape, dtype, seed, **fields)
    if stream == "edge-p":  # a new position (so a new file and ring key) almost every frame
        index = {"t": seq, "p": rng.randint(0, MAX_INDEX), "g": rng.randint(0, MAX_INDEX)}
        return _accepted("edge:many positions", state, stream, shape, dtype, seed, index=index)
    if stream.startswith("edge-px"):  # the extremes still valid; one value per stream (file)
        size = MIN_PIXEL_UM if stream == "edge-px-tiny" else MAX_PIXEL_UM
        return _accepted(f"edge:pixel size {size:g}", state, stream, shape, dtype, seed,
                         pixel_size_um=size)  # fmt: skip
    if stream == "edge-text":
        channel = rng.choice(_PRINTABLE)
        how = rng.choice(["utf-8", "escaped", "padded"])
        if how == "utf-8":
            text = lambda h: dumps(h, ascii_only=False)  # noqa: E731
        elif how == "escaped":
            text = dumps
        else:
            text = lambda h: b" \n\t" + dumps(h) + b"\r\n "  # noqa: E731
        return _accepted(f"edge:text {how}", state, stream, shape, dtype, seed, text=text,
                         channel=channel)  # fmt: skip
    return _accepted(f"edge:{stream}", state, stream, shape, dtype, seed)


def hostile(name: str, rng: random.Random, state: FuzzState) -> Message:
    """One message of hostile category ``name``, labelled ``name: detail``."""
    msg = HOSTILE[name](rng, state)
    return replace(msg, label=f"{name}:{msg.label.split(':', 1)[-1]}")


def hostile_message(rng: random.Random, state: FuzzState) -> Message:
    return hostile(rng.choice(sorted(HOSTILE)), rng, state)


def message(
    rng: random.Random, state: FuzzState, *, good: float = 0.2, edge: float = 0.05
) -> Message:
    """One message: good with probability ``good``, a valid unusual frame with ``edge``, else
    one of the hostile categories, uniformly."""
    r = rng.random()
    if r < good:
        return good_frame(rng, state)
    if r < good + edge:
        return edge_frame(rng, state)
    return hostile_message(rng, state)


# -- the control socket -------------------------------------------------------------------------


def _would_stop(raw: bytes) -> bool:
    """Whether the server would take ``raw`` as a valid request (a ``stop`` ends the run)."""
    from pydantic import ValidationError

    from stream.server import ControlRequest

    try:
        ControlRequest.model_validate_json(raw)
    except (ValidationError, ValueError, RecursionError):
        return False
    return True


def control_message(rng: random.Random) -> ControlMessage:
    """A control request that must be refused (or, now and then, a valid ``status``)."""
    how = rng.choice(["multipart", "not json", "not utf-8", "deep", "huge int", "stop expect",
                      "stop timeout", "cmd", "extra field", "non-object", "status"])  # fmt: skip
    status = b'{"cmd":"status"}'
    if how == "status":
        return ControlMessage("status", (status,), rejected=False)
    if how == "multipart":
        parts = rng.choice([(status, b"more"), (b"", b""), (status, status, status)])
        return ControlMessage(f"multipart:{len(parts)} parts", parts)
    if how == "not json":
        raw = rng.choice([b"", b"status", b"{cmd: status}", b"{'cmd': 'stop'}", b"\x00" * 9,
                          b'{"cmd":"stop"', b" " * 200_000])  # fmt: skip
    elif how == "not utf-8":
        raw = rng.choice([b"\xff\xfe", b'{"cmd":"st\xffop"}', b'{"cmd":"status"}\x80'])
    elif how == "deep":
        depth = rng.randint(TOO_DEEP, 60_000)
        raw = rng.choice([b"[" * depth, b'{"cmd":"stop","expect":' + b"[" * depth,
                          b'{"cmd":"status","x":' + b"{" * depth])  # fmt: skip
    elif how == "huge int":
        raw = b'{"cmd":"stop","expect":{"s":' + dumps(_digits(rng, rng.randint(20, 6000))) + b"}}"
    elif how == "stop expect":
        v = rng.choice(["Infinity", "-Infinity", "NaN", "-1", str(MAX_INT64 + 1), "1e30", "1.5",
                        '"x"', "null", "[1]", "{}"])  # fmt: skip
        raw = rng.choice([b'{"cmd":"stop","expect":{"s":' + v.encode() + b"}}",
                          b'{"cmd":"stop","expect":[' + v.encode() + b"]}"])  # fmt: skip
    elif how == "stop timeout":
        v = rng.choice(["Infinity", "NaN", "-1", "3601", "1e999", '"x"', "null", "-Infinity"])
        raw = b'{"cmd":"stop","timeout_s":' + v.encode() + b"}"
    elif how == "cmd":
        raw = dumps({"cmd": rng.choice(["nope", "STOP", "Stop", "", 5, None, ["stop"], "stop "])})
    elif how == "extra field":
        raw = dumps({"cmd": rng.choice(["status", "stop"]), rng.choice(["x", "expects"]): 1})
    else:
        raw = rng.choice([b"[]", b'["stop"]', b'"stop"', b"1", b"null", b"true"])
    if _would_stop(raw):  # a generator bug, never a request the server should ever see
        raise AssertionError(f"control fuzz made a valid request {raw[:80]!r}")
    return ControlMessage(f"{how}:{raw[:30]!r}", (raw,))


# -- every case once ----------------------------------------------------------------------------


class _Cycle(random.Random):
    """A Random whose first ``choice`` takes option ``pick`` (modulo), to walk through a
    category's variants; everything after it is random."""

    def __init__(self, pick: int, seed: int = 0) -> None:
        super().__init__(seed)
        self.pick: int | None = pick

    def choice(self, seq: Any) -> Any:
        if self.pick is None:
            return super().choice(seq)
        pick, self.pick = self.pick, None
        return seq[pick % len(seq)]


def catalog(state: FuzzState, *, rounds: int = 20, seed: int = 0) -> list[Message]:
    """Each hostile category ``rounds`` times (walking through its variants), one edge frame
    per edge stream and variant, and a good frame between every two: deterministic."""
    out: list[Message] = []
    rng = random.Random(seed)
    for name in sorted(HOSTILE):
        for pick in range(rounds):
            out.append(hostile(name, _Cycle(pick, seed + pick), state))
            out.append(good_frame(rng, state))
    for pick in range(len(_EDGE_STREAMS) * 3):
        out.append(edge_frame(_Cycle(pick, seed + pick), state))
        out.append(good_frame(rng, state))
    return out


def control_catalog(*, rounds: int = 12, seed: int = 0) -> list[ControlMessage]:
    """Control requests walking through the variants (valid ``status`` ones included)."""
    return [control_message(_Cycle(pick, seed + pick)) for pick in range(rounds * 11)]


# -- talking to a server ------------------------------------------------------------------------


class ServerProcess:
    """``scopecast serve`` in a subprocess on free loopback ports, its output in files (a pipe
    nobody reads would stop it once full)."""

    def __init__(self, out: Path, *args: str, publish: bool = True, timeout_s: float = 90) -> None:
        self.listen, self.control = free_endpoint(), free_endpoint()
        self.publish = free_endpoint() if publish else "none"
        # open as long as this object: log() and the summary read them back
        self.stdout = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self.stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115
        cmd = [sys.executable, "-m", "stream", "serve", "--listen", self.listen, "--publish",
               self.publish, "--control", self.control, "--out", str(out), "--json",
               *args]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=self.stdout, stderr=self.stderr, text=True)
        try:
            self.ready = wait_ready(self.control, process=self.proc, timeout_s=timeout_s)
        except BaseException:
            self.kill()
            raise
        self.run_dir = Path(self.ready.out_dir)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def status(self, timeout_s: float = 10.0) -> ServerStatus:
        return server_status(self.control, timeout_s=timeout_s)

    def stop(self, expect: dict[str, int] | None = None, timeout_s: float = 600) -> ServerStatus:
        """Stop it (after ``expect`` frames per stream arrived); its summary."""
        try:
            summary: ServerStatus | None = server_stop(
                self.control, expect=expect or {}, timeout_s=timeout_s
            )
        except ControlError:
            summary = None
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.kill()
        if summary is not None:
            return summary
        printed = self.summary()
        if printed is None:
            raise ControlError(f"the server exited with {self.proc.returncode} without a "
                               f"summary: {self.log()[-2000:]}")  # fmt: skip
        if "engine" not in printed:  # it died before it had a status: healthy false, failure
            raise ControlError(f"the server exited with {self.proc.returncode}, its stage "
                               f"{printed.get('failure')} dead: {self.log()[-2000:]}")  # fmt: skip
        return parse_status(printed, "the server's printed summary")

    def summary(self) -> dict[str, Any] | None:
        """The last JSON line it printed (``serve --json``'s summary), if any."""
        self.stdout.seek(0)
        for line in reversed(self.stdout.read().strip().splitlines()):
            try:
                return json.loads(line)
            except ValueError:
                continue
        return None

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Client:
    """A PUSH socket for messages and fresh REQ sockets for control requests."""

    def __init__(self, listen: str, control: str, *, send_timeout_s: float = 30.0) -> None:
        self.control = control
        self.ctx = zmq.Context()
        self.push = self.ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.SNDHWM, 1000)
        self.push.setsockopt(zmq.SNDTIMEO, int(send_timeout_s * 1000))
        self.push.setsockopt(zmq.LINGER, 10_000)
        self.push.connect(listen)

    def send(self, msg: Message) -> None:
        """Send one message (blocks while the server is behind; raises zmq.Again past the
        send timeout: the server stopped reading)."""
        self.push.send_multipart(list(msg.parts))

    def ask(self, msg: ControlMessage, timeout_s: float = 10.0) -> dict[str, Any] | None:
        """Send one control request on a fresh REQ socket; the JSON answer, or None if none
        came within ``timeout_s`` (the socket is then thrown away)."""
        sock = self.ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.control)
            sock.send_multipart(list(msg.parts))
            if not sock.poll(int(timeout_s * 1000)):
                return None
            reply = sock.recv()
        finally:
            sock.close(0)
        try:
            return json.loads(reply)
        except ValueError:
            return {"unparseable": reply[:200].decode("utf-8", "replace")}

    def close(self) -> None:
        self.push.close()
        self.ctx.term()


@dataclass
class Tally:
    """What was sent and what the server must therefore have counted."""

    sent: Counter[str] = field(default_factory=Counter)  # by expected kind
    categories: Counter[str] = field(default_factory=Counter)
    frames: dict[tuple[str, int], FrameRef] = field(default_factory=dict)
    control_sent: Counter[str] = field(default_factory=Counter)
    control_rejected: int = 0  # requests that must be refused
    control_problems: list[str] = field(default_factory=list)

    def add(self, msg: Message) -> None:
        self.sent[msg.expect] += 1
        self.categories[msg.category] += 1
        if msg.frame is not None:
            self.frames[(msg.frame.stream, msg.frame.seq)] = msg.frame

    def answer(self, msg: ControlMessage, reply: dict[str, Any] | None) -> None:
        self.control_sent[msg.category] += 1
        self.control_rejected += msg.rejected
        if reply is None:
            self.control_problems.append(f"no answer to {msg.label}")
        elif msg.rejected and "error" not in reply:
            self.control_problems.append(f"{msg.label} not refused: {str(reply)[:200]}")
        elif not msg.rejected and ("error" in reply or "frames_received" not in reply):
            self.control_problems.append(f"{msg.label} answered {str(reply)[:200]}")

    @property
    def messages(self) -> int:
        return sum(self.sent.values())

    def expect_by_stream(self) -> dict[str, int]:
        return dict(Counter(stream for stream, _ in self.frames))


def processed(status: ServerStatus) -> int:
    """Messages the server has taken off its socket: received plus rejected."""
    return status.frames_received + sum(status.frames_rejected.values())


def raw_outcomes(status: ServerStatus) -> int:
    """Raw frames the writer is done with: written, refused by the disk, or failed."""
    return (status.frames_written.raw + status.disk_errors.raw
            + sum(status.stage_errors.writer.values()))  # fmt: skip


def wait_processed(
    server: ServerProcess, before: ServerStatus, tally: Tally, timeout_s: float = 60.0
) -> ServerStatus:
    """Poll ``status`` until the server took every message of ``tally`` sent since ``before``
    and its writer is done with every accepted frame (or timeout, or a dead stage); the last
    status."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = server.status()
        done = (
            processed(status) - processed(before) >= tally.messages
            and raw_outcomes(status) - raw_outcomes(before) >= tally.sent["accepted"]
        )
        if done or not status.healthy or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def check_written(run_dir: Path, frames: dict[tuple[str, int], FrameRef]) -> dict[str, Any]:
    """Every expected frame in the index, read back at its offset, crc32- and bit-checked."""
    index = read_index(run_dir / INDEX_NAME)
    found: dict[tuple[str, int], dict[str, Any]] = {}
    unexpected = 0
    for r in index:
        if r.get("kind") != "raw":
            continue
        key = (r["header"]["stream"], r["header"]["seq"])
        if key in frames:
            found[key] = r
        else:
            unexpected += 1
    exact = 0
    missing: Counter[str] = Counter()
    differ: Counter[str] = Counter()
    first: dict[str, str] = {}
    handles: dict[str, Any] = {}
    try:
        for key, ref in frames.items():
            r = found.get(key)
            if r is None:
                missing[ref.stream] += 1
                first.setdefault(ref.stream, f"seq {ref.seq}")
                continue
            f = handles.get(r["file"])
            if f is None:
                f = handles[r["file"]] = open(run_dir / r["file"], "rb")  # noqa: SIM115
            f.seek(r["offset"])
            data = f.read(r["nbytes"])
            ok = (
                data == ref.pixels().tobytes()
                and zlib.crc32(data) == r["crc32"]
                and tuple(r["shape"]) == ref.shape
                and r["dtype"] == ref.dtype
            )
            exact += ok
            if not ok:
                differ[ref.stream] += 1
                first.setdefault(ref.stream, f"seq {ref.seq} ({r['file']} plane {r['plane']})")
    finally:
        for f in handles.values():
            f.close()
    sent = Counter(stream for stream, _ in frames)
    problems = [f"{stream}: {n} of {sent[stream]} frames not in the index (first: {first[stream]})"
                for stream, n in sorted(missing.items())]  # fmt: skip
    problems += [f"{stream}: {n} of {sent[stream]} frames differ on disk (first: {first[stream]})"
                 for stream, n in sorted(differ.items())]  # fmt: skip
    return {"indexed": len(found), "exact": exact, "unexpected": unexpected, "problems": problems}


def mismatches(tally: Tally, before: ServerStatus, after: ServerStatus) -> list[str]:
    """Everything the server's counters (``after`` minus ``before``) say that ``tally`` does
    not: rejected kinds, frames received and written, gaps, control refusals, stage health."""
    out: list[str] = []
    if not after.healthy:
        out.append(f"server unhealthy: failure {after.failure}")
    for stage, kinds in after.stage_errors.seen().items():
        for kind, n in kinds.items():
            was = getattr(before.stage_errors, stage).get(kind, 0)
            if n - was:
                out.append(f"stage {stage}: {n - was} unexpected {kind}")
    got = Counter(after.frames_rejected)
    got.subtract(before.frames_rejected)
    for kind in sorted(set(REJECTED) | set(got)):
        if got.get(kind, 0) != tally.sent.get(kind, 0):
            out.append(f"rejected {kind}: sent {tally.sent.get(kind, 0)}, server counted "
                       f"{got.get(kind, 0)}")  # fmt: skip
    delta = {k: getattr(after, k) - getattr(before, k) for k in (
        "frames_received", "frames_missing", "requests_rejected")}  # fmt: skip
    if delta["frames_received"] != tally.sent["accepted"]:
        out.append(f"received: sent {tally.sent['accepted']} valid frames, server counted "
                   f"{delta['frames_received']}")  # fmt: skip
    raw = after.frames_written.raw - before.frames_written.raw
    if raw != tally.sent["accepted"]:
        out.append(f"raw frames written: {raw} of {tally.sent['accepted']}")
    disk = Counter(after.disk_errors.seen())
    disk.subtract(before.disk_errors.seen())
    if any(disk.values()):
        out.append(f"disk errors: {dict(+disk)}")
    if delta["frames_missing"]:
        out.append(f"{delta['frames_missing']} frames missing between sequence numbers")
    if delta["requests_rejected"] != tally.control_rejected:
        out.append(f"control: sent {tally.control_rejected} bad requests, server refused "
                   f"{delta['requests_rejected']}")  # fmt: skip
    out.extend(tally.control_problems[:20])
    return out


# -- the bench ----------------------------------------------------------------------------------


def run_fuzz(
    messages: int = 100_000,
    *,
    seed: int = 0,
    out: Path | None = None,
    good: float = 0.2,
    edge: float = 0.05,
    control: float = 0.01,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Start a server, send ``messages`` (``good`` of them good frames, ``control`` of them
    control requests, the rest edge and hostile ones), stop it, check everything."""
    if messages < 1 or not 0 <= good <= 1 or not 0 <= control <= 1:
        raise ValueError(f"messages={messages} must be >= 1 and good={good}, control={control} "
                         "fractions in 0..1")  # fmt: skip
    say = progress or (lambda m: None)
    rng = random.Random(seed)
    state, tally = FuzzState(), Tally()
    problems: list[str] = []
    timeline: list[dict[str, Any]] = []  # server RSS and queue depths while sending
    with tempfile.TemporaryDirectory(prefix="scopecast-fuzz-") as tmp:
        base = Path(out) if out is not None else Path(tmp)
        server = ServerProcess(base, "--engine", "identity", "--mode", "complete")
        client = Client(server.listen, server.control)
        t0 = time.monotonic()
        after: ServerStatus | None = None
        summary: ServerStatus | None = None
        try:
            before = server.status()
            for i in range(messages):
                if rng.random() < control:
                    cm = control_message(rng)
                    tally.answer(cm, client.ask(cm))
                    continue
                msg = message(rng, state, good=good / max(1e-9, 1 - control), edge=edge)
                tally.add(msg)
                try:
                    client.send(msg)
                except zmq.Again:
                    problems.append(f"the server stopped reading at message {i} ({msg.label})")
                    break
                if i % 10_000 == 0 and i:
                    if not server.alive:
                        problems.append(f"the server exited by itself at message {i}")
                        break
                    with contextlib.suppress(ControlError):
                        now = server.status()
                        timeline.append({"messages": i, "rss_mb": now.rss_mb,
                                         "queues": now.queues.model_dump()})  # fmt: skip
                    say(f"{i} messages sent, {time.monotonic() - t0:.0f} s, server RSS "
                        f"{timeline[-1]['rss_mb'] if timeline else '?'} MB, queues "
                        f"{timeline[-1]['queues'] if timeline else '?'}")  # fmt: skip
            sent_s = time.monotonic() - t0
            try:
                after = wait_processed(server, before, tally, timeout_s=300)
                say(f"{processed(after) - processed(before)} messages processed, "
                    f"{time.monotonic() - t0:.0f} s; stopping the server")  # fmt: skip
            except ControlError as e:
                problems.append(f"no status after sending: {e}")
            client.close()
            try:
                summary = server.stop(tally.expect_by_stream())
            except ControlError as e:
                problems.append(str(e))
        finally:
            server.kill()
        elapsed = time.monotonic() - t0
        for counters in (after, summary):
            if counters:
                problems += mismatches(tally, before, counters)
        written = check_written(server.run_dir, tally.frames)
    problems += written["problems"]
    if written["exact"] != len(tally.frames):
        problems.append(f"bit-exact on disk: {written['exact']} of {len(tally.frames)}")
    if summary is not None and summary.disk_errors.seen():
        problems.append(f"disk errors: {summary.disk_errors.seen()}")
    problems = list(dict.fromkeys(problems))  # the same finding from status and summary once
    got = summary.model_dump(mode="json") if summary is not None else {}
    return {
        "kind": "fuzz",
        "messages": messages,
        "seed": seed,
        "sent_by_kind": dict(tally.sent),
        "sent_by_category": dict(sorted(tally.categories.items())),
        "control_sent": dict(sorted(tally.control_sent.items())),
        "control_rejected_expected": tally.control_rejected,
        "rejected_by_server": got.get("frames_rejected", {}),
        "requests_rejected_by_server": got.get("requests_rejected"),
        "good_frames": {
            "sent": len(tally.frames),
            "received": got.get("frames_received"),
            "written": got.get("frames_written", {}).get("raw"),
            "indexed": written["indexed"],
            "bit_exact": written["exact"],
            "enhanced": got.get("frames_enhanced"),
        },
        "healthy": got.get("healthy"),
        "failure": got.get("failure"),
        "stage_errors": got.get("stage_errors", {}),
        "engine_errors": got.get("engine_errors", {}),
        "disk_errors": got.get("disk_errors", {}),
        "rss_mb": {
            "before": before.rss_mb,
            "after": last.rss_mb if (last := after or summary) else None,
        },
        "timeline": timeline,
        "send_s": sent_s,
        "elapsed_s": elapsed,
        "messages_per_s": messages / sent_s if sent_s > 0 else None,
        "server_log_tail": server.log()[-20_000:] if problems else "",
        "out_dir": str(server.run_dir) if out is not None else None,
        "problems": problems,
        "ok": not problems,
    }


def format_report(r: dict[str, Any]) -> str:
    """The fuzz result as plain lines for the terminal."""
    rate = r["messages_per_s"] or 0
    lines = [
        (
            f"fuzz: {r['messages']} messages (seed {r['seed']}) in {r['elapsed_s']:.1f} s "
            f"({rate:.0f} msg/s sent)"
        ),
        "sent by expected outcome:",
    ]
    g = r["good_frames"]
    for kind in KINDS:
        counted = g["received"] if kind == "accepted" else r["rejected_by_server"].get(kind)
        lines.append(f"  {kind:<10} sent {r['sent_by_kind'].get(kind, 0):>8}   server counted "
                     f"{counted or 0:>8}")  # fmt: skip
    by_category = ", ".join(f"{k} {v}" for k, v in r["sent_by_category"].items())
    lines.append(f"sent by category: {by_category}")
    lines.append(f"control: {sum(r['control_sent'].values())} requests, "
                 f"{r['control_rejected_expected']} malformed, server refused "
                 f"{r['requests_rejected_by_server']}")  # fmt: skip
    lines.append(f"accepted frames: sent {g['sent']}, written {g['written']}, indexed "
                 f"{g['indexed']}, bit-exact {g['bit_exact']}, "
                 f"enhanced {g['enhanced']}")  # fmt: skip
    lines.append(f"healthy {r['healthy']}; dead stage: {r['failure'] or 'none'}; stage errors "
                 f"{r['stage_errors'] or 0}; engine errors {r['engine_errors'] or 0}; disk errors "
                 f"{r['disk_errors'] or 0}")  # fmt: skip
    rss = r["rss_mb"]
    lines.append(f"server RSS: {rss['before'] or 0:.0f} MB before, {rss['after'] or 0:.0f} MB "
                 "after (the high-water mark of its queues)")  # fmt: skip
    if r["problems"]:
        said = [ln[:300] for ln in r.get("server_log_tail", "").splitlines()
                if ln.startswith(("WARNING", "ERROR", "CRITICAL"))]  # fmt: skip
        if said:
            lines.append("server log (once per kind):")
            lines += [f"  {ln}" for ln in said[-20:]]
        lines.append(f"MISMATCHES ({len(r['problems'])}):")
        lines += [f"  - {p}" for p in r["problems"]]
    else:
        lines.append("OK: every message accounted for")
    return "\n".join(lines)
