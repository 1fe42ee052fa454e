"""Per-key ring buffers: the temporal state (frames, previous outputs, background) of an engine.

The server keeps one :class:`Ring` per key (stream, position, grid tile, channel, z, within one
acquisition) = ``FrameHeader.state_key``, so every position and tile of a plate has its own
independent state, and acquisitions that share a stream id never reset each other. Each push
checks the header against the key's previous frame and resets the state in a defined way,
checked in this order (the first that applies wins):

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
refused by :meth:`Ring.set_previous`. Frames are held by reference, never copied; a window-1
ring lets go of its frame once the frame's window was taken.

A hot swap of the engine (``scopecast status --swap``) is not a reset but a *restart* of every
key (:meth:`Rings.restart`), at a frame boundary: the new engine starts with a fresh temporal
state per key, as if each key's next frame were its first for that engine, except for what is
raw data. Its previous-output slots start empty, so its first frame of each key takes the
first-frame rule (the current frame upsampled, see ``engines.engine.Engine.run``); the raw
frames a ring still holds are kept (the newest ``window`` of them, start padded with the oldest
as always; a window-1 ring holds none once its frame was taken) and so is the raw background
history (started from the held frames when the new engine is the first to want one).
``generation`` increments, so an output of the old engine is never kept for the new one. A
restart is not counted as a reset.

Memory is bounded (:class:`Rings` ``budget_bytes``): past the budget, the least recently used
keys are evicted whole; a key idle for longer than ``max_pause_s`` whose next frame would reset
it anyway (no background history) is evicted too. An evicted key starts again as ``first``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Literal, overload

import numpy as np

from engines.package import BACKGROUND_FRAMES

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
        background_frames: int = BACKGROUND_FRAMES,
        reference: np.ndarray | None = None,
        max_pause_s: float | None = 10.0,
        keep_previous: bool = True,
    ) -> None:
        _check_config(window, background_frames, max_pause_s)
        self.window = window
        self.background = background
        self.background_frames = background_frames
        self.keep_previous = keep_previous
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
        """The window for the latest pushed frame; the background median is computed lazily.

        Take it once per push: a window-1 ring releases its frame into the window."""
        if not self._frames:
            raise RuntimeError("snapshot of an empty ring: push a frame first")
        frames = list(self._frames)
        frames = [frames[0]] * (self.window - len(frames)) + frames
        background = self._background()
        if self.window == 1:
            self._frames.clear()  # the window holds it now; the ring needs only the header
        return Window(
            frames=frames,
            previous=dict(self._previous),
            background=background,
            generation=self.generation,
            reset=self._reset,
        )

    def restart(self, window: int, *, background: bool, keep_previous: bool) -> None:
        """A new engine takes over this key (a hot swap): forget the previous outputs, keep the
        raw frames (the newest ``window``) and the raw background history (see the module)."""
        _check_config(window, self.background_frames, None)
        self.generation += 1
        self._previous.clear()
        self._frames = deque(self._frames, maxlen=window)
        if background and self.reference is None and self._history is None:
            self._history = deque(self._frames, maxlen=self.background_frames)
        elif not background:
            self._history = None
        self._median = None
        self.window = window
        self.background = background
        self.keep_previous = keep_previous

    def set_previous(self, stage: int, output: np.ndarray, generation: int) -> bool:
        """Keep `output` as stage `stage`'s previous output, unless the state was reset since."""
        if generation != self.generation or not self.keep_previous:
            return False
        self._previous[stage] = output
        return True

    @property
    def nbytes(self) -> int:
        """Approximate memory held: every distinct array (frames, history, outputs, background)."""
        arrays = [*self._frames, *(self._history or ()), *self._previous.values()]
        arrays += [a for a in (self._median, self.reference) if a is not None]
        return sum({id(a): a.nbytes for a in arrays}.values())

    @property
    def idle_resets(self) -> bool:
        """Whether evicting this ring after a pause loses nothing the next frame would keep."""
        return self._history is None

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
    """Thread-safe rings keyed by ``FrameHeader.state_key``, created on a key's first frame,
    evicted least recently used past ``budget_bytes`` (None: unbounded) or when idle."""

    def __init__(
        self,
        window: int = 1,
        *,
        background: bool = False,
        background_frames: int = BACKGROUND_FRAMES,
        references: dict[str, np.ndarray] | None = None,
        max_pause_s: float | None = 10.0,
        keep_previous: bool = True,
        budget_bytes: int | None = None,
    ) -> None:
        _check_config(window, background_frames, max_pause_s)
        if budget_bytes is not None and budget_bytes <= 0:
            raise ValueError(f"budget_bytes {budget_bytes} must be > 0, or None for no bound")
        self._config: dict[str, Any] = {
            "window": window,
            "background": background,
            "background_frames": background_frames,
            "max_pause_s": max_pause_s,
            "keep_previous": keep_previous,
        }
        self.budget_bytes = budget_bytes
        self.idle_s = max_pause_s
        self._references = dict(references or {})
        self._rings: OrderedDict[str, Ring] = OrderedDict()  # least recently pushed first
        self._bytes: dict[str, int] = {}
        self._used: dict[str, float] = {}
        self._total = 0
        self._next_sweep = 0.0
        self.evicted: Counter[str] = Counter()
        self.restarts = 0  # hot swaps of the engine (restart)
        self._retired: Counter[str] = Counter()  # resets counted by rings since evicted
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
        key = header.state_key
        with self._lock:
            ring = self._rings.get(key)
            if ring is None:
                ring = Ring(reference=self._references.get(header.key), **self._config)
            ring.push(header, frame)
            self._rings[key] = ring  # only once the first push was accepted
            self._rings.move_to_end(key)
            self._used[key] = time.monotonic()
            window = ring.snapshot() if snapshot else None
            self._account(key, ring)
            self._evict(keep=key)
            return window

    def snapshot(self, key: str) -> Window:
        """The window for the latest frame pushed to `key` (a ``state_key``)."""
        with self._lock:
            ring = self._rings.get(key)
            if ring is None:
                raise KeyError(f"no frame was pushed for key {key!r}: push one before a snapshot")
            window = ring.snapshot()
            self._account(key, ring)
            return window

    def set_previous(self, key: str, stage: int, output: np.ndarray, generation: int) -> bool:
        """Keep a stage's output for `key` unless that key was reset since (or never seen)."""
        with self._lock:
            ring = self._rings.get(key)
            if ring is None or not ring.set_previous(stage, output, generation):
                return False
            self._account(key, ring)
            self._evict(keep=key)
            return True

    def restart(self, window: int, *, background: bool, keep_previous: bool) -> None:
        """A new engine takes over every key (:meth:`Ring.restart`); keys seen later get its
        window and inputs too."""
        _check_config(window, self._config["background_frames"], None)
        with self._lock:
            self._config.update(window=window, background=background, keep_previous=keep_previous)
            for key, ring in self._rings.items():
                ring.restart(window, background=background, keep_previous=keep_previous)
                self._account(key, ring)
            self.restarts += 1

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._rings)

    def __len__(self) -> int:
        with self._lock:
            return len(self._rings)

    def stats(self) -> dict[str, Any]:
        """Keys, resets by reason, approximate bytes held, the budget and evictions by reason."""
        with self._lock:
            resets: Counter[str] = Counter(self._retired)
            for ring in self._rings.values():
                resets.update(ring.resets)
            return {
                "keys": len(self._rings),
                "resets": {r: resets[r] for r in RESET_REASONS},
                "bytes": self._total,
                "budget_bytes": self.budget_bytes,
                "evicted": {"budget": self.evicted["budget"], "idle": self.evicted["idle"]},
            }

    def _account(self, key: str, ring: Ring) -> None:
        nbytes = ring.nbytes
        self._total += nbytes - self._bytes.get(key, 0)
        self._bytes[key] = nbytes

    def _evict(self, *, keep: str) -> None:
        """Drop least recently used keys past the budget, and idle keys (at most once a second)."""
        now = time.monotonic()
        if self.idle_s is not None and now >= self._next_sweep:
            self._next_sweep = now + 1.0
            for key in [k for k, r in self._rings.items() if r.idle_resets]:
                if key != keep and now - self._used[key] > self.idle_s:
                    self._drop(key, "idle")
        if self.budget_bytes is None:
            return
        for key in list(self._rings):
            if self._total <= self.budget_bytes:
                break
            if key != keep:
                self._drop(key, "budget")

    def _drop(self, key: str, why: str) -> None:
        ring = self._rings.pop(key)
        self._retired.update(ring.resets)
        self._total -= self._bytes.pop(key)
        del self._used[key]
        self.evicted[why] += 1


def _check_config(window: int, background_frames: int, max_pause_s: float | None) -> None:
    if window < 1:
        raise ValueError(f"window {window} must be >= 1 (1 for engines that see one frame)")
    if background_frames < 1:
        raise ValueError(f"background_frames {background_frames} must be >= 1")
    if max_pause_s is not None and not max_pause_s > 0:
        raise ValueError(f"max_pause_s {max_pause_s} must be > 0, or None to never reset on pauses")
