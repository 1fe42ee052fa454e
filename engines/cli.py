"""``scopecast engines``: list, show and verify engine packages (zoo and $SCOPECAST_ENGINE_PATH)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from calibration.errors import InvalidInput

from .package import (
    ENGINE_PATH_ENV,
    EnginePackage,
    Manifest,
    PackageError,
    find_package,
    is_warning,
    list_packages,
    load_package,
    manifest_json,
    verify_package,
)

app = typer.Typer(
    name="engines",
    help=f"Engine packages: list those found (zoo and ${ENGINE_PATH_ENV}), show one, verify one.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

Target = Annotated[str, typer.Argument(help="Engine name (zoo or search path) or package folder.")]


def _fail(message: str) -> typer.Exit:
    """One red ``error:`` line and exit code 1: the command ran and found something wrong.
    A user's mistake (unknown engine, bad option) is a ScopecastError instead, reported by
    the ``scopecast`` command as one line and exit code 2."""
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    return typer.Exit(1)


def _tile(m: Manifest) -> str:
    return "whole" if m.tile.size is None else f"{m.tile.size}/{m.tile.overlap}"


def _short(path: Path) -> str:
    """The path relative to the working folder when it is inside it, else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@app.command("list")
def list_() -> None:
    """Every engine package found, and the problem of each one that does not load."""
    entries = list_packages()
    widest = max((len(e.name) for e in entries), default=4)
    table = Table(
        Column("name", no_wrap=True, min_width=widest),
        *(Column(t, no_wrap=True) for t in ("task", "scale", "window", "tile", "baseline")),
        Column("version", no_wrap=True),
        Column("path", overflow="fold", min_width=8),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        caption="tile: size/overlap in input pixels; whole: the frame in one call",
    )
    broken = []
    for entry in entries:
        if entry.package is None:
            broken.append(entry)
            continue
        m = entry.package.manifest
        table.add_row(
            m.name,
            m.task,
            f"x{m.scale}",
            str(m.temporal.window),
            _tile(m),
            "yes" if m.baseline else "",
            m.version,
            _short(entry.path),
        )
    out.print(table)
    for entry in broken:
        out.print(
            f"[red]broken:[/red] {escape(entry.name)} ({entry.path}): {escape(entry.problem)}"
        )


def _manifest_text(m: Manifest) -> list[str]:
    t, n = m.temporal, m.normalization
    extra = [
        x for x, on in (("previous output", t.previous_output), ("background", t.background)) if on
    ]
    lines = [
        f"{m.name} {m.version}: {m.task}{' (classical baseline)' if m.baseline else ''}",
        f"  {m.description}" if m.description else "",
        f"architecture   {m.architecture}",
        f"scale          x{m.scale}, {m.channels} channel(s), output dtype {m.output_dtype}",
        f"temporal       window {t.window}" + (f" + {', '.join(extra)}" if extra else ""),
        (
            f"tiles          {_tile(m)} (size/overlap), multiple of {m.tile.multiple}, "
            f"batch {m.tile.batch}"
        ),
        f"normalization  (raw - {n.offset:g}) / {n.scale:g}",
        f"precision      {m.precision}",
        f"model          {m.model} (inputs {', '.join(m.input_names)})",
    ]
    for p in m.plans:
        lines.append(
            f"plan           {p.file}: TensorRT {p.tensorrt}, {p.gpu} (sm {p.compute_capability}), "
            f"{p.precision}"
        )
    lines += [f"file           {name}  sha256 {sha}" for name, sha in sorted(m.files.items())]
    for title, data in (("provenance", m.provenance), ("metrics", m.metrics)):
        if data:
            lines.append(f"{title:<15}{json.dumps(data, sort_keys=True)}")
    return [line for line in lines if line]


def _io_lines(package: EnginePackage) -> list[str]:
    from .runtime import BackendError, open_backend

    try:
        backend, _ = open_backend(package, "onnxruntime-cpu", threads=1)
    except (BackendError, PackageError) as e:
        return [f"onnxruntime cannot open the model: {e}"]
    try:
        info: dict[str, Any] = backend.describe()
    finally:
        backend.close()
    lines = [f"onnxruntime {info['versions']['onnxruntime']} reports:"]
    for kind in ("inputs", "outputs"):
        for arg in info.get(kind, []):
            shape = "x".join(str(d) for d in arg["shape"])
            lines.append(f"  {kind[:-1]:<7}{arg['name']}: {arg['type']} [{shape}]")
    return lines


@app.command()
def show(
    target: Target,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw manifest JSON.")] = False,
) -> None:
    """A package's manifest, and the model inputs and outputs as onnxruntime reports them."""
    path = find_package(target)
    try:
        package = load_package(path)
    except PackageError as e:  # found, but broken: exit 1, as `verify` does
        raise _fail(str(e)) from None
    if as_json:
        typer.echo(manifest_json(package.manifest), nl=False)
        return
    for line in [*_manifest_text(package.manifest), f"path           {package.path}"]:
        out.print(line, highlight=False, markup=False)
    for line in _io_lines(package):
        out.print(line, highlight=False, markup=False)


