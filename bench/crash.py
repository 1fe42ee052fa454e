"""SIGKILL the engine server mid-stream, again and again, and recover every indexed plane.

Each round starts ``scopecast serve`` (identity engine, complete mode) in its own process,
streams frames into it through the real hook, kills it with SIGKILL at a random moment, then
runs :func:`stream.sinks.recover` on every file its index names and checks every recovered
plane bit-exact against the frame that was sent (frames are made from their seq, so the
check needs no copy of them).
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import useq

from stream.hook import FrameHook
from stream.sinks import read_index, recover

from .fuzz import ServerProcess


def frame_for(seq: int, size: int) -> np.ndarray:
    """The frame sent with sequence number ``seq`` (reproducible from seq alone)."""
    return np.random.default_rng(seq).integers(0, 65535, (size, size), dtype=np.uint16)


def run_crash(
    kills: int = 10, *, size: int = 256, fps: float = 50.0, seed: int = 0, out: Path | None = None
) -> dict[str, Any]:
    """``kills`` rounds of stream -> SIGKILL -> recover; per-round counts and totals."""
    if kills < 1 or size < 8 or fps <= 0:
        raise ValueError(f"kills={kills} must be >= 1, size={size} >= 8, fps={fps} > 0")
    rng = random.Random(seed)
    base = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="scopecast-crash-"))
    rounds = [
        _round(base / f"kill-{i:02d}", size, fps, rng.uniform(0.5, 3.0)) for i in range(kills)
    ]
    indexed = sum(r["indexed"] for r in rounds)
    exact = sum(r["recovered_exact"] for r in rounds)
    return {
        "kind": "crash",
        "kills": kills,
        "size": size,
        "fps": fps,
        "out": str(base),
        "rounds": rounds,
        "planes_indexed": indexed,
        "planes_recovered_exact": exact,
        "recovered_percent": 100.0 * exact / indexed if indexed else None,
    }


def _round(out: Path, size: int, fps: float, kill_after_s: float) -> dict[str, Any]:
    server = ServerProcess(out, "--engine", "identity", "--mode", "complete", publish=False)
    listen, run_dir = server.listen, server.run_dir
    stop = threading.Event()
    sent = [0]

    def stream() -> None:
        hook = FrameHook(listen, stream="crash", hwm=1000)
        hook.sequenceStarted(useq.MDASequence(time_plan={"interval": 0, "loops": 1}))
        seq = 0
        while not stop.is_set():
            hook.send(frame_for(seq, size), event=useq.MDAEvent(index={"t": seq}))
            seq += 1
            sent[0] = seq
            time.sleep(1 / fps)
        hook.close()

    sender = threading.Thread(target=stream, daemon=True)
    sender.start()
    time.sleep(kill_after_s)
    server.kill()  # SIGKILL
    stop.set()
    sender.join(10)
    records = [r for r in read_index(run_dir / "index.jsonl") if r["kind"] == "raw"]
    exact = bad = 0
    for name in sorted({r["file"] for r in records}):
        seqs = [r["header"]["seq"] for r in records if r["file"] == name]
        result = recover(run_dir / name, output=run_dir / f"{name}.recovered.ome.tif")
        bad += result.bad_crc + result.missing
        data = tifffile.imread(result.output).reshape(-1, size, size)
        exact += sum(
            np.array_equal(p, frame_for(s, size)) for p, s in zip(data, seqs, strict=False)
        )
    return {
        "kill_after_s": round(kill_after_s, 3),
        "frames_sent": sent[0],
        "indexed": len(records),
        "recovered_exact": exact,
        "bad_or_missing": bad,
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'kill':>4} {'after s':>8} {'sent':>6} {'indexed':>8} {'recovered':>10}"]
    for i, r in enumerate(result["rounds"]):
        lines.append(f"{i:>4} {r['kill_after_s']:>8.2f} {r['frames_sent']:>6} {r['indexed']:>8} "
                     f"{r['recovered_exact']:>10}")  # fmt: skip
    lines.append(f"{result['planes_recovered_exact']} of {result['planes_indexed']} indexed "
                 f"planes recovered bit-exact ({result['recovered_percent']:.2f}%)")  # fmt: skip
    return "\n".join(lines)
