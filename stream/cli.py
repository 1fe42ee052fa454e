"""The ``scopecast`` command. Each package owns its sub-commands; other packages (bench) add
theirs through the ``scopecast.commands`` entry-point group, so stream never imports them."""

from __future__ import annotations

import json
import logging
import signal
import zlib
from contextlib import ExitStack, contextmanager
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from .endpoints import EndpointError
from .hook import FrameHook, ReceiverUnreachable

app = typer.Typer(
    name="scopecast",
    help="Real-time enhancement for light microscopes: acquisition hook, engine server, tools.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True, soft_wrap=True)

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


@contextmanager
def _expected_errors():
    """Turn the mistakes a user can make into one red line and exit code 2, not a traceback."""
    from .acquire import SetupError

    try:
        yield
    except (SetupError, EndpointError, ReceiverUnreachable, OSError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )


@app.command()
def presets() -> None:
    """List the simulated microscope's presets."""
    from .simulated import PRESETS

    table = Table("frame", "um/px", "interval s", "channels", "what it is")
    table.columns.insert(0, Column("preset", no_wrap=True))
    for p in PRESETS.values():
        table.add_row(
            p.name,
            "x".join(map(str, p.shape)),
            f"{p.pixel_size_um:g}",
            f"{p.frame_interval_s:g}",
            ", ".join(p.channels),
            p.description,
        )
    out.print(table)


@app.command()
def acquire(
    to: Annotated[str, typer.Option(help="engine server (PULL) endpoint to push frames to")] = (
        DEFAULT_ENDPOINT
    ),
    preset: Annotated[
        str | None,
        typer.Option(
            help="simulated microscope preset (see `scopecast presets`); default confocal-20fps"
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="Micro-Manager config file of a real rig (instead of --preset)"),
    ] = None,
    sequence: Annotated[
        Path | None,
        typer.Option(help="useq MDASequence as YAML or JSON; default: the preset's time-lapse"),
    ] = None,
    duration: Annotated[
        float, typer.Option(help="seconds of time-lapse when no --sequence")
    ] = 10.0,
    interval: Annotated[
        float | None,
        typer.Option(help="time-lapse interval in s when no --sequence (default: the preset's)"),
    ] = None,
    stream: Annotated[str, typer.Option(help="stream id written in every header")] = "scope",
    hwm: Annotated[int, typer.Option(help="frames queued before frames are not handed over")] = 32,
    wait: Annotated[
        float,
        typer.Option(help="seconds to wait for a receiver before starting; 0 starts without one"),
    ] = 5.0,
    seed: Annotated[int, typer.Option(help="simulated specimen and noise seed")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Run an acquisition and push every frame to an engine server over ZeroMQ.

    Frames the receiver cannot take in time are counted as not handed over; the acquisition
    never waits for them.
    """
    from . import acquire as acq
    from .simulated import time_plan

    with _expected_errors():
        if config and preset:
            raise acq.SetupError(
                "give either --config (a real rig) or --preset (simulated), not both"
            )
        for name, value in (("--duration", duration), ("--interval", interval)):
            if value is not None and value <= 0:
                raise acq.SetupError(f"{name} {value} must be > 0")
        if config:
            core = acq.load_config(config)
            default_seq = acq.useq.MDASequence(time_plan=time_plan(duration, interval or 0.1))
        else:
            scope = acq.simulated(preset or "confocal-20fps", seed)
            core, default_seq = scope.core, scope.preset.sequence(duration, interval)
        seq = acq.load_sequence(sequence) if sequence else default_seq
        hook = FrameHook(to, stream=stream, hwm=hwm, on_finished=lambda stats: None)
        if wait > 0:
            hook.wait_for_receiver(wait)
        total = sum(1 for _ in seq)
        with _progress() as bar:
            task = bar.add_task(f"acquiring -> {to}", total=total, status="")
            summary = acq.run(
                core,
                seq,
                hook,
                on_progress=lambda s: bar.update(
                    task,
                    completed=s.frames_seen,
                    status=f"not handed over: {s.frames_not_handed_over}",
                ),
            )
        hook.close()
    if as_json:
        out.print_json(json.dumps(summary))
    else:
        _print_summary("acquisition", summary)
    if summary["frames_seen"] < summary["frames_expected"]:
        raise typer.Exit(1)


@app.command()
def receive(
    listen: Annotated[str, typer.Option(help="endpoint to bind (PULL)")] = DEFAULT_ENDPOINT,
    count: Annotated[int | None, typer.Option(help="stop after this many frames")] = None,
    idle_timeout: Annotated[
        float, typer.Option(help="stop after this long without a frame")
    ] = 10.0,
    insecure: Annotated[
        bool, typer.Option(help="allow binding a non-loopback address without authentication")
    ] = False,
    headers: Annotated[
        Path | None,
        typer.Option(
            help="append every received header, with the pixels' crc32, to this JSONL file"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Receive frames without enhancing them: check sequence numbers and measure latency.

    A plain end point for testing a rig's hook and network; `scopecast serve` is the engine
    server.
    """
    from .receiver import FrameReceiver

    stopping = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.append(True))
    with _expected_errors(), FrameReceiver(listen, insecure=insecure) as rx, ExitStack() as stack:
        on_frame = None
        if headers is not None:
            log = stack.enter_context(headers.open("a"))

            def on_frame(header, pixels):
                line = header.model_dump(mode="json", exclude_none=True)
                line["crc32"] = zlib.crc32(pixels)
                log.write(json.dumps(line) + "\n")
                log.flush()

        if not as_json:
            err.print(f"listening on {listen}")
        stats = rx.run(
            on_frame, count=count, idle_timeout_s=idle_timeout, should_stop=lambda: bool(stopping)
        )
    summary = stats.summary()
    if as_json:
        print(json.dumps(summary), flush=True)
    else:
        _print_summary("receiver", summary)


@app.command()
def demo(
    preset: Annotated[str, typer.Option(help="simulated microscope preset")] = "confocal-20fps",
    duration: Annotated[float, typer.Option(help="seconds of acquisition")] = 5.0,
    seed: Annotated[int, typer.Option(help="simulated specimen and noise seed")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Simulated microscope -> hook -> ZeroMQ -> a receiver in another process, end to end.

    No engine server ships yet, so frames arrive raw and are not enhanced; the summary says so.
    """
    from . import acquire as acq

    with _expected_errors():
        if duration <= 0:
            raise acq.SetupError(f"--duration {duration} must be > 0")
        scope = acq.simulated(preset, seed)
        seq = scope.preset.sequence(duration)
        with _progress() as bar:
            task = bar.add_task(preset, total=sum(1 for _ in seq), status="")
            summary, received = acq.run_with_receiver(
                scope.core,
                seq,
                stream="demo",
                on_progress=lambda s: bar.update(
                    task, completed=s.frames_seen, status=f"sent {s.frames_sent}"
                ),
            )
    result = {
        "preset": preset,
        "engine": None,
        "frames_acquired": summary["frames_seen"],
        "frames_enhanced": 0,
        "frames_not_handed_over": summary["frames_not_handed_over"],
        "frames_received": received["frames_received"],
        "frames_missing": received["frames_missing"],
        "acquired_fps": summary["fps"],
        "latency_ms": {
            "frameReady_to_sent": summary["hook_ms"],
            "frameReady_to_receiver": received["latency_ms"],
        },
        "files": [],
        "note": "no engine server in this version: frames were received raw, not enhanced",
    }
    if as_json:
        print(json.dumps(result), flush=True)
    else:
        _print_summary("demo", result)


def _print_summary(title: str, summary: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False)
    for key, value in summary.items():
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            for sub, v in value.items():
                table.add_row(f"{key} {sub}", _fmt(v))
        else:
            table.add_row(key, _fmt(value))
    out.print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "  ".join(f"{k} {_fmt(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return "\n".join(map(str, value)) or "-"
    return "-" if value is None else str(value)


def _add_plugins() -> None:
    """Mount sub-command groups other packages register under ``scopecast.commands``."""
    for ep in entry_points(group="scopecast.commands"):
        try:
            app.add_typer(ep.load(), name=ep.name)
        except Exception as e:  # a broken plugin must not break the core commands
            err.print(f"[yellow]warning:[/yellow] command group {ep.name!r} not loaded: {e}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _add_plugins()
    app(prog_name="scopecast")
