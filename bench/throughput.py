"""Offline engine throughput (fps, Mpx/s, latency) for each engine, backend, size, tile and batch.

    scopecast bench throughput --engine identity --engine gaussian [--size 256 --size 2048]
        [--backend auto] [--tile none --tile 256] [--batch 1 --batch 4] [--seconds 5]
        [--warmup 2] [--markdown] [--out DIR]      (or python -m bench throughput ...)

No camera and no server: a fixed random uint16 frame goes through the same path the server runs
(``EngineChain.enhance``: normalization, tiling, inference, back to the raw dtype) for
``seconds`` after ``warmup`` calls. A combination that cannot run here (a GPU backend without a
GPU, a tile smaller than the engine's overlap) is recorded as skipped with its reason.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from engines.engine import Engine, EngineChain
from engines.package import EnginePackage, Tiling, load_package
from engines.runtime import BackendError, backend_names
from stream.stats import percentiles

STAGES = ("preprocess", "inference", "postprocess")
Progress = Callable[[dict[str, Any]], None]


def run_throughput(
    *,
    engines: Sequence[str],
    sizes: Sequence[int] = (256, 2048),
    backends: Sequence[str] = ("auto",),
    batches: Sequence[int] | None = None,
    tiles: Sequence[int | None] | None = None,
    threads: int | None = None,
    seconds: float = 5.0,
    warmup: int = 2,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Measure every engine x backend x size x tile x batch; ``progress`` gets each result row.

    ``tiles``/``batches`` default to each manifest's values; a tile of None is the whole frame.
    """
    _check_args(engines, sizes, backends, batches, tiles, threads, seconds, warmup)
    packages = [load_package(name) for name in engines]  # PackageError is a ValueError
    results: list[dict[str, Any]] = []
    for package in packages:
        m = package.manifest
        engine_tiles = [m.tile.size] if tiles is None else list(tiles)
        engine_batches = [m.tile.batch] if batches is None else list(batches)
        for backend in backends:
            for size in sizes:
                for tile in engine_tiles:
                    for batch in engine_batches:
                        row = _measure(
                            package, backend, size, tile, batch, threads, seconds, warmup
                        )
                        results.append(row)
                        if progress is not None:
                            progress(row)
    return {
        "kind": "throughput",
        "settings": {"seconds": seconds, "warmup": warmup, "threads": threads},
        "results": results,
    }


def _check_args(
    engines: Sequence[str],
    sizes: Sequence[int],
    backends: Sequence[str],
    batches: Sequence[int] | None,
    tiles: Sequence[int | None] | None,
    threads: int | None,
    seconds: float,
    warmup: int,
) -> None:
    """Raise ValueError naming the first bad argument."""
    if isinstance(engines, str) or not engines:
        raise ValueError(f"engines={engines!r}: give a non-empty list of engine names or folders")
    if not sizes:
        raise ValueError("sizes is empty: give at least one frame side, e.g. (256, 2048)")
    for size in sizes:
        if not _is_int(size) or size < 8:
            raise ValueError(f"size {size!r} must be an int >= 8 (the side of a square frame)")
    if isinstance(backends, str) or not backends:
        raise ValueError(f"backends={backends!r}: give a non-empty list, e.g. ('auto',)")
    for backend in backends:
        if backend not in (names := backend_names()):
            raise ValueError(f"unknown backend {backend!r}: choose from {', '.join(names)}")
    for batch in batches or ():
        if not _is_int(batch) or batch < 1:
            raise ValueError(f"batch {batch!r} must be an int >= 1 (tiles per inference call)")
    if batches is not None and not batches:
        raise ValueError("batches is empty: pass None for each manifest's batch")
    for tile in tiles or ():
        if tile is not None and (not _is_int(tile) or tile < 1):
            raise ValueError(f"tile {tile!r} must be an int >= 1, or None for the whole frame")
    if tiles is not None and not tiles:
        raise ValueError("tiles is empty: pass None for each manifest's tile size")
    if threads is not None and (not _is_int(threads) or threads < 1):
        raise ValueError(f"threads {threads!r} must be an int >= 1, or None (runtime decides)")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ValueError(f"seconds {seconds!r} must be a number > 0")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"seconds {seconds!r} must be a finite number > 0")
    if not _is_int(warmup) or warmup < 0:
        raise ValueError(f"warmup {warmup!r} must be an int >= 0 (untimed calls first)")


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _with_tiling(package: EnginePackage, tile: int | None, batch: int) -> EnginePackage:
    """The package with its manifest's tile size and batch replaced, in memory only."""
    m = package.manifest
    tiling = Tiling.model_validate({**m.tile.model_dump(), "size": tile, "batch": batch})
    return dataclasses.replace(package, manifest=m.model_copy(update={"tile": tiling}))


