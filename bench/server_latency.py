"""The engine server's added latency with the ``identity`` engine: frameReady -> publish.

    python -m bench.server_latency [--seconds 60] [--engine identity] [--json OUT.json]

Pre-rendered frames go through the real hook to ``scopecast serve`` in another process
(live mode, raw and enhanced written to a temporary folder, published on PUB). The server's
``total`` stage is publish time minus the header's frameReady ``mono_ns`` (same host), so it
includes the hook's copy, the transport, queueing, the engine and the hand-over to PUB.
Target (issue 3): p99 under 5% of the frame interval, nothing skipped, memory flat.
``--out /dev/shm`` separates the disk's share from the rest.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import useq
from rich.console import Console
from rich.table import Table

from bench.sources import StaticSource
from stream.acquire import run_with_server

CASES = (((512, 512), 20.0), ((2048, 2048), 5.0))


def measure(
    shape: tuple[int, int], fps: float, seconds: float, engine: str, out: Path | None = None
) -> dict:
    """One run; returns the hook and server summaries plus the server's RSS over time."""
    rng = np.random.default_rng(0)
    frame = rng.poisson(200.0, shape).astype(np.uint16)
    seq = useq.MDASequence(time_plan={"interval": 1 / fps, "loops": int(seconds * fps)})
    rss: list[float] = []

    def on_progress(_hook, status) -> None:
        if status and status.get("rss_mb") and (not rss or status["uptime_s"] > len(rss)):
            rss.append(status["rss_mb"])

    with tempfile.TemporaryDirectory(dir=out) as tmp:
        sent, server = run_with_server(
            StaticSource(frame, fps), seq, engines=[engine], out_dir=Path(tmp),
            on_progress=on_progress, status_every_s=1.0,
        )  # fmt: skip
    return {"shape": shape, "fps": fps, "hook": sent, "server": server, "rss_mb": rss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="acquisition time per case")
    ap.add_argument("--engine", default="identity")
    ap.add_argument("--size", type=int, action="append", help="only this frame side (repeat)")
    ap.add_argument("--out", type=Path, help="write the (deleted afterwards) run files here")
    ap.add_argument("--json", dest="json_out", help="also write every number to this file")
    args = ap.parse_args()
    table = Table("frame", "fps", "frames", "enhanced", "skipped", "not handed over",
                  "total ms p50 / p99", "p99 / interval", "server RSS MB first -> last",
                  title=f"frameReady -> publish, engine {args.engine} (one run)")  # fmt: skip
    results = {"machine": {"cpu": platform.processor() or platform.machine(),
                           "python": platform.python_version()}, "cases": []}  # fmt: skip
    for shape, fps in CASES:
        if args.size and shape[0] not in args.size:
            continue
        r = measure(shape, fps, args.seconds, args.engine, args.out)
        results["cases"].append(r)
        s, total = r["server"], r["server"]["latency_ms"]["total"]
        rss = r["rss_mb"] or [float("nan")]
        table.add_row(
            f"{shape[0]}x{shape[1]}", f"{fps:g}", str(r["hook"]["frames_seen"]),
            str(s["frames_enhanced"]), str(s["frames_skipped"]),
            str(r["hook"]["frames_not_handed_over"]),
            f"{total['p50']:.2f} / {total['p99']:.2f}",
            f"{total['p99'] * fps / 1000:.1%}", f"{rss[0]:.0f} -> {rss[-1]:.0f}",
        )  # fmt: skip
    Console(width=140).print(table)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
