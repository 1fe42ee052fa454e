"""Latest-frame-wins: the viewer keeps the newest frame of each PUB topic, and each browser is
sent the newest frame of each pane only once it acknowledged the previous one.

A slow browser therefore sees fewer frames, never older ones, and nothing queues up for it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from ..protocol import PublishedHeader

PANES = ("raw", "enhanced")


@dataclass(frozen=True)
class KeyInfo:
    """What the page needs to offer one key (stream, position, channel, z) in its selectors."""

    key: str
    stream: str
    p: int
    c: int
    z: int
    channel: str | None

    @classmethod
    def of(cls, header: PublishedHeader) -> KeyInfo:
        i = header.index
        return cls(header.key, header.stream, i.get("p", 0), i.get("c", 0), i.get("z", 0),
                   header.channel)  # fmt: skip


@dataclass(eq=False)
class Frame:
    """One received frame: its header, its pixels, and its number ``n`` within its topic."""

    header: PublishedHeader
    pixels: np.ndarray
    n: int

    @property
    def topic(self) -> str:
        return f"{self.header.key}/{self.header.kind}"

    @property
    def nbytes(self) -> int:
        return self.pixels.nbytes

    @cached_property
    def message(self) -> bytes:
        """The WebSocket message, built once however many browsers get it (see
        :func:`encode_frame`)."""
        return encode_frame(self.header, self.pixels, n=self.n)


def encode_frame(header: PublishedHeader, pixels: np.ndarray, **extra: Any) -> bytes:
    """[uint32 LE length | JSON header padded to 8 bytes | pixels, little-endian, row-major].

    The padding lets the browser view the pixels as a typed array without copying them.
    """
    meta = header.model_dump(mode="json", exclude_none=True)
    meta.update(pane=header.kind, key=header.key, **extra)
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-(4 + len(text)) % 8)
    return len(text).to_bytes(4, "little") + text + np.ascontiguousarray(pixels).tobytes()


class LatestFrames:
    """The newest frame of every topic ('{key}/raw', '{key}/enhanced'), within a memory budget.

    Past ``max_bytes`` the frames of the topics updated longest ago are dropped (their keys
    stay listed), except topics a browser is watching: a 96-well plate of 2048x2048 frames does
    not hold a gigabyte of pictures nobody looks at.
    """

    def __init__(self, max_bytes: int = 512 * 2**20) -> None:
        self.max_bytes = max_bytes
        self.keys: dict[str, KeyInfo] = {}
        self.counts: dict[str, int] = {}
        self._frames: OrderedDict[str, Frame] = OrderedDict()
        self._bytes = 0

    def put(
        self, header: PublishedHeader, pixels: np.ndarray, watched: AbstractSet[str] = frozenset()
    ) -> bool:
        """Keep this frame as its topic's newest; True when its key was not known before."""
        new_key = header.key not in self.keys
        if new_key:
            self.keys[header.key] = KeyInfo.of(header)
        topic = f"{header.key}/{header.kind}"
        n = self.counts.get(topic, 0)
        self.counts[topic] = n + 1
        old = self._frames.pop(topic, None)
        if old is not None:
            self._bytes -= old.nbytes
        self._frames[topic] = Frame(header, pixels, n)
        self._bytes += pixels.nbytes
        self._evict(watched | {topic})
        return new_key

    def get(self, topic: str) -> Frame | None:
        return self._frames.get(topic)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def _evict(self, keep: AbstractSet[str]) -> None:
        for topic in list(self._frames):
            if self._bytes <= self.max_bytes:
                return
            if topic not in keep:
                self._bytes -= self._frames.pop(topic).nbytes


@dataclass
class PaneSlots:
    """One browser's view: the key it watches and, per pane, what it was last sent.

    ``due`` hands out a pane's newest frame only when the browser acknowledged the previous
    one (one frame in flight per pane); frames that arrived meanwhile are counted in
    ``not_shown`` and never sent.
    """

    key: str | None = None
    in_flight: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(PANES, False))
    last: dict[str, tuple[str, int] | None] = field(default_factory=lambda: dict.fromkeys(PANES))
    not_shown: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PANES, 0))

    def select(self, key: str | None) -> None:
        """Watch another key; its newest frames become due at once."""
        self.key = key

    def ack(self, pane: str) -> None:
        """The browser has drawn its frame of ``pane``: the next one may go."""
        if pane in self.in_flight:
            self.in_flight[pane] = False

    @property
    def topics(self) -> set[str]:
        return {f"{self.key}/{p}" for p in PANES} if self.key else set()

    def due(self, latest: LatestFrames) -> list[Frame]:
        """The frames to send now (at most one per pane), marked as in flight."""
        if self.key is None:
            return []
        out = []
        for pane in PANES:
            topic = f"{self.key}/{pane}"
            frame = latest.get(topic)
            if frame is None or self.in_flight[pane]:
                continue
            last = self.last[pane]
            if last is not None and last[0] == topic:
                if frame.n <= last[1]:
                    continue
                self.not_shown[pane] += frame.n - last[1] - 1
            self.last[pane] = (topic, frame.n)
            self.in_flight[pane] = True
            out.append(frame)
        return out
