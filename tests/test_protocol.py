"""Wire protocol: round trips, and every malformed message rejected with a typed error."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stream.protocol import (
    DTYPES,
    PROTOCOL_VERSION,
    BufferMismatch,
    FrameHeader,
    InvalidHeader,
    MalformedMessage,
    UnsupportedVersion,
    decode,
    encode,
)


def header_for(arr: np.ndarray, **kw) -> FrameHeader:
    base = {
        "stream": "cam0",
        "seq": 7,
        "index": {"t": 3, "p": 1, "c": 0, "z": 2},
        "shape": arr.shape,
        "dtype": arr.dtype.name,
        "mono_ns": 123,
        "wall_time": 1.5e9,
        "exposure_ms": 10.0,
        "pixel_size_um": 0.1,
        "stage": {"x": 1.0, "y": -2.0, "z": 0.0},
        "channel": "FITC",
    }
    return FrameHeader(**{**base, **kw})


@settings(max_examples=60, deadline=None)
@given(
    arr=hnp.arrays(
        dtype=st.sampled_from([np.uint8, np.uint16, np.uint32, np.float32]),
        shape=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    ),
    seq=st.integers(0, 2**40),
)
def test_round_trip(arr: np.ndarray, seq: int) -> None:
    h = header_for(arr, seq=seq)
    frames = [bytes(memoryview(f)) for f in encode(h, arr)]
    h2, arr2 = decode(frames)
    assert h2 == h
    np.testing.assert_array_equal(arr2, arr)
    assert arr2.dtype == DTYPES[h.dtype]


def test_decode_is_zero_copy_and_read_only() -> None:
    arr = np.arange(12, dtype=np.uint16).reshape(3, 4)
    raw = bytearray(arr.tobytes())
    _, view = decode([encode(header_for(arr), arr)[0], raw])
    raw[0] = 99
    assert view[0, 0] == 99  # a view on the received buffer, not a copy


def test_key_is_stream_position_channel_z() -> None:
    h = header_for(np.zeros((2, 2), np.uint16))
    assert h.key == "cam0/p1/c0/z2"


@pytest.mark.parametrize(
    ("frames", "error", "match"),
    [
        ([b"{}"], MalformedMessage, "expected 2 frames"),
        ([b"\xff\xfe", b""], MalformedMessage, "not UTF-8 JSON"),
        ([b"not json", b""], MalformedMessage, "not UTF-8 JSON"),
        ([b"[1, 2]", b""], MalformedMessage, "JSON object"),
        ([json.dumps({"version": 99}).encode(), b""], UnsupportedVersion, "version 99"),
        ([json.dumps({"stream": "a"}).encode(), b""], UnsupportedVersion, "None"),
    ],
)
def test_malformed(frames, error, match) -> None:
    with pytest.raises(error, match=match):
        decode(frames)


def _raw(**changes) -> list[bytes]:
    arr = np.zeros((4, 4), np.uint16)
    obj = json.loads(encode(header_for(arr), arr)[0])
    obj.update(changes)
    obj = {k: v for k, v in obj.items() if v is not ...}
    return [json.dumps(obj).encode(), arr.tobytes()]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"shape": [0, 4]}, "sides"),
        ({"shape": [4]}, "rows, cols"),
        ({"shape": [100000, 100000]}, "sides"),
        ({"shape": [16384, 16384, 4]}, "more than"),
        ({"dtype": "float64"}, "float64"),
        ({"seq": -1}, "seq"),
        ({"stream": "a b/c"}, "stream id"),
        ({"mono_ns": ...}, "mono_ns"),
        ({"index": {"t": -2}}, "index"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_invalid_header_rejected_whole(changes, match) -> None:
    with pytest.raises(InvalidHeader, match=match):
        decode(_raw(**changes))


def test_buffer_that_does_not_match_header() -> None:
    header, pixels = _raw()
    with pytest.raises(BufferMismatch, match="32 bytes"):
        decode([header, pixels[:-2]])


def test_encode_refuses_mismatched_or_strided_arrays() -> None:
    arr = np.zeros((4, 4), np.uint16)
    with pytest.raises(BufferMismatch):
        encode(header_for(arr), np.zeros((4, 5), np.uint16))
    with pytest.raises(BufferMismatch, match="C-contiguous"):
        encode(header_for(arr[:, :2]), arr[:, :2])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=3))
def test_random_bytes_only_raise_protocol_errors(frames) -> None:
    from stream.protocol import ProtocolError

    with contextlib.suppress(ProtocolError):  # any other exception fails the test
        decode(frames)


def test_version_constant() -> None:
    assert header_for(np.zeros((1, 1), np.uint8)).version == PROTOCOL_VERSION
