"""The ``scopecast`` command. Each package owns its sub-commands and mounts them through the
``scopecast.commands`` entry-point group (engines, calibrate, train, export, build, bench), so
stream never imports them. A user's mistake in any command is one red ``error:`` line and exit
code 2 (:mod:`stream.console`); commands do not catch errors to report them."""

from __future__ import annotations

import json
import logging
import os
import signal
import zlib
from contextlib import ExitStack
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from engines.runtime import backend_help

from .console import ScopecastGroup, err, out, run_app
from .console import error as _error
from .console import one_line as _one_line
from .console import progress as _progress
from .console import warning as _warning
from .hook import FrameHook, ReceiverUnreachable
from .sinks.base import DEFAULT_SINK, SINKS
from .status import ServerStatus, StageFailure, SwapInfo

app = typer.Typer(
    name="scopecast",
    help="Real-time enhancement for light microscopes: acquisition hook, engine server, tools.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=ScopecastGroup,
)

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


@app.command()
def presets() -> None:
    """List the simulated microscope's presets."""
    from calibration.sim.presets import PRESETS

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
    keys: Annotated[
        Path | None,
        typer.Option(
            help="CURVE key folder from `scopecast keys` (client keys), for a server started "
            "with `serve --keys`"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Run an acquisition and push every frame to an engine server over ZeroMQ.

    Frames the receiver cannot take in time are counted as not handed over; the acquisition
    never waits for them. Exit codes: 0 every frame handed over to a receiver still there at
    the end; 1 frames not handed over, a receiver that went away, or fewer frames than
    planned (a warning line says which); 2 an expected mistake (one red line).
    """
    from calibration.sim.scene import time_plan

    from . import acquire as acq
    from .security import curve_or_none

    if config and preset:
        raise acq.SetupError("give either --config (a real rig) or --preset (simulated), not both")
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
    curve = curve_or_none(keys)
    hook = FrameHook(to, stream=stream, hwm=hwm, curve=curve, on_finished=lambda stats: None)
    if wait > 0:
        try:
            hook.wait_for_receiver(wait)
        except ReceiverUnreachable as e:
            hook.close()
            hint = "" if curve is None else " (or it does not accept these keys)"
            raise ReceiverUnreachable(f"{e}{hint}") from None
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
    problems = acq.delivery_problems(summary, to)
    if summary["frames_seen"] < summary["frames_expected"]:
        problems.append(
            f"the acquisition delivered {summary['frames_seen']} of "
            f"{summary['frames_expected']} planned frames"
        )
    if problems:
        _warning("; ".join(problems) + f": frames may be missing at {to}")
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
    with FrameReceiver(listen, insecure=insecure) as rx, ExitStack() as stack:
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
def serve(
    engine: Annotated[
        list[str] | None,
        typer.Option(
            help="engine name or package folder; repeat to chain (e.g. a temporal model, then "
            "SR). See `scopecast engines list`",
        ),
    ] = None,
    listen: Annotated[str, typer.Option(help="endpoint to receive frames on (PULL)")] = (
        DEFAULT_ENDPOINT
    ),
    publish: Annotated[
        str, typer.Option(help="endpoint to publish raw and enhanced frames on (PUB); 'none'")
    ] = "tcp://127.0.0.1:5556",
    control: Annotated[
        str, typer.Option(help="control endpoint answering `scopecast status` (REP)")
    ] = "tcp://127.0.0.1:5557",
    out_dir: Annotated[
        Path,
        typer.Option("--out", help="folder for runs; each run writes a new run-DATE-TIME in it"),
    ] = Path("scopecast-runs"),
    mode: Annotated[
        str,
        typer.Option(
            help="live: newest frame wins, skips are counted; complete: every frame, in order"
        ),
    ] = "live",
    backend: Annotated[
        str,
        typer.Option(help=f"inference backend: {backend_help()}"),
    ] = "auto",
    threads: Annotated[
        int | None, typer.Option(help="inference threads (default: the backend's choice)")
    ] = None,
    triton_url: Annotated[
        str | None,
        typer.Option(
            help="--backend triton: the Triton server, grpc://HOST:PORT (default: "
            "$SCOPECAST_TRITON_URL, else grpc://127.0.0.1:8001)"
        ),
    ] = None,
    backlog_mb: Annotated[
        float, typer.Option(help="complete mode: backlog kept in memory before spilling to disk")
    ] = 512.0,
    ring_mb: Annotated[
        float,
        typer.Option(help="memory for per-key temporal state; idle keys are evicted past it"),
    ] = 1024.0,
    sink: Annotated[
        list[str] | None,
        typer.Option(
            "--format",
            "--sink",
            help=f"file format of raw and enhanced frames: {', '.join(SINKS)} (default "
            f"{DEFAULT_SINK}); repeat to write several at once",
        ),
    ] = None,
    profile: Annotated[
        Path | None,
        typer.Option(
            help="calibration profile folder (`scopecast calibrate`): electrons engines take the "
            "rig's offsets, gain, flat field and bad pixels from it (without it they assume "
            "their manifest's camera), and every enhanced frame gets a fidelity residual"
        ),
    ] = None,
    correct_bidir: Annotated[
        bool, typer.Option(help="undo the profile's bidirectional line phase before the engine")
    ] = False,
    fidelity_every: Annotated[
        int,
        typer.Option(
            min=0,
            help="with --profile: the full fidelity check (chi-square, scan for invented or "
            "removed objects, significance map on PUB) on every Nth enhanced frame of each "
            "position; the camera-noise check runs on every frame. 0: automatic, as often as "
            "5 ms a frame or 10 ns a raw pixel allows (status says the schedule)",
        ),
    ] = 0,
    adapt_after: Annotated[
        float | None,
        typer.Option(
            min=0.1,
            metavar="S",
            help="adapt the serving denoiser (scale 1) to this rig and specimen: after S "
            "seconds of the first stream key's frames (at most 500, 512 MB), `scopecast "
            "adapt` runs in a niced one-thread child process (extra train) while the engine "
            "serves, and the server swaps to its engine if its gate passes (status: adapt, swap)",
        ),
    ] = None,
    adapt_steps: Annotated[int, typer.Option(min=1, help="--adapt-after: training steps")] = 800,
    keys: Annotated[
        Path | None,
        typer.Option(help="CURVE key folder from `scopecast keys` (required off loopback)"),
    ] = None,
    insecure: Annotated[
        bool, typer.Option(help="bind beyond loopback without authentication (warns)")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="no live status line")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Run the engine server: receive frames, enhance them, write and publish raw + enhanced.

    Stops on Ctrl-C, SIGTERM or `scopecast status --stop`, after flushing and closing every
    file; if one of its stages dies, it flushes, closes every file and stops by itself.

    Exit codes: 0 stopped as asked, every stage healthy; 1 an unexpected error (a bug: the
    traceback says where); 2 an expected mistake, one red line (unknown or tampered engine,
    port in use, malformed endpoint, bad option); 3 a stage of the server died (one red line
    names the stage and its error; the summary says "healthy": false).
    """
    from .server import ServerConfig, ServerError

    if mode not in ("live", "complete"):
        raise ServerError(f"--mode {mode!r} must be live or complete")
    if triton_url is not None:  # read by engines.runtime.triton when the backend opens
        if backend != "triton":
            raise ServerError(
                f"--triton-url {triton_url!r} needs --backend triton, not {backend!r}"
            )
        os.environ["SCOPECAST_TRITON_URL"] = triton_url
    config = ServerConfig(
        engines=engine or ["identity"],
        out_dir=out_dir,
        listen=listen,
        publish=None if publish == "none" else publish,
        control=control,
        mode=mode,
        backend=backend,
        threads=threads,
        backlog_mb=backlog_mb,
        ring_mb=ring_mb,
        sink=_formats(sink),
        profile=profile,
        correct_bidir=correct_bidir,
        fidelity_every=fidelity_every,
        adapt_after_s=adapt_after,
        adapt_steps=adapt_steps,
        keys=keys,
        insecure=insecure,
    )
    summary = _serve(config, quiet=quiet or as_json)
    if as_json:
        print(json.dumps(summary), flush=True)
    elif "engine" in summary:
        _print_summary("server", _brief(summary))
    _exit_if_unhealthy("engine server", summary)


def _formats(names: list[str] | None) -> str:
    """``--format`` given once or more, as one sink name ("ome-tiff+ome-zarr"); a bad or
    repeated name is one red line naming it."""
    from .sinks.base import sink_type

    name = "+".join(names or [DEFAULT_SINK])
    try:
        sink_type(name)
    except ValueError as e:
        raise typer.BadParameter(f"--format: {e}") from None
    return name


def _exit_if_unhealthy(what: str, summary: ServerStatus | dict[str, Any]) -> None:
    """One red line naming the dead stage and its error, and exit 3, for a summary whose
    ``healthy`` is false (a ServerStatus, its JSON, or the partial summary of a server that
    died before it had one: only ``healthy`` and ``failure``)."""
    if isinstance(summary, dict):
        healthy, failure = summary.get("healthy", True), summary.get("failure")
    else:
        healthy, failure = summary.healthy, summary.failure
    if healthy is not False:
        return
    dead = StageFailure.model_validate(failure) if failure else None
    stage, error = (dead.stage, dead.error) if dead else ("?", "no error recorded")
    _error(
        f"the {what}'s {stage} stage died ({_one_line(str(error), 200)}); it flushed and "
        "closed its files and stopped"
    )
    raise typer.Exit(3)


def _serve(config: Any, *, quiet: bool) -> dict[str, Any]:
    """Run a server until a signal or a control ``stop``; show a status line meanwhile."""
    import threading

    from engines.offline.build import rebuild_plan  # TensorRT only; loads neither onnx nor torch

    from .server import EngineServer

    server = EngineServer(config, rebuild=rebuild_plan)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    if not quiet:
        e = server.chain.describe()
        err.print(
            f"serving [bold]{e['engine']}[/bold] ({e['reason'][0]})\n"
            f"  units: {'; '.join(e['units'])}\n"
            f"  frames in {config.listen}  ->  publish {config.publish}  control "
            f"{config.control}\n  writing {server.run_dir}   Ctrl-C stops",
            highlight=False,
        )
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result.update(server.run().model_dump(mode="json"))
        except BaseException as e:  # reported as a dead server below
            logging.getLogger(__name__).exception("the engine server failed")
            result.update(
                healthy=False, failure={"stage": "server", "error": f"{type(e).__name__}: {e}"}
            )

    # the server runs in a thread so that signals (handled by the main thread) reach it
    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    status = None if quiet else err.status("waiting for frames")
    with status or ExitStack():
        while runner.is_alive():
            runner.join(1.0)
            if status is not None:
                s = server.status()
                total = s.latency_ms.get("total")
                status.update(
                    f"received {s.frames_received}  enhanced {s.frames_enhanced}  "
                    f"skipped {s.frames_skipped}  p99 {_fmt(total and total.p99)} ms"
                )
    if not result:
        result.update(healthy=False, failure={"stage": "server", "error": "no summary"})
    return result


@app.command()
def status(
    control: Annotated[str, typer.Option(help="the server's control endpoint")] = (
        "tcp://127.0.0.1:5557"
    ),
    keys: Annotated[Path | None, typer.Option(help="CURVE key folder (client keys)")] = None,
    stop: Annotated[bool, typer.Option(help="ask the server to finish and exit")] = False,
    swap: Annotated[
        list[str] | None,
        typer.Option(
            metavar="ENGINE",
            help="hot-swap the engine of the running server: an engine name or package folder "
            "(repeat to chain). It is loaded, verified and warmed up in the background, then "
            "serves from the next frame on; no frame is lost. Refused if its scale or output "
            "dtype differs from the engine serving",
        ),
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(help="with --swap: the new engine's backend (default: the one in force)"),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="with --swap: inference threads (default: those in force)"),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            help="with --swap: wait until the swap is done or failed (--no-wait: return once "
            "the server accepted it; `scopecast status` then shows its state)"
        ),
    ] = True,
    timeout: Annotated[
        float, typer.Option(min=0, help="with --swap: seconds to wait for the swap to end")
    ] = 120.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the status (with --swap: the swap) as JSON")
    ] = False,
) -> None:
    """Ask a running engine server for its counters, latencies, engine and queue depths; with
    --stop, stop it; with --swap ENGINE, replace its engine without stopping it.

    A swap prints the engine now serving (name@version:sha), how long loading, verifying and
    warming up took, and after how many enhanced frames it took over. The index and the
    enhanced OME-TIFF (kept under the first engine's name) say which engine made each frame.

    Exit codes: 0 the status, or the swap done (accepted, with --no-wait); 1 --timeout passed
    while the swap was still loading (it goes on: `scopecast status` shows how it ends); 2 an
    expected mistake, or a swap refused or failed (one red line saying why; the engine before
    keeps serving).
    """
    from .control import status as ask_status
    from .control import stop as ask_stop
    from .security import curve_or_none

    curve = curve_or_none(keys)
    if swap:
        if stop:
            raise typer.BadParameter("give --swap or --stop, not both")
        _swap(control, swap, backend, threads, curve, wait=wait, timeout=timeout, as_json=as_json)
        return
    for name, value in (("--backend", backend), ("--threads", threads)):
        if value is not None:
            raise typer.BadParameter(f"{name} goes with --swap ENGINE")
    ask = ask_stop if stop else ask_status
    reply = ask(control, curve=curve, timeout_s=600.0 if stop else 2.0)
    if as_json:
        print(json.dumps(reply.model_dump(mode="json")), flush=True)
    else:
        _print_summary("server", _brief(reply))


