"""Hot swap of the engine in a running server (``scopecast status --swap``, control ``swap``).

A request starts a loader thread and returns at once; the control loop never waits for it. The
loader opens the new chain by the very path ``serve`` opens its own (the server's
``open_chain``: find the package, check every file's sha256, open the backend), checks that it
fits the run (below), and warms it up off the critical path: two runs on the latest frame of
each shape the server has received (at most :data:`MAX_SHAPES`), or on a dummy frame of the
engine's tile size before any frame came. It is a plain thread: ONNX Runtime (and TensorRT)
release the GIL while they compute. The engine stage then takes the ready chain between two
frames (:meth:`EngineSwap.take`) and serves it from its next frame on, so no frame is lost,
skipped or enhanced twice because of a swap; the temporal state restarts per key
(:meth:`stream.ring.Rings.restart`: fresh previous outputs, raw frames kept).

A swap is refused, and the old engine keeps serving (``status`` says ``failed`` with the
error), when:

- another swap is still loading or waiting for its frame boundary (refused at once);
- the engine is unknown, its package fails verification, or its backend does not start;
- its scale differs from the engine serving: the run's enhanced OME-TIFFs stay open for the
  whole run and hold frames of one size, so a new size needs a new run (stop it, then
  ``scopecast serve --engine NEW``);
- its output dtype differs (float32 against the raw dtype), for the same reason;
- it cannot take the frames the server is receiving (shape, channels), or its warm-up fails
  (an exception, NaN or inf, an output of the wrong size).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from calibration.errors import ScopecastError
from engines.engine import EngineChain, EngineError

from .status import SwapInfo

log = logging.getLogger(__name__)

#: Frame shapes (and dtypes) the loader warms a new engine up on: the most recent ones.
MAX_SHAPES = 4
#: Warm-up runs per shape: the first allocates, the second runs as the engine will.
WARMUP_RUNS = 2
#: Side of the dummy warm-up frame before any frame arrived (unless the engine tiles).
DUMMY_SIDE = 64

OpenChain = Callable[[Sequence[str], str, int | None], EngineChain]


class SwapRefused(ScopecastError, ValueError):
    """A swap that cannot start now (another one is under way, the server is stopping)."""


def chain_id(chain: EngineChain) -> str:
    """Which engines, exactly: ``name@version:sha`` (the first 12 hex digits of the sha256 of
    its model) for each engine of the chain, joined by '+'."""
    parts = []
    for e in chain.engines:
        m = e.manifest
        sha = m.files.get(m.model, "")[:12]
        parts.append(f"{m.name}@{m.version}" + (f":{sha}" if sha else ""))
    return "+".join(parts)


def keeps_previous(chain: EngineChain) -> bool:
    """Whether any engine of ``chain`` takes its own previous output (rings keep them)."""
    return any(e.manifest.temporal.previous_output for e in chain.engines)


def check_fits(new: EngineChain, serving: EngineChain, samples: Sequence[np.ndarray]) -> None:
    """Raise SwapRefused if ``new`` cannot replace ``serving`` in the running run."""
    if new.scale != serving.scale:
        raise SwapRefused(
            f"engine {new.name!r} has scale {new.scale} but {serving.name!r} serves scale "
            f"{serving.scale}: the run's enhanced OME-TIFFs hold frames of one size and stay "
            "open until the run ends; swap to an engine of scale "
            f"{serving.scale}, or stop the run and `scopecast serve --engine {new.name}`"
        )
    if new.output_dtype != serving.output_dtype:
        raise SwapRefused(
            f"engine {new.name!r} outputs {new.output_dtype!r} frames but {serving.name!r} "
            f"outputs {serving.output_dtype!r}: the run's enhanced OME-TIFFs hold one dtype; "
            f"stop the run and `scopecast serve --engine {new.name}`"
        )
    for frame in samples:
        try:
            new.check(frame.shape)
        except EngineError as e:
            raise SwapRefused(
                f"engine {new.name!r} cannot take the {frame.shape} frames this server "
                f"receives: {e}"
            ) from e


def dummy_frame(chain: EngineChain) -> np.ndarray:
    """A mid-grey uint16 frame the size of the first engine's tile (64x64 when it does not
    tile), for a warm-up before any frame arrived."""
    tile = chain.engines[0].manifest.tile
    side = tile.size or DUMMY_SIDE
    side = -(-side // tile.multiple) * tile.multiple
    return np.full((side, side), 1000, np.uint16)


def warm_up(chain: EngineChain, samples: Sequence[np.ndarray]) -> list[list[int]]:
    """Run ``chain`` :data:`WARMUP_RUNS` times on each sample (fresh temporal state, as for a
    key's first frame) and check its output; return the shapes warmed up on."""
    frames = [
        np.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0) if f.dtype.kind == "f" else f
        for f in samples  # a sender's NaN must not fail the engine's warm-up
    ] or [dummy_frame(chain)]
    for frame in frames:
        expected = (frame.shape[0] * chain.scale, frame.shape[1] * chain.scale)
        for _ in range(WARMUP_RUNS):
            out = chain.enhance([frame] * chain.window, {}, None).frame
            if out.shape[:2] != expected:
                raise SwapRefused(
                    f"engine {chain.name!r} turned a {frame.shape} frame into {out.shape}, not "
                    f"{expected} as its scale {chain.scale} says: its package is inconsistent; "
                    "re-export it"
                )
    return [list(f.shape) for f in frames]


