"""frameReady -> receiver latency of the hook over loopback TCP, for the confocal (256x256)
and the Celldiscoverer (2048x2048) presets in one run.

    scopecast bench hook-latency [--seconds 10] [--json OUT.json]
        (or python -m bench hook-latency ...)

The receiver is ``scopecast receive`` in another process; latency is its receive time minus
the header's ``mono_ns`` (same host). The simulated camera renders the next frame while the
previous one is in flight, so on a 2-core machine the two compete for the CPU, as a real
acquisition PC's other work would. A third row feeds pre-rendered 2048x2048 frames to
``frameReady`` at 5 fps from a plain loop: the hook and transport without the simulator's load.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import useq
from rich.console import Console
from rich.table import Table

from bench.sources import StaticSource, snapshot
from stream.acquire import run_with_receiver
from stream.simulated import SimulatedMicroscope


def run_hook_latency(*, seconds: float = 10.0, json_out: Path | None = None) -> dict:
    """Both presets and the pre-rendered frames: print the table, write every number to
    ``json_out`` if given, and return them."""
    if seconds <= 0:
        raise ValueError(f"--seconds {seconds:g} must be > 0")
    results: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "presets": {},
    }
    table = Table(
        "source",
        "frame",
        "frames",
        "lost",
        "fps",
        "hook ms p50/p99",
        "to receiver ms p50/p99",
        title="frameReady -> receiver (one run)",
    )
    scopes = [SimulatedMicroscope(name) for name in ("confocal-20fps", "celldiscoverer")]
    runs = [(s.preset.name, s.preset.shape, s.core, s.preset.sequence(seconds)) for s in scopes]
    runs.append(
        (
            "static frames, 5 fps",
            (2048, 2048),
            StaticSource(snapshot(scopes[1]), fps=5.0),
            useq.MDASequence(time_plan={"interval": 0.2, "loops": int(seconds * 5)}),
        )
    )
    for name, shape, core, seq in runs:
        sent, received = run_with_receiver(core, seq)
        lat, hook = received["latency_ms"], sent["hook_ms"]
        lost = sent["frames_seen"] - received["frames_received"]
        results["presets"][name] = {"shape": shape, "hook": sent, "receiver": received}
        table.add_row(
            name,
            "x".join(map(str, shape)),
            str(sent["frames_seen"]),
            str(lost),
            f"{sent['fps']:.1f}",
            f"{hook['p50']:.2f} / {hook['p99']:.2f}",
            f"{lat['p50']:.2f} / {lat['p99']:.2f}",
        )
    Console(width=110).print(table)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(results, f, indent=1)
    return results