def _swap(
    control: str,
    engines: list[str],
    backend: str | None,
    threads: int | None,
    curve: Any,
    *,
    wait: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """``status --swap``: ask for the swap, then (unless not ``wait``) follow it to its end."""
    from .control import ControlError, wait_swap
    from .control import swap as ask_swap

    name = "+".join(engines)
    number = ask_swap(control, engines, backend=backend, threads=threads, curve=curve)
    if not wait:
        if as_json:
            print(json.dumps({"swap": "loading", "number": number, "engine": name}), flush=True)
        else:
            out.print(f"swap {number} to {name}: loading (`scopecast status` follows it)")
        return
    spinner = err.status(f"swap {number} to {name}: loading") if err.is_terminal else None

    def show(i: SwapInfo) -> None:
        if spinner is not None:
            spinner.update(f"swap {number} to {name}: {i.state}")

    with spinner or ExitStack():
        info = wait_swap(control, number, timeout_s=timeout, curve=curve, on_state=show)
    if as_json:
        print(json.dumps(info.model_dump(mode="json")), flush=True)
    if info.state == "failed":
        raise ControlError(info.error or f"swap {number} to {name} failed")
    if info.state != "done":
        _warning(
            f"swap {number} to {name} still {info.state} after {timeout:g} s; it goes on: "
            "`scopecast status` shows how it ends"
        )
        raise typer.Exit(1)
    if not as_json:
        shapes = ", ".join("x".join(map(str, s)) for s in info.warmup_shapes) or "-"
        out.print(
            f"swapped {info.previous} -> [bold]{info.engine_id}[/bold] ({info.backend}): "
            f"loaded, verified and warmed up on {shapes} in {info.load_s or 0:.2f} s; took over "
            f"after {info.switched_after} frames enhanced, between two frames",
            highlight=False,
        )


@app.command()
def view(
    publish: Annotated[str, typer.Option(help="the engine server's PUB endpoint")] = (
        "tcp://127.0.0.1:5556"
    ),
    control: Annotated[
        str, typer.Option(help="the server's control endpoint, polled for numbers; 'none'")
    ] = "tcp://127.0.0.1:5557",
    host: Annotated[
        str, typer.Option(help="interface to serve the page on; off loopback a token is required")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="web port (0: any free one)")] = 8765,
    token: Annotated[
        str | None,
        typer.Option(help="token browsers must present (?token=); generated off loopback"),
    ] = None,
    keys: Annotated[
        Path | None, typer.Option(help="CURVE key folder (client keys) for a remote server")
    ] = None,
) -> None:
    """Serve the live viewer: raw and enhanced side by side in a browser, with fps, latency,
    skipped frames, fidelity, engine and backend. Prints the URL to open; Ctrl-C stops."""
    from .viewer import ViewerConfig, serve

    def ready(url: str) -> None:
        print(url, flush=True)
        err.print(f"live viewer of {publish}: open {url}   Ctrl-C stops", highlight=False)

    config = ViewerConfig(
        publish=publish,
        control=None if control == "none" else control,
        host=host,
        port=port,
        token=token,
        keys=keys,
    )
    serve(config, on_ready=ready)


