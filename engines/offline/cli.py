"""``scopecast export``: a training checkpoint -> an engine package (ONNX + manifest). Offline:
it needs torch (extra ``train``), imported only when the command runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from calibration.errors import user_mistakes
from engines.train.cli import need_torch


def export(
    checkpoint: Annotated[Path, typer.Argument(help="a checkpoint from `scopecast train`")],
    out: Annotated[Path, typer.Option(help="engine package folder to write")],
    name: Annotated[str | None, typer.Option(help="engine name (default: the config's)")] = None,
) -> None:
    """Export a checkpoint to an engine package: ONNX checked against torch, plus manifest."""
    need_torch()
    from engines.offline.export import export as run_export

    with user_mistakes(ValueError):  # a checkpoint that is not one raises plain ValueError
        package, error = run_export(checkpoint, out, name=name)
    m = package.manifest
    print(
        f"{package.path}: {m.name} ({m.architecture}, x{m.scale}, window {m.temporal.window}, "
        f"tile {m.tile.size}/{m.tile.overlap}), ONNX vs torch max relative error {error:.2e}"
    )
