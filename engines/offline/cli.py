"""``scopecast export``: a training checkpoint -> an engine package (ONNX + manifest), and
``scopecast adapt``: an engine learnt from a rig's own noisy recording. Offline: they need
torch (extra ``train``), imported only when a command runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from calibration.errors import user_mistakes
from engines.train.cli import need_torch, training_bar

err = Console(stderr=True, soft_wrap=True)


def export(
    checkpoint: Annotated[Path, typer.Argument(help="a checkpoint from `scopecast train`")],
    out: Annotated[Path, typer.Option(help="engine package folder to write")],
    name: Annotated[str | None, typer.Option(help="engine name (default: the config's)")] = None,
    bioimageio: Annotated[
        Path | None,
        typer.Option(
            metavar="OUT.zip",
            help="also write the package as a bioimage.io model (validated with bioimageio.spec)",
        ),
    ] = None,
) -> None:
    """Export a checkpoint to an engine package: ONNX checked against torch, plus manifest;
    with --bioimageio, also as a bioimage.io model package."""
    need_torch()
    if bioimageio is not None:  # before the export, not after it
        from engines.offline.bioimageio import check_zip_name, need_bioimageio

        need_bioimageio()
        check_zip_name(bioimageio)
    from engines.offline.export import export as run_export

    with user_mistakes(ValueError):  # a checkpoint that is not one raises plain ValueError
        package, error = run_export(checkpoint, out, name=name)
    m = package.manifest
    print(
        f"{package.path}: {m.name} ({m.architecture}, x{m.scale}, window {m.temporal.window}, "
        f"tile {m.tile.size}/{m.tile.overlap}), ONNX vs torch max relative error {error:.2e}"
    )
    if bioimageio is not None:
        from engines.offline.bioimageio import export_bioimageio

        result = export_bioimageio(package.path, bioimageio)
        print(f"{result.path}: bioimage.io model ({result.status})")


def adapt(
    recording: Annotated[
        Path,
        typer.Argument(
            help="the rig's noisy recording: a scopecast run folder (its raw files), a folder "
            "of (T, H, W) TIFF/OME-TIFF time-lapses, or one such file"
        ),
    ],
    out: Annotated[
        Path | None, typer.Option(help="folder for the engine, the run and the report")
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(help="engine to start from (name or package folder); none: from scratch"),
    ] = "confocal-denoise",
    target: Annotated[
        str,
        typer.Option(
            help="next-frame: Noise2Noise in time (needs frames of a still field, a moving "
            "field's pairs are left out); blind-spot: Noise2Void (single frames do; trains "
            "from scratch); line-split: Neighbor2Neighbor on the scan lines (single frames do; "
            "undoes a bidirectional profile's line phase, so serve with --correct-bidir)"
        ),
    ] = "next-frame",
    steps: Annotated[int, typer.Option(min=1, help="training steps")] = 1500,
    frames: Annotated[int, typer.Option(min=10, help="frames read from each file (its first)")] = (
        500
    ),
    profile: Annotated[
        Path | None,
        typer.Option(help="the rig's calibration profile (units, offset map, noise model)"),
    ] = None,
    backend: Annotated[str, typer.Option(help="backend the gate runs the engines on")] = (
        "onnxruntime"
    ),
    denoiser: Annotated[
        str,
        typer.Option(
            help="super-resolution bases: the denoiser whose estimates of the training frames "
            "the rig's forward model turns into training pairs (e.g. an engine adapted first)"
        ),
    ] = "confocal-denoise",
    check: Annotated[
        str | None,
        typer.Option(
            help="no training: run the gate alone on every frame of the recording, ENGINE "
            "(a name or package folder made elsewhere) against --base; exit 1 if refused"
        ),
    ] = None,
) -> None:
    """Adapt an engine to this rig and specimen from its own noisy recording alone, then gate
    it: held-out frames must match the next raw frame at least as well as the base engine's
    output, and their fidelity chi-square must be honest (0.8-1.3). Writes OUT/engine (passed)
    or OUT/candidate (refused, exit code 1), OUT/report.json and OUT/report.png. With
    --check ENGINE, the gate alone: is an engine made elsewhere fit for this recording?"""
    need_torch()
    from engines.offline.adapt import GateRefused, run_check
    from engines.offline.adapt import adapt as run_adapt

    base = None if base in (None, "", "none") else base
    if check is not None:
        with user_mistakes(ValueError, FileNotFoundError):
            try:
                checked = run_check(recording, check, base=base, frames=frames, profile=profile,
                                    backend=backend)  # fmt: skip
            except GateRefused as e:
                err.print(f"[red]refused:[/red] {e}", highlight=False)
                raise typer.Exit(1) from None
        print(json.dumps(checked, indent=2))
        return
    if out is None:
        raise typer.BadParameter("adapting needs --out DIR (only --check runs without it)")
    if target not in ("next-frame", "blind-spot", "line-split"):
        raise typer.BadParameter(f"{target!r}: choose next-frame, blind-spot or line-split")
    kw = {"base": base, "target": target, "steps": steps, "frames": frames, "profile": profile,
          "backend": backend, "denoiser": denoiser}  # fmt: skip
    with user_mistakes(ValueError, FileNotFoundError), training_bar("adapt", steps) as show:
        try:
            result = run_adapt(recording, out, on_train=show,
                               progress=lambda m: err.print(m, highlight=False), **kw)  # fmt: skip
        except GateRefused as e:
            err.print(f"[red]refused:[/red] {e}", highlight=False)
            raise typer.Exit(1) from None
    s = result["scores"]
    gain = result.get("consistency_gain_db")
    err.print(
        f"adapted in {result['total_s']:.0f} s ({result['steps']} steps); held-out consistency "
        + (f"{gain:+.2f} dB over the base engine, " if gain is not None else "")
        + f"fidelity chi2 {s['adapted']['chi2']:.3f}; gate passed",
        highlight=False,
    )
    print(out / "engine")
