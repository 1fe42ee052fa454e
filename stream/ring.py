"""Per-key ring buffers: the temporal state (frames, previous outputs, background) of an engine.

The server keeps one :class:`Ring` per key (stream, position, channel, z) = ``FrameHeader.key``,
so every position of a plate has its own independent state. Each push checks the header
against the key's previous frame and resets the state in a defined way, checked in this
order (the first that applies wins):

===========  ====================================================  ==========================
reason       when                                                  what is cleared
===========  ====================================================  ==========================
first        the key's first frame                                 (nothing held yet)
acquisition  ``header.acquisition`` differs from the previous one  everything, background too
shape        shape or dtype changed                                everything, background too
order        t not above the previous t (a repeat, or going back)  frames, previous outputs
gap          t jumped by more than 1 (frames lost or skipped)      frames, previous outputs
pause        mono_ns advanced by more than ``max_pause_s``         frames, previous outputs
===========  ====================================================  ==========================

order and gap are checked only when both frames carry a ``t`` index (multi-position streams
interleave ``seq``, so it says nothing per key); pause is off when ``max_pause_s`` is None.
Every reset increments ``generation``, so a previous output computed before the reset is
refused by :meth:`Ring.set_previous`. Frames are held by reference, never copied.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Literal, overload

import numpy as np

from .protocol import DTYPES, FrameHeader

RESET_REASONS = ("first", "acquisition", "shape", "order", "gap", "pause")
_FULL_RESETS = frozenset({"first", "acquisition", "shape"})


@dataclass(frozen=True)
class Window:
    """What one enhancement of one frame needs: a snapshot of its key's temporal state."""

    frames: list[np.ndarray]  # exactly `window` frames, oldest first, start padded with the oldest
    previous: dict[int, np.ndarray]  # chain stage index -> that stage's previous output
    background: np.ndarray | None  # float32 reference background if requested, else None
    generation: int  # increments on every reset; pass it back to set_previous
    reset: str | None  # reason if the latest push reset the state, else None


class Ring:
    """The temporal state of one key: the last `window` frames, previous outputs, background."""

    def __init__(
        self,
        window: int = 1,
        *,
        background: bool = False,
        background_frames: int = 9,
        reference: np.ndarray | None = None,
        max_pause_s: float | None = 10.0,
    ) -> None:
        _check_config(window, background_frames, max_pause_s)
        self.window = window
        self.background = background
        self.max_pause_ns = None if max_pause_s is None else int(max_pause_s * 1e9)
        self.reference = (
            np.asarray(reference, np.float32) if background and reference is not None else None
        )
        self.generation = 0
        self.resets: Counter[str] = Counter()
        self._frames: deque[np.ndarray] = deque(maxlen=window)
        keep_history = background and self.reference is None
        self._history: deque[np.ndarray] | None = (
            deque(maxlen=background_frames) if keep_history else None
        )
        self._median: np.ndarray | None = None
        self._previous: dict[int, np.ndarray] = {}
        self._last: FrameHeader | None = None
        self._reset: str | None = None

    def push(self, header: FrameHeader, frame: np.ndarray) -> str | None:
        """Add the frame of `header` (held by reference); return the reset reason or None."""
        if frame.shape != header.shape or frame.dtype != DTYPES[header.dtype]:
            raise ValueError(
                f"frame {frame.shape} {frame.dtype} does not match its header {header.shape} "
                f"{header.dtype} for key {header.key!r}: push the array the header describes"
            )
        if self.reference is not None and self.reference.shape != frame.shape:
            raise ValueError(
                f"reference background {self.reference.shape} does not match frame {frame.shape} "
                f"of key {header.key!r}: use the calibration profile measured at this frame size"
            )
        reason = self._reset_reason(header)
        if reason is not None:
            self.generation += 1
            self.resets[reason] += 1
            self._frames.clear()
            self._previous.clear()
            if reason in _FULL_RESETS and self._history is not None:
                self._history.clear()
        self._frames.append(frame)
        if self._history is not None:
            self._history.append(frame)
            self._median = None
        self._last = header
        self._reset = reason
        return reason

    def snapshot(self) -> Window:
        """The window for the latest pushed frame; the background median is computed lazily."""
        if not self._frames:
            raise RuntimeError("snapshot of an empty ring: push a frame first")
        frames = list(self._frames)
        frames = [frames[0]] * (self.window - len(frames)) + frames
        return Window(
            frames=frames,
            previous=dict(self._previous),
            background=self._background(),
            generation=self.generation,
            reset=self._reset,
        )

    def set_previous(self, stage: int, output: np.ndarray, generation: int) -> bool:
        """Keep `output` as stage `stage`'s previous output, unless the state was reset since."""
        if generation != self.generation:
            return False
        self._previous[stage] = output
        return True

    @property
    def nbytes(self) -> int:
        """Approximate memory held: every distinct array (frames, history, outputs, background)."""
        arrays = [*self._frames, *(self._history or ()), *self._previous.values()]
        arrays += [a for a in (self._median, self.reference) if a is not None]
        return sum({id(a): a.nbytes for a in arrays}.values())

    def _reset_reason(self, header: FrameHeader) -> str | None:
        last = self._last
        if last is None:
            return "first"
        if header.acquisition != last.acquisition:
            return "acquisition"
        if header.shape != last.shape or header.dtype != last.dtype:
            return "shape"
        t, last_t = header.index.get("t"), last.index.get("t")
        if t is not None and last_t is not None:
            if t <= last_t:
                return "order"
            if t > last_t + 1:
                return "gap"
        if self.max_pause_ns is not None and header.mono_ns - last.mono_ns > self.max_pause_ns:
            return "pause"
        return None

    def _background(self) -> np.ndarray | None:
        if not self.background:
            return None
        if self.reference is not None:
            return self.reference
        if self._median is None:
            assert self._history  # push always appends before a snapshot can run
            self._median = np.median(np.stack(self._history), axis=0).astype(np.float32)
        return self._median