@app.command()
def verify(target: Target) -> None:
    """Check a package's manifest and every file's sha256; exit 1 if anything is wrong."""
    path = find_package(target)
    problems = verify_package(path)
    errors = [p for p in problems if not is_warning(p)]
    for p in problems:
        (err if p in errors else out).print(escape(p), highlight=False)
    if errors:
        raise _fail(f"{path}: {len(errors)} problem(s) found")
    package = load_package(path)
    out.print(f"ok: {len(package.manifest.files)} files verified in {path}", highlight=False)


@app.command("raw-io")
def raw_io(
    target: Target,
    out_dir: Annotated[Path, typer.Option("--out", help="folder to write the raw-io package to")],
    dtype: Annotated[str, typer.Option(help="the frames' dtype: uint16 or uint8")] = "uint16",
    name: Annotated[
        str | None, typer.Option(help="engine name (default: the source's name + '-raw')")
    ] = None,
) -> None:
    """Make a raw-io package: its graph takes the raw frames and returns the written frame
    (normalization, units, rounding and clipping inside), so the server does no per-pixel work
    around it. Checked against the source on ONNX Runtime (<= 1 ADU apart) before writing."""
    from .offline.raw_io import RawIoError, make_raw_package

    def say(message: str) -> None:
        err.print(escape(message), highlight=False)

    try:
        result = make_raw_package(target, out_dir, dtype=dtype, name=name, progress=say)
    except RawIoError as e:
        raise InvalidInput(str(e)) from None
    m = result.package.manifest
    out.print(
        f"ok: {m.name} ({m.raw_dtype} frames in, written frame out; inputs "
        f"{', '.join(m.input_names)}) written to {result.package.path}",
        highlight=False,
        markup=False,
    )


def build(
    target: Target,
    precision: Annotated[
        str, typer.Option(help="fp32, fp16 or int8 (int8 needs --calibration)")
    ] = "fp16",
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="frames from the rig for int8 scales and the numerics guard: a TIFF stack, a "
            "folder of TIFFs, .npy or .npz (N, H, W); default for fp32/fp16: synthetic frames"
        ),
    ] = None,
    workspace_mb: Annotated[
        int, typer.Option("--workspace-mb", help="TensorRT builder workspace in MiB")
    ] = 1024,
    timing_cache: Annotated[
        Path | None,
        typer.Option(
            help="timing cache file, read and updated (default: one per TensorRT "
            "version and GPU kind under ~/.cache/scopecast/tensorrt)"
        ),
    ] = None,
    batch: Annotated[
        list[int] | None,
        typer.Option(help="tiles per call a profile must take (repeat); default: the manifest's"),
    ] = None,
    tile: Annotated[
        list[int] | None, typer.Option(help="tile side to build for (repeat); default: manifest's")
    ] = None,
    max_size: Annotated[
        int, typer.Option(help="largest frame side for whole-frame (untiled) engines")
    ] = 2048,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="write the package with its new plan here (default: in "
            "place; needed for zoo packages)",
        ),
    ] = None,
    max_error: Annotated[
        float | None,
        typer.Option(
            help="largest error allowed, as a fraction of the output range "
            "(default per precision: fp32 0.01, fp16 0.03, int8 0.15)"
        ),
    ] = None,
    min_psnr: Annotated[
        float | None,
        typer.Option(help="lowest PSNR in dB allowed (default per precision: 60, 45, 30)"),
    ] = None,
) -> None:
    """Build a TensorRT plan for this GPU, check its numbers against ONNX Runtime, package it.

    The plan carries the precision of the ONNX it is built from (fp16 weights; int8 Q/DQ from
    calibration frames); optimization profiles cover the package's tile and batch sizes. A plan
    whose output strays beyond tolerance (or has NaN, inf or a constant frame) is rejected.
    """
    from .offline.build import BuildRejected, build_plan
    from .runtime.guard import PRECISIONS, tolerance_for

    if precision not in PRECISIONS:
        raise InvalidInput(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    tolerance = None
    if max_error is not None or min_psnr is not None:
        base = tolerance_for(precision)
        update = {"max_error": max_error, "min_psnr_db": min_psnr}
        tolerance = base.model_copy(update={k: v for k, v in update.items() if v is not None})
    path = find_package(target)

    def say(message: str) -> None:
        err.print(escape(message), highlight=False)

    try:
        result = build_plan(
            path, precision, calibration=calibration, workspace_mb=workspace_mb,
            timing_cache=timing_cache, batches=batch, tiles=tile, max_side=max_size, out=out_dir,
            tolerance=tolerance, progress=say,
        )  # fmt: skip
    except BuildRejected as e:  # the numerics guard said no: a result, exit 1
        raise _fail(str(e)) from None
    plan = result.plan
    size_mb = (result.package.path / plan.file).stat().st_size / 2**20
    out.print(
        f"ok: {plan.file} ({size_mb:.1f} MiB, {plan.precision}, TensorRT {plan.tensorrt}, "
        f"{plan.gpu}, sm {plan.compute_capability}) built in {result.seconds:.1f} s, written to "
        f"{result.package.path}",
        highlight=False,
        markup=False,
    )


@app.command("export-bioimageio")
def export_bioimageio(
    target: Target,
    out_zip: Annotated[
        Path, typer.Argument(metavar="OUT.zip", help="bioimage.io package to write")
    ],
    author: Annotated[
        list[str] | None, typer.Option(help="author name for the rdf (repeat; default: scopecast)")
    ] = None,
    license_: Annotated[
        str, typer.Option("--license", help="SPDX license identifier of the model")
    ] = "BSD-3-Clause",
) -> None:
    """Write an engine package as a bioimage.io model (rdf.yaml format 0.5, ONNX weights, test
    tensors computed by the engine, cover, documentation; temporal inputs, tile and units under
    config.scopecast), validated with bioimageio.spec."""
    from .offline.bioimageio import export_bioimageio as run

    result = run(target, out_zip, authors=author or (), license=license_)
    for w in result.warnings:
        err.print(f"bioimageio.spec: {escape(w)}", highlight=False)
    out.print(
        f"ok: {result.path} ({result.status}; inputs {', '.join(result.inputs)})",
        highlight=False,
        markup=False,
    )


@app.command("import")
def import_(
    source: Annotated[
        Path, typer.Argument(metavar="MODEL", help="bioimage.io model: a .zip or its rdf.yaml")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="engine package folder to write")],
    name: Annotated[str | None, typer.Option(help="engine name (default: from the model)")] = None,
    task: Annotated[
        str | None,
        typer.Option(help="denoise, deblur, super-resolution, ... (default: from its tags)"),
    ] = None,
    tile: Annotated[
        int | None, typer.Option(help="tile side in input pixels (default: from the model)")
    ] = None,
) -> None:
    """Turn a bioimage.io model with ONNX weights (TorchScript or PyTorch weights: converted,
    with the train extra) into an engine package, verified against the model's test tensors.
    Fixed normalization goes to the manifest, per-frame statistics and other steps into the
    ONNX graph; what cannot be mapped exactly is refused."""
    from .offline.bioimageio import import_bioimageio

    def say(message: str) -> None:
        err.print(escape(message), highlight=False)

    result = import_bioimageio(source, out_dir, name=name, task=task, tile=tile, progress=say)
    for line in [*result.mapped, *result.baked]:
        say(line)
    m = result.package.manifest
    out.print(
        f"ok: {result.package.path}: {m.name} ({m.task}, x{m.scale}, tile {_tile(m)}), "
        f"verified against the model's test output (max abs error {result.max_abs_error:.3g})",
        highlight=False,
        markup=False,
    )