class EngineSwap:
    """The swap under way, and the latest one's outcome (:class:`SwapInfo`) for ``status``.

    ``request`` (control thread) starts the loader; ``take`` (engine thread, between two
    frames) hands over a ready chain; ``switched`` records that it serves; ``close`` (at
    shutdown) closes a chain that never got to serve."""

    def __init__(self, open_chain: OpenChain, backend: str, threads: int | None) -> None:
        self._open = open_chain
        self.backend = backend  # the backend setting in force (serve's --backend, or a swap's)
        self.threads = threads  # the same for inference threads
        self._asked: tuple[str, int | None] = (backend, threads)  # the swap under way's
        self._lock = threading.Lock()
        self._info: SwapInfo | None = None
        self._ready: EngineChain | None = None
        self._requested = 0.0
        self._closed = False

    @property
    def info(self) -> SwapInfo | None:
        return self._info

    def request(
        self,
        engines: Sequence[str],
        *,
        serving: EngineChain,
        samples: Sequence[np.ndarray],
        backend: str | None = None,
        threads: int | None = None,
    ) -> SwapInfo:
        """Start loading ``engines`` (``backend``, ``threads``: default the ones in force);
        SwapRefused if a swap is under way or the server is stopping."""
        backend = backend or self.backend
        threads = threads or self.threads
        with self._lock:
            if self._closed:
                raise SwapRefused("the server is stopping: no engine swap now")
            if self._info is not None and self._info.state in ("loading", "ready"):
                raise SwapRefused(
                    f"swap {self._info.number} to {self._info.engine!r} is still "
                    f"{self._info.state}: wait until `scopecast status` shows it done or "
                    "failed, then ask again"
                )
            number = 1 if self._info is None else self._info.number + 1
            self._info = info = SwapInfo(
                number=number,
                state="loading",
                engine="+".join(engines),
                backend=backend,
                previous=serving.name,
            )
            self._requested = time.perf_counter()
            self._asked = (backend, threads)
        threading.Thread(
            target=self._load,
            args=(list(engines), backend, threads, serving, list(samples)),
            name="scopecast-swap",
            daemon=True,
        ).start()
        log.info("swap %d: loading %s (backend %s)", number, info.engine, backend)
        return info

    def take(self) -> EngineChain | None:
        """The chain ready to serve, once (engine thread, at a frame boundary)."""
        if self._ready is None:  # the common case: no lock per frame
            return None
        with self._lock:
            chain, self._ready = self._ready, None
            return chain

    def switched(self, chain: EngineChain, *, after: int) -> None:
        """``chain`` now serves; ``after`` frames were enhanced before its first."""
        with self._lock:
            assert self._info is not None
            self.backend, self.threads = self._asked
            self._info = self._update(state="done", switched_after=after, engine=chain.name,
                                      engine_id=chain_id(chain))  # fmt: skip
        log.warning("swap %d: now serving %s (after %d frames enhanced)",
                    self._info.number, self._info.engine_id, after)  # fmt: skip

    def abandon(self, chain: EngineChain, error: BaseException) -> None:
        """The engine stage could not switch to ``chain`` (taken from :meth:`take`): close it;
        the swap failed and the engine before keeps serving."""
        chain.close()
        with self._lock:
            assert self._info is not None
            self._info = self._update(
                state="failed",
                error=f"switching to {chain.name!r} failed, {self._info.previous!r} keeps "
                f"serving: {type(error).__name__}: {error}; report this as a bug",
            )

    def close(self) -> None:
        """No swap from now on; close a chain that was ready but never served."""
        with self._lock:
            self._closed = True
            chain, self._ready = self._ready, None
        if chain is not None:
            chain.close()

    def _update(self, **fields: Any) -> SwapInfo:
        assert self._info is not None
        return self._info.model_copy(update=fields)

    def _load(
        self,
        engines: list[str],
        backend: str,
        threads: int | None,
        serving: EngineChain,
        samples: list[np.ndarray],
    ) -> None:
        chain = None
        try:
            chain = self._open(engines, backend, threads)
            check_fits(chain, serving, samples)
            shapes = warm_up(chain, samples)
        except Exception as e:  # noqa: BLE001 - any failure leaves the old engine serving
            if chain is not None:
                chain.close()
            error = (
                f"swap to {'+'.join(engines)!r} failed, {serving.name!r} keeps serving: "
                f"{' '.join(str(e).split()) or type(e).__name__}"
            )
            with self._lock:
                self._info = self._update(state="failed", error=error, load_s=self._elapsed())
            log.warning("%s", error)
            return
        with self._lock:
            if self._closed:
                chain.close()
                return
            self._info = self._update(state="ready", load_s=self._elapsed(),
                                      warmup_shapes=shapes, engine_id=chain_id(chain))  # fmt: skip
            self._ready = chain

    def _elapsed(self) -> float:
        return round(time.perf_counter() - self._requested, 4)