@app.command()
def keys(
    directory: Annotated[Path, typer.Argument(help="folder to create the key pairs in")],
) -> None:
    """Create CURVE keys: the server uses server.key_secret, clients client.key_secret."""
    from .security import generate_keys

    files = generate_keys(directory)
    for f in files:
        out.print(str(f), highlight=False)
    err.print(
        f"serve with `scopecast serve --keys {directory} --listen tcp://0.0.0.0:5555`; give "
        "clients the folder without server.key_secret",
        highlight=False,
    )


@app.command()
def recover(
    file: Annotated[Path, typer.Argument(help="an OME-TIFF a crashed server left behind")],
    index: Annotated[
        Path | None, typer.Option(help="the run's index.jsonl (default: beside the file)")
    ] = None,
) -> None:
    """Rebuild a readable OME-TIFF from a file left by a crash; the original is kept."""
    from .sinks.recover import recover as rebuild

    r = rebuild(file, index=index)
    skipped = [
        f"{r.bad_crc} with a bad checksum" if r.bad_crc else "",
        f"{r.missing} cut off at the end of the file" if r.missing else "",
        f"{r.damaged} damaged index lines" if r.damaged else "",
    ]
    notes = [
        ("skipped " + ", ".join(s for s in skipped if s)) if any(skipped) else "",
        f"{r.unindexed} planes without an index line taken from the file's pages"
        if r.unindexed
        else "",
    ]
    out.print(
        f"{r.output}: {r.planes} planes recovered" + "".join(f"; {n}" for n in notes if n),
        highlight=False,
        markup=False,
        soft_wrap=True,
    )
    if r.bad_crc:
        raise typer.Exit(1)


