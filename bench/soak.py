"""Hours of frames through a real engine server: does memory stay flat and latency steady?

``scopecast bench soak --duration 3600 --fps 20 --size 512 --streams 4 --keys 1`` starts
``scopecast serve`` (identity engine and live mode unless told otherwise) in another process and
pushes pre-rendered uint16 frames through one real :class:`~stream.hook.FrameHook` per stream
(its own stream id), each at ``fps`` (so the server sees ``streams x fps`` frames a second),
cycling over ``keys`` positions per stream. Every ``poll_s`` it asks the server's ``status`` and
records RSS, per-stage latency p50/p99 (the server's recent-sample percentiles), frames
received / written / enhanced / skipped, queue depths and ring keys/bytes.

RSS drift = (RSS at the end - RSS after the warm-up) / RSS after the warm-up, in percent; the
warm-up is the first ``warmup_fraction`` of the run (files opened, buffers and caches grown).
Disk: the server writes every raw frame and its enhanced frame; at 512x512 x 80 fps that is
about 80 MB/s, so the run folder is temporary unless ``runs`` is given.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import useq
from rich.table import Table

from stream.control import ControlError
from stream.hook import FrameHook
from stream.status import ServerStatus

from .fuzz import ServerProcess
from .report import fmt
from .sources import StaticSource

#: Stages shown in the table and the latency plot (those the identity engine has, and more).
STAGES = ("transport", "queue", "inference", "publish", "disk", "total")
MODES = ("live", "complete")


class _Events:
    """The events one stream's :class:`StaticSource` plays: ``t`` outer, ``p`` inner, ``n``
    in all, ending early once ``stop`` is set (a dead server ends the run, not the clock)."""

    def __init__(self, n: int, keys: int, stop: threading.Event) -> None:
        self.n, self.keys, self.stop = n, keys, stop
        self.uid = uuid.uuid4()
        self.sizes = {"t": math.ceil(n / keys), "p": keys}

    def __iter__(self) -> Iterator[useq.MDAEvent]:
        for i in range(self.n):
            if self.stop.is_set():
                return
            yield useq.MDAEvent(index={"t": i // self.keys, "p": i % self.keys})


def _check(duration_s: float, fps: float, size: int, streams: int, keys: int, mode: str,
           poll_s: float, warmup_fraction: float) -> None:  # fmt: skip
    if not duration_s > 0 or not fps > 0 or not poll_s > 0:
        raise ValueError(f"--duration {duration_s:g}, --fps {fps:g} and --poll {poll_s:g} must "
                         "be > 0")  # fmt: skip
    if not 8 <= size <= 8192:
        raise ValueError(f"--size {size} must be 8..8192 pixels")
    if not 1 <= streams <= 64 or not 1 <= keys <= 4096:
        raise ValueError(f"--streams {streams} must be 1..64 and --keys {keys} 1..4096")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}")
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"--warmup {warmup_fraction:g} must be a fraction in [0, 1)")


def disk_estimate_bytes(duration_s: float, fps: float, size: int, streams: int) -> int:
    """Bytes the server writes: raw and an enhanced frame of the same size (scale 1)."""
    return int(duration_s * fps * streams * size * size * 2 * 2)


def run_soak(
    *,
    duration_s: float = 3600.0,
    fps: float = 20.0,
    size: int = 512,
    streams: int = 4,
    keys: int = 1,
    engines: Sequence[str] = ("identity",),
    backend: str = "auto",
    mode: str = "live",
    poll_s: float = 5.0,
    warmup_fraction: float = 0.1,
    rss_drift_goal: float = 5.0,
    runs: Path | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the soak; the result with its ``timeline`` (one sample per poll) and summary."""
    _check(duration_s, fps, size, streams, keys, mode, poll_s, warmup_fraction)
    say = progress or (lambda message: None)
    with tempfile.TemporaryDirectory(prefix="scopecast-soak-") as tmp:
        base = Path(runs) if runs is not None else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        need = disk_estimate_bytes(duration_s, fps, size, streams)
        free = shutil.disk_usage(base).free
        if need > 0.9 * free:
            raise ValueError(
                f"the server would write about {need / 1e9:.1f} GB into {base}, which has "
                f"{free / 1e9:.1f} GB free: pass --runs on a bigger disk, or lower --duration, "
                "--fps, --size or --streams"
            )
        args = [a for e in engines for a in ("--engine", str(e))]
        server = ServerProcess(base, *args, "--mode", mode, "--backend", backend, "--quiet")
        try:
            result = _soak(server, duration_s=duration_s, fps=fps, size=size, streams=streams,
                           keys=keys, poll_s=poll_s, seed=seed, say=say)  # fmt: skip
        finally:
            server.kill()
    result.update(
        kind="soak", duration_s=duration_s, fps=fps, size=size, streams=streams, keys=keys,
        engines=list(engines), backend_requested=backend, mode=mode, poll_s=poll_s,
        warmup_fraction=warmup_fraction, disk_estimate_gb=need / 1e9,
    )  # fmt: skip
    result["rss"] = rss_drift(result["timeline"], duration_s * warmup_fraction, rss_drift_goal,
                              result.get("summary") or {})  # fmt: skip
    summary = result.get("summary") or {}
    result["ok"] = (
        bool(summary.get("healthy")) and bool(result["rss"]["met"]) and not result["problems"]
    )
    return result


