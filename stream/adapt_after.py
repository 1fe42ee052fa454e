"""``serve --adapt-after S``: adapt the serving engine to this rig and specimen while it serves.

The receiver hands every raw frame to :meth:`AdaptAfter.offer`, which keeps those of the first
stream key it sees (references: received frames are never written again) until S seconds of
them (or :data:`MAX_FRAMES`, or :data:`MAX_BYTES`) have come. A thread then writes them as one
TIFF time-lapse and runs ``scopecast adapt`` on it in a child process at the lowest priority
(``nice 19``) and one thread (``OMP_NUM_THREADS=1``), so the engine stage keeps its cores; the
old engine serves all along. When the child's gate passes, the new package goes through the hot swap
(:mod:`stream.swap`: verified, warmed up, switched between two frames); when the gate refuses
it, nothing changes and ``status`` says why (``adapt.state: refused``, the report's reasons).

Only a denoiser can be adapted from a noisy recording (scale 1, no previous output): the server
refuses ``--adapt-after`` with any other engine at start.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import tifffile

from .protocol import FrameHeader
from .status import AdaptInfo

MAX_FRAMES = 500
"""Frames an adaptation learns from at most (about 10 minutes of training on 2 cores)."""
MAX_BYTES = 512 << 20
"""... and bytes: the frames are held in memory until written (500 of 2048x2048 are 4 GB)."""
NICE = 19


class AdaptAfter:
    """Collect, adapt in a niced child process, then swap (module docstring)."""

    def __init__(self, seconds: float, out: Path, base: str, *, steps: int,
                 profile: Path | None, swap: Callable[[Sequence[str]], object],
                 max_frames: int = MAX_FRAMES) -> None:  # fmt: skip
        self.seconds, self.out, self.base = seconds, Path(out), base
        self.steps, self.profile, self._swap = steps, profile, swap
        self.max_frames = max_frames
        self._frames: list[np.ndarray] = []
        self._kept = self._bytes = 0
        self._key: str | None = None
        self._first_ns: int | None = None
        self._lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None
        self._closed = False
        self._info = AdaptInfo(state="collecting", after_s=seconds, base=base)

    @property
    def info(self) -> AdaptInfo:
        """For ``status``: the state, with the key and the frames kept so far."""
        return self._info.model_copy(update={"frames": self._kept, "key": self._key})

    def offer(self, header: FrameHeader, frame: np.ndarray) -> None:
        """A received raw frame (receiver stage: cheap, never raises into it)."""
        if self._info.state != "collecting":
            return
        key = header.state_key
        if self._key is None:
            self._key, self._first_ns = key, header.mono_ns
        if key != self._key:
            return
        self._frames.append(frame)
        self._kept += 1
        self._bytes += frame.nbytes
        assert self._first_ns is not None
        elapsed = (header.mono_ns - self._first_ns) / 1e9
        if elapsed >= self.seconds or self._kept >= self.max_frames or self._bytes >= MAX_BYTES:
            self._info = self._info.model_copy(update={"state": "adapting"})
            threading.Thread(target=self._adapt, name="scopecast-adapt", daemon=True).start()

    def _adapt(self) -> None:
        try:
            rec = self.out / "recording"
            rec.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(rec / "recording.tif", np.stack(self._frames))
            self._frames = []
            cmd = [sys.executable, "-m", "stream", "adapt", str(rec),
                   "--out", str(self.out / "adapted"), "--base", self.base,
                   "--steps", str(self.steps)]  # fmt: skip
            if self.profile is not None:
                cmd += ["--profile", str(self.profile)]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            log = self.out / "adapt.log"
            with self._lock:
                if self._closed:
                    return
                with log.open("wb") as sink:
                    self._child = subprocess.Popen(
                        cmd, stdout=sink, stderr=subprocess.STDOUT, env=env,
                        preexec_fn=lambda: os.nice(NICE),  # noqa: PLW1509 - no threads in the child yet
                    )  # fmt: skip
            started = time.monotonic()
            code = self._child.wait()
            took = round(time.monotonic() - started, 1)
            report = self.out / "adapted" / "report.json"
            gate = json.loads(report.read_text())["gate"] if report.is_file() else None
            if code == 0:
                engine = str(self.out / "adapted" / "engine")
                self._info = self._info.model_copy(
                    update={"state": "swapping", "adapt_s": took, "engine": engine}
                )
                self._swap([engine])  # status.swap follows it from here
            elif gate is not None and not gate["passed"]:
                why = "; ".join(gate["failed"])
                self._info = self._info.model_copy(
                    update={"state": "refused", "adapt_s": took, "error": why}
                )
            else:
                self._info = self._info.model_copy(update={
                    "state": "failed", "adapt_s": took,
                    "error": f"`scopecast adapt` exited with {code}: see {log}"})  # fmt: skip
        except Exception as e:  # noqa: BLE001 - the server serves on; status says what failed
            self._info = self._info.model_copy(
                update={"state": "failed", "error": f"{type(e).__name__}: {e}"}
            )

    def close(self) -> None:
        """The server stops: end an adaptation still running (its child process)."""
        with self._lock:
            self._closed = True
            child = self._child
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()


__all__ = ["MAX_FRAMES", "AdaptAfter"]