@app.command()
def demo(
    preset: Annotated[str, typer.Option(help="simulated microscope preset")] = "confocal-20fps",
    duration: Annotated[float, typer.Option(help="seconds of acquisition")] = 5.0,
    engine: Annotated[
        list[str] | None,
        typer.Option(help="engine(s) to run, chained in order (default: the preset's)"),
    ] = None,
    mode: Annotated[str, typer.Option(help="server mode: live or complete")] = "live",
    out_dir: Annotated[
        Path, typer.Option("--out", help="folder for runs; the demo writes a new run in it")
    ] = Path("scopecast-runs"),
    seed: Annotated[int, typer.Option(help="simulated specimen and noise seed")] = 0,
    view: Annotated[
        bool, typer.Option(help="also run the live viewer (`scopecast view`) and print its URL")
    ] = False,
    view_port: Annotated[int, typer.Option(help="the viewer's web port (0: any free one)")] = 8765,
    profile: Annotated[
        str | None,
        typer.Option(
            help="calibration profile for the server (units, live fidelity check): 'preset' "
            "(the simulated rig's own, saved under OUT/profiles/PRESET) or a profile folder"
        ),
    ] = None,
    formats: Annotated[
        list[str] | None,
        typer.Option(
            "--format",
            help=f"file format of raw and enhanced frames: {', '.join(SINKS)} (default "
            f"{DEFAULT_SINK}); repeat to write several at once",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Simulated microscope -> hook -> engine server (another process) -> OME-TIFF + PUB.

    The whole system on the embedded default: a real pymmcore-plus MDA, real ZeroMQ sockets,
    the shipped engine, files you can open in Fiji. The server's endpoints are printed at the
    start (`scopecast status --control ...` reaches it while the demo runs).

    Exit codes: 0 every frame acquired, handed over and received; 1 frames missing (a warning
    line says where); 2 an expected mistake (one red line); 3 the engine server died.
    """
    from engines.package import find_package

    from . import acquire as acq

    endpoints: dict[str, str] = {}
    with ExitStack() as stack:
        if duration <= 0:
            raise acq.SetupError(f"--duration {duration} must be > 0")
        if mode not in ("live", "complete"):
            raise acq.SetupError(f"--mode {mode!r} must be live or complete")
        scope = acq.simulated(preset, seed)
        seq = scope.preset.sequence(duration)
        engines = engine or [scope.preset.engine]
        for name in engines:  # before starting anything: an unknown engine is one line
            find_package(name)
        profile_dir = _demo_profile(profile, scope.preset, out_dir)
        sink = _formats(formats)

        def status_line(hook: Any, s: ServerStatus | None) -> str:
            if s is None:
                return f"sent {hook.frames_sent}"
            total = s.latency_ms.get("total")
            p99 = total.p99 if total is not None else None
            return (
                f"enhanced {s.frames_enhanced}  skipped {s.frames_skipped}  "
                f"not handed over {hook.frames_not_handed_over}  p99 {_fmt(p99)} ms"
            )

        def started(ready: dict[str, str]) -> None:
            """Once the server is ready: say where it listens; start the viewer (--view)."""
            endpoints.update(ready)
            err.print(
                f"engine server: frames in {ready['listen']}  publish {ready['publish']}  "
                f"control {ready['control']}",
                highlight=False, soft_wrap=True,
            )  # fmt: skip
            if not view:
                return
            from .viewer import ViewerProcess

            viewer = stack.enter_context(
                ViewerProcess(ready["publish"], ready["control"], port=view_port)
            )
            err.print(f"live viewer: open {viewer.url}", highlight=False)

        with _progress() as bar:
            task = bar.add_task(f"{preset} -> {'+'.join(engines)}", total=sum(1 for _ in seq),
                                status="starting the server")  # fmt: skip
            try:
                sent, server = acq.run_with_server(
                    scope.core,
                    seq,
                    engines=engines,
                    out_dir=out_dir,
                    mode=mode,
                    stream="demo",
                    on_progress=lambda h, s: bar.update(
                        task, completed=h.frames_seen, status=status_line(h, s)
                    ),
                    on_started=started,
                    profile=profile_dir,
                    sink=sink,
                )
            except acq.ServerFailed as e:
                bar.stop()
                _error(str(e))
                raise typer.Exit(3) from None
    if not isinstance(server, ServerStatus):  # a server that died before it had a status
        _exit_if_unhealthy("engine server", server)
        raise typer.Exit(3)  # not reached: such a summary is never healthy
    hook_ms = sent["hook_ms"]
    result = {
        "preset": preset,
        "engine": server.engine.engine,
        "backend": _backend(server),
        "mode": mode,
        "healthy": server.healthy,
        "failure": None if server.failure is None else server.failure.model_dump(mode="json"),
        "endpoints": endpoints,
        "frames_acquired": sent["frames_seen"],
        "frames_enhanced": server.frames_enhanced,
        "frames_skipped": server.frames_skipped,
        "frames_not_handed_over": sent["frames_not_handed_over"],
        "frames_received": server.frames_received,
        "frames_written": server.frames_written.model_dump(mode="json"),
        "errors": {**server.engine_errors, **server.disk_errors.seen()},
        "acquired_fps": sent["fps"],
        "latency_ms": {
            "hook": {"p50": hook_ms["p50"], "p99": hook_ms["p99"]},
            **{k: {"p50": v.p50, "p99": v.p99} for k, v in server.latency_ms.items()},
        },
        "files": server.files,
    }
    if profile_dir is not None:
        result["fidelity"] = {
            "profile": str(profile_dir),
            "frames_checked": server.frames_checked,
            "fidelity_every": server.fidelity_every,
            "frames_flagged": server.frames_flagged,
            "mismatch": server.fidelity_mismatch,
        }
    if as_json:
        print(json.dumps(result), flush=True)
    else:
        _print_summary("demo", result)
    _exit_if_unhealthy("engine server", server)
    problems = acq.delivery_problems(sent, endpoints.get("listen", "the server"))
    if sent["frames_seen"] < sent["frames_expected"]:
        problems.append(
            f"the acquisition delivered {sent['frames_seen']} of {sent['frames_expected']} "
            "planned frames"
        )
    if server.frames_received < sent["frames_sent"]:
        problems.append(
            f"the server received {server.frames_received} of the {sent['frames_sent']} "
            "frames handed over"
        )
    if problems:
        _warning("; ".join(problems))
        raise typer.Exit(1)


def _demo_profile(profile: str | None, preset: Any, out_dir: Path) -> Path | None:
    """The profile folder ``demo --profile`` names: 'preset' writes the simulated rig's own
    (its first channel's optics) under OUT/profiles/PRESET; anything else is a folder."""
    if profile is None:
        return None
    if profile != "preset":
        return Path(profile)
    from calibration.sim.pairs import PairRig
    from calibration.sim.rigs import rig_profile

    folder = out_dir / "profiles" / preset.name
    rig_profile(preset.name, PairRig(preset).fast, None, preset.pixel_size_um).save(folder)
    return folder


def _backend(status: ServerStatus | dict[str, Any]) -> str:
    """'onnxruntime cpu' for each engine of the chain, from a server's status (or its JSON)."""
    s = ServerStatus.model_validate(status)
    return ", ".join(f"{b.name} {b.device}" for b in s.engine.backend)


def _brief(status: ServerStatus | dict[str, Any]) -> dict[str, Any]:
    """The server summary without the bulky parts, for a terminal table."""
    s = ServerStatus.model_validate(status)
    skip = {"engine", "rings", "frames_received_by_stream"}
    return {"engine": s.engine.engine, "backend": _backend(s),
            **s.model_dump(mode="json", exclude=skip)}  # fmt: skip


def _print_summary(title: str, summary: dict[str, Any]) -> None:
    """A two-column table; lists (files) follow it in full, so paths can be copied."""
    table = Table(title=title, show_header=False)
    lists = {k: v for k, v in summary.items() if isinstance(v, list)}
    for key, value in summary.items():
        if key in lists:
            continue
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            for sub, v in value.items():
                table.add_row(f"{key} {sub}", _fmt(v))
        else:
            table.add_row(key, _fmt(value))
    out.print(table)
    for key, values in lists.items():
        out.print(f"{key}:" + ("".join(f"\n  {v}" for v in values) or " -"), highlight=False,
                  soft_wrap=True)  # fmt: skip


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "  ".join(f"{k} {_fmt(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return "\n".join(map(str, value)) or "-"
    return "-" if value is None else str(value)


#: where `scopecast --help` lists the commands other packages mount (typer lists single commands
#: before groups); entry points not named here follow, by name
HELP_ORDER = ("train", "export", "adapt", "build", "synthesize", "engines", "calibrate", "bench")


def _add_groups() -> None:
    """Mount every package's commands: each entry of the ``scopecast.commands`` entry-point
    group is a typer app (a command group: engines, calibrate, bench) or a function (one
    command: train, export, build), mounted under the entry's name."""
    found = entry_points(group="scopecast.commands")
    rank = {name: i for i, name in enumerate(HELP_ORDER)}
    for ep in sorted(found, key=lambda ep: (rank.get(ep.name, len(rank)), ep.name)):
        try:
            commands = ep.load()
            if isinstance(commands, typer.Typer):
                app.add_typer(commands, name=ep.name)
            else:
                app.command(ep.name)(commands)
        except Exception as e:  # noqa: BLE001 (a broken plugin must not break the core commands)
            err.print(f"[yellow]warning:[/yellow] command group {ep.name!r} not loaded: {e}")


def main() -> None:
    """The ``scopecast`` command: a user's mistake in any command is one red ``error:`` line
    and exit code 2 (:func:`stream.console.run_app`)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # importing pymmcore-plus sets the root logger to DEBUG; keep our handler at WARNING anyway
    logging.getLogger().handlers[0].setLevel(logging.WARNING)
    _add_groups()
    run_app(app, prog_name="scopecast")
