"""Frame sources for benchmarks that must not be limited by the simulator's render time."""

from __future__ import annotations

import threading
import time

import numpy as np
import useq

from stream.simulated import SimulatedMicroscope


def snapshot(scope: SimulatedMicroscope) -> np.ndarray:
    """One frame of the simulated microscope, to be sent again and again."""
    scope.core.snapImage()
    return scope.core.getImage().copy()


class StaticSource:
    """Stands in for a core: ``run_mda`` calls the handlers' frameReady with one pre-rendered
    frame at ``fps``, from a thread, like pymmcore-plus does."""

    def __init__(self, frame: np.ndarray, fps: float) -> None:
        self.frame, self.interval = frame, 1.0 / fps

    def run_mda(self, sequence: useq.MDASequence, output: list) -> threading.Thread:
        def loop() -> None:
            for h in output:
                h.sequenceStarted(sequence)
            t0 = time.monotonic()
            for i, event in enumerate(sequence):
                time.sleep(max(0.0, t0 + i * self.interval - time.monotonic()))
                for h in output:
                    h.frameReady(self.frame, event, {})
            for h in output:
                h.sequenceFinished(sequence)

        thread = threading.Thread(target=loop)
        thread.start()
        return thread