@app.command("export-triton")
def export_triton(
    targets: Annotated[
        list[str], typer.Argument(help="Engine names (zoo or search path) or package folders.")
    ],
    repository: Annotated[
        Path, typer.Option("--repository", help="the Triton model repository folder to write")
    ],
    max_batch: Annotated[
        int, typer.Option(help="max_batch_size where the ONNX batch dimension is free; 0: none")
    ] = 8,
    queue_delay_us: Annotated[
        int,
        typer.Option(help="dynamic batching: longest wait for a fuller batch, microseconds"),
    ] = 500,
    device: Annotated[str, typer.Option(help="instance group kind: gpu or cpu")] = "gpu",
    instances: Annotated[int, typer.Option(help="model instances per device")] = 1,
    gpu: Annotated[
        list[int] | None, typer.Option(help="GPU index for the instances (repeat); default: all")
    ] = None,
    runtime: Annotated[
        str,
        typer.Option(
            help="onnxruntime: Triton's ONNX Runtime backend; python: a Python-backend model "
            "running the ONNX with onnxruntime inside Triton (for builds without that backend)"
        ),
    ] = "onnxruntime",
) -> None:
    """Write a Triton Inference Server model repository from engine packages: per engine its
    ONNX, config.pbtxt (real input/output names, dims, batching, instances) and manifest, plus
    a NAME-tensorrt model with its TensorRT plans when it has some. Serve with
    `tritonserver --model-repository DIR`, then `scopecast serve --backend triton`."""
    from .offline.triton_repo import ExportOptions, export_repository

    options = ExportOptions(
        max_batch=max_batch, queue_delay_us=queue_delay_us, device=device, instances=instances,
        gpus=tuple(gpu or ()), runtime=runtime,
    )  # fmt: skip
    for model in export_repository(targets, repository, options):
        dims = ", ".join(f"{t.name} {list(t.dims)}" for t in model.inputs)
        out.print(
            f"ok: {model.path} ({model.platform}, max_batch_size {model.max_batch_size}, "
            f"inputs {dims})",
            highlight=False,
            markup=False,
        )