def start_streams(
    listen: str, *, streams: int, fps: float, size: int, duration_s: float, keys: int = 1,
    seed: int = 0, stop: threading.Event, prefix: str = "soak",
) -> tuple[list[FrameHook], list[threading.Thread]]:  # fmt: skip
    """``streams`` simulated acquisitions into the server at ``listen``, each its own
    :class:`FrameHook` (stream id ``PREFIX0``, ``PREFIX1``, ...) sending one pre-rendered
    Poisson uint16 frame of ``size`` x ``size`` at ``fps`` for ``duration_s`` (cycling over
    ``keys`` positions) from its own thread, until ``stop`` is set. The caller joins the
    threads and closes the hooks."""
    rng = np.random.default_rng(seed)
    n = max(1, round(duration_s * fps))
    hooks: list[FrameHook] = []
    senders: list[threading.Thread] = []
    try:
        for s in range(streams):
            hook = FrameHook(listen, stream=f"{prefix}{s}", hwm=64, on_finished=lambda _: None)
            hooks.append(hook)
            hook.wait_for_receiver(20)
    except BaseException:
        for hook in hooks:
            hook.close()
        raise
    for hook in hooks:
        frame = rng.poisson(200.0, (size, size)).astype(np.uint16)
        senders.append(StaticSource(frame, fps).run_mda(_Events(n, keys, stop), [hook]))
    return hooks, senders