def _measure(
    package: EnginePackage,
    backend: str,
    size: int,
    tile: int | None,
    batch: int,
    threads: int | None,
    seconds: float,
    warmup: int,
) -> dict[str, Any]:
    """One configuration's result row, or a row with ``skipped`` and the reason."""
    row: dict[str, Any] = {
        "engine": package.name,
        "backend": backend,
        "size": int(size),
        "tile": None if tile is None else int(tile),
        "batch": int(batch),
    }
    try:
        tiled = _with_tiling(package, tile, batch)
    except ValidationError as e:
        problems = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        return {**row, "skipped": f"tile {tile} does not fit engine {package.name!r}: {problems}"}
    from engines.offline.build import rebuild_plan  # a plan missing for this GPU is rebuilt

    try:
        engine = Engine(tiled, backend, threads, rebuild=rebuild_plan)
    except BackendError as e:
        return {**row, "skipped": str(e)}
    chain = EngineChain([engine])
    try:
        return {**row, "backend_reason": engine.reason, **_time_chain(chain, size, seconds, warmup)}
    except BackendError as e:
        return {**row, "skipped": f"backend failed while running: {e}"}
    finally:
        chain.close()


def _time_chain(chain: EngineChain, size: int, seconds: float, warmup: int) -> dict[str, Any]:
    """Feed one fixed frame (a window of copies) for ``seconds``; rates, latency, stage split."""
    frame = np.random.default_rng(0).integers(100, 4000, (size, size), dtype=np.uint16)
    frames = [frame] * chain.window
    background = frame if chain.background else None
    previous: dict[int, np.ndarray] = {}

    def once() -> dict[str, float]:
        result = chain.enhance(frames, previous, background)
        previous.update({s.stage: s.output for s in result.stages})  # as the server's ring does
        return result.timings_ms

    for _ in range(warmup):
        once()
    latency: list[float] = []
    stages: dict[str, list[float]] = {name: [] for name in STAGES}
    start = time.perf_counter()
    while True:
        t = time.perf_counter()
        timings = once()
        now = time.perf_counter()
        latency.append((now - t) * 1e3)
        for name in STAGES:
            stages[name].append(timings.get(name, 0.0))
        if now - start >= seconds:
            break
    elapsed = now - start
    fps = len(latency) / elapsed
    return {
        "frames": len(latency),
        "elapsed_s": elapsed,
        "fps": fps,
        "mpx_per_s": fps * size * size / 1e6,
        "latency_ms": percentiles(latency),
        "stages_ms": {name: percentiles(v)["p50"] for name, v in stages.items()},
    }


def _label(row: dict[str, Any]) -> str:
    tile = "whole" if row["tile"] is None else row["tile"]
    return f"{row['engine']} {row['backend']} {row['size']}px tile {tile} b{row['batch']}"


def plot_throughput(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``throughput.png`` (frames per second per configuration, log scale) to ``out_dir``."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    if result.get("kind") != "throughput":
        raise ValueError(f"result kind {result.get('kind')!r} is not 'throughput'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ran = [r for r in result["results"] if "skipped" not in r]
    skipped = len(result["results"]) - len(ran)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(ran) + 2), 5.0), layout="constrained")
    if ran:
        fps = [r["fps"] for r in ran]
        bars = ax.bar(range(len(ran)), fps, color="tab:blue")
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in fps], fontsize=7)
        ax.set_xticks(range(len(ran)), [_label(r) for r in ran], rotation=60, ha="right")
        ax.set_yscale("log")
        ax.axhline(20, color="tab:red", lw=0.8, ls="--", label="20 fps (video-rate confocal)")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no configuration ran", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("frames per second")
    ax.set_title(f"engine throughput ({len(ran)} ran, {skipped} skipped)")
    path = out_dir / "throughput.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def format_row(row: dict[str, Any]) -> str:
    """One result row as a line of text."""
    if "skipped" in row:
        return f"{_label(row)}: skipped: {row['skipped']}"
    lat, st = row["latency_ms"], row["stages_ms"]
    return (
        f"{_label(row)}: {row['fps']:.2f} fps, {row['mpx_per_s']:.2f} Mpx/s, "
        f"p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms, "
        f"pre/inf/post {st['preprocess']:.2f}/{st['inference']:.2f}/{st['postprocess']:.2f} ms"
    )


def format_table(result: dict[str, Any]) -> str:
    """The result as a Markdown table (skipped rows give their reason)."""
    head = (
        "| engine | backend | size | tile | batch | fps | Mpx/s | p50 ms | p99 ms "
        "| pre ms | infer ms | post ms |"
    )
    lines = [head, "|" + " --- |" * 12]
    for r in result["results"]:
        tile = "whole" if r["tile"] is None else r["tile"]
        cells = [r["engine"], r["backend"], r["size"], tile, r["batch"]]
        if "skipped" in r:
            cells += [f"skipped: {r['skipped']}", "", "", "", "", "", ""]
        else:
            lat, st = r["latency_ms"], r["stages_ms"]
            cells += [
                f"{r['fps']:.2f}",
                f"{r['mpx_per_s']:.2f}",
                f"{lat['p50']:.2f}",
                f"{lat['p99']:.2f}",
                *(f"{st[s]:.2f}" for s in STAGES),
            ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)
