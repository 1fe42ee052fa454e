"""``scopecast bench ...`` and ``python -m bench ...``: latency, throughput and quality.

Every subcommand prints a table, writes one JSON file with every number into ``--out`` (with
the machine and versions), draws PNG plots there, and with ``--compare OLD.json`` shows what
changed since an older run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Column, Table

from .report import compare, fmt, write_result

app = typer.Typer(
    name="bench",
    help="Measure scopecast: latency through the whole pipeline, engine throughput, and "
    "image quality against classical baselines. Older scripts: python -m bench.hook_latency, "
    "bench.server_latency, bench.sim_noise, bench.model_speed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True, soft_wrap=True)

Out = Annotated[Path, typer.Option("--out", help="folder for the JSON file and the plots")]
Compare = Annotated[
    Path | None, typer.Option("--compare", help="an older result JSON to compare with")
]
Engines = Annotated[
    list[str], typer.Option("--engine", help="engine name or package folder (repeat)")
]


def _run(
    measure: Callable[[], dict[str, Any]],
    plot: Callable[[dict[str, Any], Path], list[Path]],
    table: Callable[[dict[str, Any]], Table],
    out_dir: Path,
    older: Path | None,
) -> None:
    """Measure, then report: table, JSON (without per-frame samples), plots, comparison."""
    old = None
    if older is not None:
        try:
            old = json.loads(older.read_text())
        except (OSError, ValueError) as e:
            _fail(f"cannot read --compare {older}: {e}")
    try:
        result = measure()
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    out.print(table(result))
    plots = plot(result, out_dir) if plot is not None else []
    path = write_result(_without_samples(result), out_dir)
    for p in [path, *plots]:
        err.print(str(p), highlight=False)
    if old is not None:
        out.print(compare(result, old))


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(2)


def _without_samples(result: dict[str, Any]) -> dict[str, Any]:
    """The result without per-frame samples and images (the plots show those)."""
    result = {k: v for k, v in result.items() if k != "samples"}
    engines = result.get("engines")
    if isinstance(engines, dict):
        drop = ("samples", "sample_times_s")
        engines = {k: {kk: vv for kk, vv in v.items() if kk not in drop}
                   for k, v in engines.items()}  # fmt: skip
        return {**result, "engines": engines}
    return result


@app.command()
def latency(
    engine: Engines,
    preset: Annotated[str, typer.Option(help="simulated microscope preset")] = "confocal-20fps",
    config: Annotated[
        Path | None, typer.Option(help="Micro-Manager config of a real rig (instead of --preset)")
    ] = None,
    duration: Annotated[float, typer.Option(help="seconds of acquisition per engine")] = 60.0,
    warmup: Annotated[float, typer.Option(help="seconds at the start left out")] = 2.0,
    backend: Annotated[str, typer.Option(help="engine backend (auto, onnxruntime-cpu, ...)")] = (
        "auto"
    ),
    mode: Annotated[str, typer.Option(help="server mode: live or complete")] = "live",
    out_dir: Out = Path("bench-results"),
    older: Compare = None,
) -> None:
    """Where every millisecond goes: a real acquisition through the hook, the server and the
    publisher to a subscriber, per stage, per engine (identity always, as the baseline)."""
    from .latency import plot_latency, run_latency

    def measure() -> dict[str, Any]:
        return run_latency(
            engines=engine, preset=None if config else preset, config=config,
            duration_s=duration, backend=backend, mode=mode, warmup_s=warmup,
            progress=lambda m: err.print(m, highlight=False),
        )  # fmt: skip

    _run(measure, plot_latency, _latency_table, out_dir, older)


@app.command()
def throughput(
    engine: Engines,
    size: Annotated[list[int], typer.Option(help="frame side in pixels (repeat)")] = [256, 2048],  # noqa: B006
    backend: Annotated[list[str], typer.Option(help="backend (repeat)")] = ["auto"],  # noqa: B006
    batch: Annotated[list[int] | None, typer.Option(help="tiles per call (repeat)")] = None,
    tile: Annotated[list[int] | None, typer.Option(help="tile side (repeat)")] = None,
    threads: Annotated[int | None, typer.Option(help="inference threads")] = None,
    seconds: Annotated[float, typer.Option(help="seconds per configuration")] = 5.0,
    out_dir: Out = Path("bench-results"),
    older: Compare = None,
) -> None:
    """The most frames and megapixels per second an engine sustains, offline, per backend,
    frame size, tile size and batch size."""
    from .throughput import plot_throughput, run_throughput

    def measure() -> dict[str, Any]:
        return run_throughput(
            engines=engine, sizes=size, backends=backend, batches=batch, tiles=tile,
            threads=threads, seconds=seconds,
        )  # fmt: skip

    _run(measure, plot_throughput, _throughput_table, out_dir, older)


@app.command()
def quality(
    engine: Engines,
    data: Annotated[
        Path | None, typer.Option(help="folder with low/ and high/ TIFFs matched by name")
    ] = None,
    simulated: Annotated[
        str | None, typer.Option(help="held-out pairs from this simulated preset")
    ] = None,
    pairs: Annotated[int, typer.Option(help="simulated pairs")] = 8,
    out_dir: Out = Path("bench-results"),
    older: Compare = None,
) -> None:
    """How good every engine is against the classical baselines (identity, bicubic, Gaussian,
    non-local means, Richardson-Lucy, unsharp+CLAHE) on paired or held-out simulated data."""
    from .quality import plot_quality, run_quality

    if (data is None) == (simulated is None):
        _fail("give exactly one of --data DIR or --simulated PRESET")

    def measure() -> dict[str, Any]:
        return run_quality(engines=engine, data=data, simulated=simulated, pairs=pairs)

    _run(measure, plot_quality, _quality_table, out_dir, older)


# -- tables -----------------------------------------------------------------------------------


def _latency_table(result: dict[str, Any]) -> Table:
    from .latency import STAGES

    table = Table("engine", "stage", "p50", "p90", "p99", "max",
                  title=f"latency (ms), {result.get('preset') or result.get('config')}, "
                  f"{result['duration_s']:g} s per engine, one run")  # fmt: skip
    for name, e in result["engines"].items():
        for stage in STAGES:
            p = e["latency_ms"].get(stage) or {}
            table.add_row(name, stage, *(fmt(p.get(k)) for k in ("p50", "p90", "p99", "max")))
        table.add_row(
            name, "frames",
            f"{e['frames_enhanced']}/{e['frames_acquired']} enhanced",
            f"{e['frames_skipped']} skipped", f"{e['frames_not_handed_over']} not handed over",
            f"{fmt(e.get('fps_acquired'))} fps",
        )  # fmt: skip
        table.add_row(name, "server", f"{fmt(e.get('rss_mb'))} MB", f"{fmt(e.get('cpu_percent'))}% CPU",
                      e.get("backend") or "", "", end_section=True)  # fmt: skip
    return table


def _throughput_table(result: dict[str, Any]) -> Table:
    table = Table("engine", "backend", "size", "tile", "batch", "fps", "Mpx/s", "p50 ms",
                  "p99 ms", title="throughput (offline, one run)")  # fmt: skip
    for r in result["results"]:
        head = [r["engine"], r["backend"], str(r["size"]), fmt(r.get("tile")), fmt(r.get("batch"))]
        if "skipped" in r:
            table.add_row(*head, "skipped", r["skipped"], "", "")
            continue
        lat = r["latency_ms"]
        table.add_row(*head, fmt(r["fps"]), fmt(r["mpx_per_s"]), fmt(lat["p50"]), fmt(lat["p99"]))
    return table


def _quality_table(result: dict[str, Any]) -> Table:
    metrics = {"psnr": "PSNR dB", "ssim": "SSIM", "ms_ssim": "MS-SSIM", "nrmse": "NRMSE",
               "decorrelation_px": "decorr px", "fidelity_chi2": "chi2", "flicker": "flicker"}  # fmt: skip
    table = Table(Column("method", no_wrap=True), *metrics.values(),
                  title=f"quality, {result.get('simulated') or result.get('data')}, "
                  f"{result['pairs']} pairs (mean)")  # fmt: skip
    for name, m in result["methods"].items():
        table.add_row(name.replace("engine:", "engine "), *(fmt(m.get(k)) for k in metrics))
    return table