def _soak(
    server: ServerProcess, *, duration_s: float, fps: float, size: int, streams: int, keys: int,
    poll_s: float, seed: int, say: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    stop = threading.Event()
    hooks, senders = start_streams(
        server.listen, streams=streams, fps=fps, size=size, duration_s=duration_s, keys=keys,
        seed=seed, stop=stop,
    )  # fmt: skip
    t0 = time.monotonic()
    timeline: list[dict[str, Any]] = [_sample(0.0, server.status(), hooks)]
    problems: list[str] = []
    said, polls = 0.0, 0
    try:
        while any(t.is_alive() for t in senders):
            polls += 1
            next_poll = t0 + polls * poll_s
            while time.monotonic() < next_poll and any(t.is_alive() for t in senders):
                time.sleep(min(0.2, max(0.0, next_poll - time.monotonic())))
            if not any(t.is_alive() for t in senders):
                break
            try:
                status = server.status(timeout_s=max(5.0, poll_s))
            except ControlError as e:
                if not server.alive:
                    problems.append(f"the server exited after {time.monotonic() - t0:.0f} s")
                    stop.set()
                    break
                problems.append(f"no status at {time.monotonic() - t0:.0f} s: {e}")
                continue
            timeline.append(_sample(time.monotonic() - t0, status, hooks))
            if not status.healthy:
                problems.append(f"stage died: {status.failure}")
                stop.set()
                break
            if time.monotonic() - said >= max(poll_s, min(60.0, duration_s / 20)):
                said = time.monotonic()
                x = timeline[-1]
                p99 = (x["latency_ms"].get("total") or {}).get("p99")
                say(f"{x['t_s']:.0f}/{duration_s:g} s: RSS {fmt(x['rss_mb'])} MB, received "
                    f"{x['frames_received']}, enhanced {x['frames_enhanced']}, skipped "
                    f"{x['frames_skipped']}, total p99 {fmt(p99)} ms")  # fmt: skip
    finally:
        stop.set()
        for t in senders:
            t.join()
    elapsed = time.monotonic() - t0
    try:
        last = server.status(timeout_s=10)
        timeline.append(_sample(time.monotonic() - t0, last, hooks))
    except ControlError:
        pass
    for hook in hooks:
        hook.close()
    sent = {h.stream: h.stats.frames_sent for h in hooks}
    not_handed_over = sum(h.stats.frames_not_handed_over for h in hooks)
    say(f"sent {sum(sent.values())} frames in {elapsed:.0f} s; stopping the server")
    summary: ServerStatus | None
    try:
        summary = server.stop(sent, timeout_s=600)
    except ControlError as e:
        problems.append(str(e))
        summary = None
    received = summary.frames_received if summary else None
    if received is not None and received != sum(sent.values()):
        problems.append(f"the server received {received} of {sum(sent.values())} frames sent")
    written = summary.frames_written.raw if summary else None
    if written is not None and received is not None and written != received:
        problems.append(f"raw frames written: {written} of {received} received")
    got = summary.model_dump(mode="json") if summary else {}
    return {
        "timeline": timeline,
        "elapsed_s": elapsed,
        "frames": {
            "sent": sum(sent.values()),
            "sent_by_stream": sent,
            "not_handed_over": not_handed_over,
            "received": received,
            "written_raw": written,
            "written_enhanced": summary.frames_written.enhanced if summary else None,
            "enhanced": got.get("frames_enhanced"),
            "skipped": got.get("frames_skipped"),
            "fps_received": received / elapsed if received and elapsed > 0 else None,
        },
        "latency_ms": got.get("latency_ms", {}),
        "rings": got.get("rings", {}),
        "healthy": got.get("healthy"),
        "failure": got.get("failure"),
        "stage_errors": got.get("stage_errors", {}),
        "engine_errors": got.get("engine_errors", {}),
        "disk_errors": got.get("disk_errors", {}),
        "engine": summary.engine.engine if summary else None,
        "summary": {k: got.get(k) for k in ("healthy", "rss_mb", "cpu_s", "uptime_s")},
        "problems": problems,
    }


def _sample(t_s: float, status: ServerStatus, hooks: list[FrameHook]) -> dict[str, Any]:
    """One point of the timeline from one ``status`` answer."""
    return {
        "t_s": round(t_s, 3),
        "rss_mb": status.rss_mb,
        "cpu_s": status.cpu_s,
        "frames_sent": sum(h.stats.frames_sent for h in hooks),
        "frames_received": status.frames_received,
        "frames_written": status.frames_written.model_dump(),
        "frames_enhanced": status.frames_enhanced,
        "frames_skipped": status.frames_skipped,
        "queues": status.queues.model_dump(),
        "rings": {"keys": status.rings.keys, "bytes": status.rings.bytes},
        "latency_ms": {
            stage: {"p50": v.p50, "p99": v.p99} for stage, v in status.latency_ms.items()
        },
    }


def rss_drift(
    timeline: list[dict[str, Any]], warmup_s: float, goal_percent: float, summary: dict[str, Any]
) -> dict[str, Any]:
    """RSS after the warm-up and at the end, the drift in percent, and the growth rate after
    the warm-up (least squares, MB per hour) to extrapolate a longer run."""
    points = [(x["t_s"], x["rss_mb"]) for x in timeline if x.get("rss_mb") is not None]
    after = [(t, r) for t, r in points if t >= warmup_s] or points[-1:]
    if not after:
        return {"warm_mb": None, "end_mb": None, "max_mb": None, "drift_percent": None,
                "slope_mb_per_h": None, "goal_percent": goal_percent, "met": False}  # fmt: skip
    warm, end = after[0][1], after[-1][1]
    slope = None
    if len(after) >= 3 and after[-1][0] > after[0][0]:
        t, r = np.array(after, dtype=float).T
        slope = float(np.polyfit(t, r, 1)[0] * 3600)
    drift = (end - warm) / warm * 100 if warm else None
    return {
        "warmup_s": warmup_s,
        "warm_t_s": after[0][0],
        "warm_mb": warm,
        "end_mb": end,
        "max_mb": max(r for _, r in points),
        "final_mb": summary.get("rss_mb"),
        "drift_percent": drift,
        "slope_mb_per_h": slope,
        "goal_percent": goal_percent,
        "met": drift is not None and drift <= goal_percent,
    }


def soak_table(result: dict[str, Any]) -> Table:
    r, f = result["rss"], result["frames"]
    table = Table("what", "value", title=f"soak: {result['streams']} streams x "
                  f"{result['fps']:g} fps, {result['size']}x{result['size']}, {result['keys']} "
                  f"key(s) each, engine {result.get('engine')}, {result['mode']}, "
                  f"{result['elapsed_s']:.0f} s")  # fmt: skip
    verdict = "met" if r["met"] else "MISSED"
    table.add_row("RSS MB", f"{fmt(r['warm_mb'])} after warm-up ({fmt(r.get('warm_t_s'))} s) -> "
                  f"{fmt(r['end_mb'])} at the end, max {fmt(r['max_mb'])}")  # fmt: skip
    table.add_row("RSS drift", f"{fmt(r['drift_percent'])}% (goal <= {r['goal_percent']:g}%: "
                  f"{verdict}); slope {fmt(r['slope_mb_per_h'])} MB/h")  # fmt: skip
    table.add_row("frames", f"sent {f['sent']}, not handed over {f['not_handed_over']}, received "
                  f"{f['received']}, written {f['written_raw']} raw / {f['written_enhanced']} "
                  f"enhanced, enhanced {f['enhanced']}, skipped {f['skipped']}")  # fmt: skip
    table.add_row("rate", f"{fmt(f['fps_received'])} frames/s received")
    for stage in STAGES:
        p = result["latency_ms"].get(stage)
        if p:
            table.add_row(f"{stage} ms", f"p50 {fmt(p.get('p50'))}, p99 {fmt(p.get('p99'))}, "
                          f"max {fmt(p.get('max'))}")  # fmt: skip
    rings = result.get("rings") or {}
    table.add_row("rings", f"{rings.get('keys')} keys, {fmt((rings.get('bytes') or 0) / 2**20)} MB")
    table.add_row("health", f"healthy {result['healthy']}, failure {result['failure'] or '-'}, "
                  f"stage errors {result['stage_errors'] or 0}, engine errors "
                  f"{result['engine_errors'] or 0}, disk errors "
                  f"{result['disk_errors'] or 0}")  # fmt: skip
    for p in result["problems"]:
        table.add_row("problem", p)
    return table


def plot_soak(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """``soak.png``: server RSS over time (warm-up point marked), and latency p50/p99 per stage
    over time."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timeline = result["timeline"]
    t = np.array([x["t_s"] for x in timeline], dtype=float)
    fig, (ax_rss, ax_lat) = plt.subplots(2, 1, figsize=(10, 8), sharex=True,
                                         constrained_layout=True)  # fmt: skip
    rss = np.array([np.nan if x["rss_mb"] is None else x["rss_mb"] for x in timeline], float)
    ax_rss.plot(t, rss, "-o", markersize=3, label="server RSS")
    r = result["rss"]
    if r.get("warm_mb") is not None:
        ax_rss.axvline(r["warmup_s"], color="gray", linestyle=":", label="end of warm-up")
        goal = r["goal_percent"]
        ax_rss.axhline(r["warm_mb"] * (1 + goal / 100), color="tab:red", linestyle="--",
                       linewidth=0.8, label=f"goal +{goal:g}%")  # fmt: skip
    ax_rss.set_ylabel("RSS (MB)")
    drift = r.get("drift_percent")
    what = f"{result['streams']} x {result['fps']:g} fps, {result['size']}px"
    ax_rss.set_title(
        f"RSS drift {'-' if drift is None else f'{drift:+.2f}'}% after warm-up ({what})"
    )
    ax_rss.legend(fontsize=8)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, stage in enumerate(STAGES):
        for q, style in (("p50", "-"), ("p99", "--")):
            values = [(x["latency_ms"].get(stage) or {}).get(q) for x in timeline]
            y = np.array([np.nan if v is None else v for v in values], float)
            if np.isfinite(y).any():
                ax_lat.plot(t, y, style, color=colors[i % len(colors)], label=f"{stage} {q}")
    ax_lat.set_yscale("log")
    ax_lat.set_xlabel("time since the first frame (s)")
    ax_lat.set_ylabel("ms (server's recent samples)")
    ax_lat.legend(fontsize=7, ncol=3)
    path = out_dir / "soak.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
