"""``scopecast synthesize``: synthetic annotated data. ``masks`` writes a label time-lapse of
moving, dividing cells (OME-TIFF), its tracks table and its Cell Tracking Challenge lineage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from calibration.sim.masks import FrameStats, MaskParams, synthesize_masks, write_masks

app = typer.Typer(
    name="synthesize",
    help="Synthetic annotated data: label time-lapses of cells with lineage (masks).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True)

_D = MaskParams.model_fields


@app.callback()
def synthesize() -> None:
    """Synthetic annotated data: label time-lapses of cells with lineage (masks)."""


def _help(name: str) -> str:
    return _D[name].description or ""


@app.command()
def masks(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder to write into (created if missing).")
    ],
    frames: Annotated[int, typer.Option(help=_help("frames"))] = 50,
    size: Annotated[
        int, typer.Option(help="Field width in pixels (and height unless --height).")
    ] = 256,
    height: Annotated[int | None, typer.Option(help="Field height in pixels.")] = None,
    density: Annotated[float, typer.Option(help=_help("density"))] = 0.5,
    radius_um: Annotated[float, typer.Option(help=_help("radius_um"))] = 6.0,
    radius_cv: Annotated[float, typer.Option(help=_help("radius_cv"))] = 0.2,
    pixel_um: Annotated[float, typer.Option(help=_help("pixel_um"))] = 0.65,
    interval_s: Annotated[float, typer.Option(help=_help("interval_s"))] = 60.0,
    elongation: Annotated[float, typer.Option(help=_help("elongation"))] = 1.3,
    irregularity: Annotated[float, typer.Option(help=_help("irregularity"))] = 0.08,
    deformation: Annotated[float, typer.Option(help=_help("deformation"))] = 0.05,
    speed_um: Annotated[float, typer.Option(help=_help("speed_um"))] = 0.5,
    persistence: Annotated[float, typer.Option(help=_help("persistence"))] = 0.8,
    drift_um: Annotated[
        tuple[float, float], typer.Option(help="Global drift per frame: DY DX in µm.")
    ] = (0.0, 0.0),
    rotation_deg: Annotated[float, typer.Option(help=_help("rotation_deg"))] = 0.0,
    spin_deg: Annotated[float, typer.Option(help=_help("spin_deg"))] = 2.0,
    divisions: Annotated[bool, typer.Option(help=_help("divisions"))] = True,
    cycle_frames: Annotated[float, typer.Option(help=_help("cycle_frames"))] = 60.0,
    seed: Annotated[int, typer.Option(help=_help("seed"))] = 0,
    ctc: Annotated[
        bool, typer.Option(help="Also write one maskTTT.tif per frame (a CTC result folder).")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as one JSON object.")
    ] = False,
) -> None:
    """Label time-lapse of moving, dividing cells: OME-TIFF labels, tracks, lineage.

    Writes masks.ome.tif (T, Y, X), tracks.csv (id, t, y, x, area, parent), res_track.txt
    (Cell Tracking Challenge lineage: L B E P) and params.json into --out."""
    params = MaskParams(
        frames=frames,
        height=size if height is None else height,
        width=size,
        density=density,
        radius_um=radius_um,
        radius_cv=radius_cv,
        pixel_um=pixel_um,
        interval_s=interval_s,
        elongation=elongation,
        irregularity=irregularity,
        deformation=deformation,
        speed_um=speed_um,
        persistence=persistence,
        drift_um=drift_um,
        rotation_deg=rotation_deg,
        spin_deg=spin_deg,
        divisions=divisions,
        cycle_frames=cycle_frames,
        seed=seed,
    )
    bar = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=err, transient=True,
    )  # fmt: skip
    with bar:
        task = bar.add_task("masks", total=params.frames, status="")

        def show(f: FrameStats) -> None:
            status = f"{f.cells} cells, density {f.density:.2f}"
            bar.update(task, completed=f.t + 1, status=status)

        movie = synthesize_masks(params, on_frame=show)
        bar.update(task, status="writing")
        paths = write_masks(movie, out_dir, ctc=ctc)
    summary = {
        "out": str(out_dir),
        "frames": params.frames,
        "shape": [params.height, params.width],
        "pixel_um": params.pixel_um,
        "cells": movie.cells,
        "divisions": movie.divisions,
        "tracks": len(movie.tracks),
        "density": round(movie.mean_density, 4),
        "scale": round(sum(f.scale for f in movie.frames) / len(movie.frames), 4),
        "files": {k: str(v) for k, v in paths.items()},
    }
    if as_json:
        out.print(json.dumps(summary), soft_wrap=True)
        return
    out.print(
        f"{params.frames} frames {params.height}x{params.width} at {params.pixel_um:g} µm, "
        f"{movie.cells} cells, {movie.divisions} divisions, {len(movie.tracks)} tracks, "
        f"density {movie.mean_density:.2f} (target {params.density:g}) -> {escape(str(out_dir))}"
    )
