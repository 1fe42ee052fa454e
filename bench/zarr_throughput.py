"""Disk write throughput of the sinks at the Celldiscoverer frame size: OME-TIFF, OME-Zarr
and both at once, through the real RunWriter (raw plane, enhanced plane, index lines).

    python -m bench.zarr_throughput [--frames 30] [--side 2048] [--out DIR] [--fsync]

Prints one JSON line per format: frames/s (a raw and an enhanced plane each) and MB/s of
pixels written. ``--out`` is where the runs go (default: a temporary folder, removed after).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from stream.protocol import FrameHeader
from stream.sinks import RunWriter, fresh_run_dir

FORMATS = ("ome-tiff", "ome-zarr", "ome-tiff+ome-zarr")


def measure(sink: str, base: Path, *, frames: int, side: int, fsync: bool) -> dict:
    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 4000, (side, side), dtype=np.uint16) for _ in range(4)]
    run = RunWriter(fresh_run_dir(base), sink=sink, fsync=fsync)
    sizes = {"t": frames}
    t0 = time.perf_counter()
    for seq in range(frames):
        frame = pool[seq % len(pool)]
        header = FrameHeader(stream="cd7", seq=seq, shape=frame.shape, dtype="uint16",
                             mono_ns=time.monotonic_ns(), wall_time=time.time(),
                             index={"t": seq, "p": 0}, sizes=sizes,
                             pixel_size_um=0.345)  # fmt: skip
        run.write_raw(header, frame)
        run.write_enhanced(header, frame, engine="deblur", scale=1)
    run.close()
    seconds = time.perf_counter() - t0
    pixels = 2 * frames * pool[0].nbytes
    return {
        "format": sink,
        "frames": frames,
        "side": side,
        "fsync": fsync,
        "seconds": round(seconds, 3),
        "frames_per_s": round(frames / seconds, 2),
        "MB_per_s": round(pixels / seconds / 1e6, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--side", type=int, default=2048)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--fsync", action="store_true")
    p.add_argument("--format", action="append", choices=FORMATS, dest="formats")
    a = p.parse_args(argv)
    if a.frames < 1 or a.side < 8:
        p.error(f"--frames {a.frames} must be >= 1 and --side {a.side} >= 8")
    base = a.out or Path(tempfile.mkdtemp(prefix="scopecast-zarr-bench-"))
    try:
        for sink in a.formats or FORMATS:
            print(json.dumps(measure(sink, base, frames=a.frames, side=a.side, fsync=a.fsync)))
    finally:
        if a.out is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
