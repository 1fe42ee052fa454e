"""The engine server's added latency with the ``identity`` engine: frameReady -> publish.

    scopecast bench server-latency [--seconds 60] [--engine identity] [--size 512]
        [--out /dev/shm] [--json OUT.json]        (or python -m bench server-latency ...)

Pre-rendered frames go through the real hook to ``scopecast serve`` in another process
(live mode, raw and enhanced written to a temporary folder, published on PUB). The server's
``total`` stage is publish time minus the header's frameReady ``mono_ns`` (same host), so it
includes the hook's copy, the transport, queueing, the engine and the hand-over to PUB.
Target (issue 3): p99 under 5% of the frame interval, nothing skipped, memory flat.
``--out /dev/shm`` separates the disk's share from the rest. ``transports=("inline", "auto")``
(Python) runs every case with the pixels inline in the message and then with the same-host
shared-memory transport the hook picks by itself (:mod:`stream.shm`), rows side by side.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import useq
from rich.console import Console
from rich.table import Table

from bench.sources import StaticSource
from stream.acquire import run_with_server
from stream.control import parse_status
from stream.hook import HookStats
from stream.status import ServerStatus

CASES = (((512, 512), 20.0), ((2048, 2048), 5.0))


def measure(
    shape: tuple[int, int],
    fps: float,
    seconds: float,
    engine: str,
    out: Path | None = None,
    transport: str = "auto",
) -> dict:
    """One run; returns the hook summary, the server's (a ServerStatus) and the server's RSS
    over time. ``transport``: ``inline`` keeps the pixels in the message; ``auto`` lets the
    hook choose (shared memory on this host)."""
    rng = np.random.default_rng(0)
    frame = rng.poisson(200.0, shape).astype(np.uint16)
    seq = useq.MDASequence(time_plan={"interval": 1 / fps, "loops": int(seconds * fps)})
    rss: list[float] = []

    def on_progress(_hook: HookStats, status: ServerStatus | None) -> None:
        if status and status.rss_mb and (not rss or status.uptime_s > len(rss)):
            rss.append(status.rss_mb)

    before = os.environ.get("SCOPECAST_SHM")
    if transport == "inline":
        os.environ["SCOPECAST_SHM"] = "0"  # read by the hook when it is made
    try:
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            sent, summary = run_with_server(
                StaticSource(frame, fps), seq, engines=[engine], out_dir=Path(tmp),
                on_progress=on_progress, status_every_s=1.0,
            )  # fmt: skip
    finally:
        if before is None:
            os.environ.pop("SCOPECAST_SHM", None)
        else:
            os.environ["SCOPECAST_SHM"] = before
    # the bare failure dict of a server that died before it had a status is refused
    server = parse_status(summary, "the engine server's summary")
    return {"shape": shape, "fps": fps, "hook": sent, "server": server, "rss_mb": rss}


def run_server_latency(
    *,
    seconds: float = 60.0,
    engine: str = "identity",
    sizes: Sequence[int] | None = None,
    out: Path | None = None,
    json_out: Path | None = None,
    transports: Sequence[str] = ("auto",),
) -> dict:
    """Every case (only those whose side is in ``sizes``, if given): print the table, write
    every number to ``json_out`` if given, and return them."""
    if seconds <= 0:
        raise ValueError(f"--seconds {seconds:g} must be > 0")
    unknown = sorted(set(sizes or ()) - {shape[0] for shape, _ in CASES})
    if unknown:
        raise ValueError(f"--size {unknown}: choose from {[shape[0] for shape, _ in CASES]}")
    table = Table("frame", "fps", "transport", "frames", "enhanced", "skipped",
                  "not handed over", "transport ms p50 / p99", "total ms p50 / p99",
                  "p99 / interval", "server RSS MB first -> last",
                  title=f"frameReady -> publish, engine {engine} (one run)")  # fmt: skip
    results = {"machine": {"cpu": platform.processor() or platform.machine(),
                           "python": platform.python_version()}, "cases": []}  # fmt: skip
    runs = [(shape, fps, t) for shape, fps in CASES for t in transports]
    for shape, fps, transport in runs:
        if sizes and shape[0] not in sizes:
            continue
        r = measure(shape, fps, seconds, engine, out, transport)
        s: ServerStatus = r["server"]
        results["cases"].append({**r, "transport": transport, "server": s.model_dump(mode="json")})
        total, moved = s.latency_ms["total"], s.latency_ms["transport"]
        rss = r["rss_mb"] or [float("nan")]
        used = "+".join(sorted({t.transport for t in s.transport.values()})) or "-"
        table.add_row(
            f"{shape[0]}x{shape[1]}", f"{fps:g}", used, str(r["hook"]["frames_seen"]),
            str(s.frames_enhanced), str(s.frames_skipped),
            str(r["hook"]["frames_not_handed_over"]),
            f"{moved.p50:.2f} / {moved.p99:.2f}", f"{total.p50:.2f} / {total.p99:.2f}",
            f"{total.p99 * fps / 1000:.1%}", f"{rss[0]:.0f} -> {rss[-1]:.0f}",
        )  # fmt: skip
    Console(width=170).print(table)
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=1))
    return results