class Rings:
    """Thread-safe rings keyed by ``FrameHeader.key``, created on a key's first frame."""

    def __init__(
        self,
        window: int = 1,
        *,
        background: bool = False,
        background_frames: int = 9,
        references: dict[str, np.ndarray] | None = None,
        max_pause_s: float | None = 10.0,
    ) -> None:
        _check_config(window, background_frames, max_pause_s)
        self._config: dict[str, Any] = {
            "window": window,
            "background": background,
            "background_frames": background_frames,
            "max_pause_s": max_pause_s,
        }
        self._references = dict(references or {})
        self._rings: dict[str, Ring] = {}
        self._lock = threading.Lock()

    @overload
    def push(
        self, header: FrameHeader, frame: np.ndarray, *, snapshot: Literal[True] = True
    ) -> Window: ...
    @overload
    def push(self, header: FrameHeader, frame: np.ndarray, *, snapshot: Literal[False]) -> None: ...
    def push(
        self, header: FrameHeader, frame: np.ndarray, *, snapshot: bool = True
    ) -> Window | None:
        """Push the frame into its key's ring and return that key's window, atomically.

        ``snapshot=False`` only records the frame (live mode: the window is taken later).
        """
        key = header.key
        with self._lock:
            ring = self._rings.get(key)
            if ring is None:
                ring = Ring(reference=self._references.get(key), **self._config)
            ring.push(header, frame)
            self._rings[key] = ring  # only once the first push was accepted
            return ring.snapshot() if snapshot else None

    def snapshot(self, key: str) -> Window:
        """The window for the latest frame pushed to `key`."""
        with self._lock:
            ring = self._rings.get(key)
            if ring is None:
                raise KeyError(f"no frame was pushed for key {key!r}: push one before a snapshot")
            return ring.snapshot()

    def set_previous(self, key: str, stage: int, output: np.ndarray, generation: int) -> bool:
        """Keep a stage's output for `key` unless that key was reset since (or never seen)."""
        with self._lock:
            ring = self._rings.get(key)
            return ring is not None and ring.set_previous(stage, output, generation)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._rings)

    def __len__(self) -> int:
        with self._lock:
            return len(self._rings)

    def stats(self) -> dict[str, Any]:
        """{"keys": n, "resets": {reason: count}, "bytes": approximate memory held}."""
        with self._lock:
            resets: Counter[str] = Counter()
            for ring in self._rings.values():
                resets.update(ring.resets)
            return {
                "keys": len(self._rings),
                "resets": {r: resets[r] for r in RESET_REASONS},
                "bytes": sum(ring.nbytes for ring in self._rings.values()),
            }


def _check_config(window: int, background_frames: int, max_pause_s: float | None) -> None:
    if window < 1:
        raise ValueError(f"window {window} must be >= 1 (1 for engines that see one frame)")
    if background_frames < 1:
        raise ValueError(f"background_frames {background_frames} must be >= 1")
    if max_pause_s is not None and not max_pause_s > 0:
        raise ValueError(f"max_pause_s {max_pause_s} must be > 0, or None to never reset on pauses")
