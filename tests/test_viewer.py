"""The live viewer: latest-frame-wins, tokens, a fake server that restarts, and the real page in
headless Chromium during a real `scopecast demo --view`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.asyncio
from typer.testing import CliRunner

from engines.runtime.openvino import auto_here
from stream.acquire import free_endpoint
from stream.cli import app
from stream.protocol import PublishedHeader, encode_published
from stream.ring import RESET_REASONS
from stream.viewer.access import check_request, is_loopback_host, token_for
from stream.viewer.latest import LatestFrames, PaneSlots, encode_frame

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(
    os.environ.get("SCOPECAST_TEST_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts")
)


def header(
    seq: int, kind: str = "raw", p: int = 0, shape: tuple[int, ...] = (8, 8)
) -> PublishedHeader:
    return PublishedHeader(
        stream="s", seq=seq, index={"t": seq, "p": p}, shape=shape, dtype="uint16",
        mono_ns=time.monotonic_ns(), wall_time=time.time(), kind=kind,
        engine="gaussian" if kind == "enhanced" else None, timings_ms={"inference": 1.5},
    )  # fmt: skip


def pixels(seq: int, shape: tuple[int, ...] = (8, 8)) -> np.ndarray:
    return np.full(shape, seq, dtype=np.uint16)


# -- latest-frame-wins --------------------------------------------------------------------------


def test_a_slow_browser_gets_the_newest_frame_never_a_backlog() -> None:
    latest, slots = LatestFrames(), PaneSlots()
    latest.put(header(0), pixels(0))
    assert slots.due(latest) == []  # nothing selected yet
    slots.select("s/p0/c0/z0")
    (first,) = slots.due(latest)
    assert first.header.seq == 0
    for seq in range(1, 10):  # the browser has not acknowledged frame 0 yet
        latest.put(header(seq), pixels(seq))
        assert slots.due(latest) == []
    slots.ack("raw")
    (newest,) = slots.due(latest)
    assert newest.header.seq == 9 and newest.pixels[0, 0] == 9
    assert slots.not_shown["raw"] == 8
    slots.ack("raw")
    assert slots.due(latest) == []  # nothing new: nothing sent twice


def test_panes_are_independent_and_a_new_selection_is_due_at_once() -> None:
    latest, slots = LatestFrames(), PaneSlots(key="s/p0/c0/z0")
    latest.put(header(0), pixels(0))
    assert [f.header.kind for f in slots.due(latest)] == ["raw"]
    latest.put(header(0, "enhanced", shape=(16, 16)), pixels(0, (16, 16)))
    latest.put(header(1), pixels(1))
    (enh,) = slots.due(latest)  # raw is still in flight; enhanced is not held up by it
    assert enh.header.kind == "enhanced" and enh.pixels.shape == (16, 16)
    latest.put(header(5, p=1), pixels(5))
    slots.select("s/p1/c0/z0")
    slots.ack("raw")
    (other,) = slots.due(latest)
    assert other.header.key == "s/p1/c0/z0" and slots.not_shown["raw"] == 0


def test_memory_budget_drops_old_unwatched_frames_but_keeps_keys() -> None:
    frame_bytes = pixels(0).nbytes
    latest = LatestFrames(max_bytes=3 * frame_bytes)
    watched = {"s/p0/c0/z0/raw"}
    for p in range(6):
        assert latest.put(header(p, p=p), pixels(p), watched) is True
    assert latest.nbytes <= 3 * frame_bytes
    assert latest.get("s/p0/c0/z0/raw") is not None  # watched: kept though oldest
    assert latest.get("s/p1/c0/z0/raw") is None
    assert latest.get("s/p5/c0/z0/raw") is not None
    assert len(latest.keys) == 6
    assert latest.put(header(6), pixels(6), watched) is False  # a known key


def test_frame_message_layout() -> None:
    h = header(3, "enhanced", shape=(4, 5))
    px = np.arange(20, dtype=np.uint16).reshape(4, 5)
    msg = encode_frame(h, px, n=7)
    length = int.from_bytes(msg[:4], "little")
    assert (4 + length) % 8 == 0  # the browser views the pixels in place
    meta = json.loads(msg[4 : 4 + length])
    assert meta["pane"] == "enhanced" and meta["key"] == "s/p0/c0/z0" and meta["n"] == 7
    assert meta["shape"] == [4, 5] and meta["timings_ms"] == {"inference": 1.5}
    assert np.array_equal(np.frombuffer(msg[4 + length :], "<u2").reshape(4, 5), px)


# -- who may connect ----------------------------------------------------------------------------


def test_a_token_is_required_off_loopback() -> None:
    assert token_for("127.0.0.1", None) is None
    assert token_for("localhost", "my-secret-token") == "my-secret-token"
    generated = token_for("0.0.0.0", None)
    assert generated and len(generated) >= 16 and generated != token_for("0.0.0.0", None)
    with pytest.raises(ValueError, match="too short"):
        token_for("0.0.0.0", "abc")
    assert is_loopback_host("127.0.0.2") and is_loopback_host("[::1]")
    assert not is_loopback_host("192.168.1.5") and not is_loopback_host("scope-pc")


@pytest.mark.parametrize(
    ("token", "given", "host", "origin", "refused"),
    [
        (None, None, "127.0.0.1:8765", None, None),
        (None, None, "localhost:8765", "http://localhost:8765", None),
        (None, None, "evil.example:8765", None, "not loopback"),  # DNS rebinding
        (None, None, "127.0.0.1:8765", "http://evil.example", "origin"),
        ("s3cret-token", None, "scope-pc:8765", None, "token is required"),
        ("s3cret-token", "wrong-token", "scope-pc:8765", None, "token is required"),
        ("s3cret-token", "s3cret-token", "scope-pc:8765", "http://scope-pc:8765", None),
        ("s3cret-token", "s3cret-token", "scope-pc:8765", "http://other:8765", "origin"),
    ],
)
def test_request_checks(token, given, host, origin, refused) -> None:
    why = check_request(token=token, given=given, host_header=host, origin=origin)
    assert (why is None) if refused is None else (refused in why)


def test_view_refuses_bad_options() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = str(taken.getsockname()[1])
    for args, message in [
        (["--host", "0.0.0.0", "--token", "abc"], "too short"),
        (["--publish", "localhost:5556"], "is not tcp://HOST:PORT"),
        (["--port", port], f"cannot serve the viewer on 127.0.0.1:{port}"),
    ]:
        r = CliRunner().invoke(app, ["view", *args])
        assert r.exit_code == 2 and message in r.stderr, r.output
        assert r.exception is None or isinstance(r.exception, SystemExit)
    taken.close()


# -- the viewer against a fake server that goes away and comes back ------------------------------


class FakeServer:
    """The engine server's two outward sockets: PUB (frames) and REP (status)."""

    def __init__(
        self, ctx: zmq.asyncio.Context, publish: str, control: str, failure: dict | None = None,
        frames_flagged: int = 0,
    ) -> None:  # fmt: skip
        self.failure = failure
        self.frames_flagged = frames_flagged
        self.pub = ctx.socket(zmq.PUB)
        self.rep = ctx.socket(zmq.REP)
        for sock, ep in ((self.pub, publish), (self.rep, control)):
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(ep)
        self.answering = asyncio.create_task(self._answer())

    async def _answer(self) -> None:
        while True:
            await self.rep.recv()
            await self.rep.send_json({
                "engine": {"engine": "gaussian", "scale": 1, "window": 1, "reason": ["test"],
                           "backend": [{"name": "onnxruntime", "device": "cpu"}]},
                "mode": "live", "frames_received": 7, "frames_enhanced": 7, "frames_skipped": 0,
                "healthy": self.failure is None, "failure": self.failure,
                "latency_ms": {"total": {"p50": 10.0, "p99": 20.0, "p90": 15.0, "max": 30.0}},
                # the rest of a ServerStatus (stream/status.py), which the viewer validates
                "listen": "tcp://127.0.0.1:5555", "publish": None, "out_dir": "run",
                "uptime_s": 1.0, "rss_mb": None, "cpu_s": 0.5,
                "frames_received_by_stream": {"s": 7}, "frames_missing": 0, "frames_rejected": {},
                "frames_spilled": 0,
                "frames_not_enhanced": 0, "frames_written": {"raw": 7, "enhanced": 7},
                "engine_errors": {}, "disk_errors": {}, "stage_errors": {}, "requests_rejected": 0,
                "published": 14, "viewers": {"connected": 1, "gone": 0},
                "queues": {"engine": 0, "writer": 0}, "files": [],
                "frames_flagged": self.frames_flagged,
                "rings": {"keys": 1, "bytes": 0, "budget_bytes": None,
                          "evicted": {"budget": 0, "idle": 0},
                          "resets": dict.fromkeys(RESET_REASONS, 0)},
            })  # fmt: skip

    async def publish(self, seq: int, kind: str = "raw") -> None:
        await self.pub.send_multipart(encode_published(header(seq, kind), pixels(seq)))

    async def close(self) -> None:
        self.answering.cancel()
        await asyncio.gather(self.answering, return_exceptions=True)
        self.pub.close(0)
        self.rep.close(0)


async def _next(ws, kind: str, timeout_s: float = 5.0, where=lambda m: True):
    """The next message of ``kind`` ('binary', or a JSON type) that satisfies ``where``."""
    import aiohttp

    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = await ws.receive(timeout=left)
        except TimeoutError:
            break
        if msg.type == aiohttp.WSMsgType.BINARY and kind == "binary":
            length = int.from_bytes(msg.data[:4], "little")
            meta = json.loads(msg.data[4 : 4 + length])
            if where(meta):
                return meta
        elif msg.type == aiohttp.WSMsgType.TEXT:
            data = json.loads(msg.data)
            if data["type"] == kind and where(data):
                return data
        elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            break
    raise AssertionError(f"no {kind} message within {timeout_s} s")


def test_viewer_serves_several_browsers_and_survives_a_server_restart() -> None:
    asyncio.run(asyncio.wait_for(_restart_scenario(), 60))


async def _restart_scenario() -> None:
    import aiohttp

    from stream.viewer import Viewer, ViewerConfig

    publish, control = free_endpoint(), free_endpoint()
    ctx = zmq.asyncio.Context()
    server = FakeServer(ctx, publish, control)
    viewer = Viewer(ViewerConfig(publish=publish, control=control, port=0,
                                 token="test-token-123", status_every_s=0.2))  # fmt: skip
    url = await viewer.start()
    assert url.endswith("/?token=test-token-123")
    base = url.split("?")[0]
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.get(base) as r:
                assert r.status == 403  # no token
            async with http.get(url) as r:
                assert r.status == 200 and "scopecast" in await r.text()
            async with http.get(base + "static/viewer.js") as r:
                assert r.status == 200  # the cookie set with the page carries the token
            ws_url = base.replace("http", "ws") + "ws?token=test-token-123"
            a, b = await http.ws_connect(ws_url), await http.ws_connect(ws_url)
            seq = 0
            while not viewer.latest.keys:  # PUB drops what it sends before SUB is connected
                await server.publish(seq)
                seq += 1
                await asyncio.sleep(0.05)
            for ws in (a, b):
                keys = await _next(ws, "keys", where=lambda m: m["keys"])
                assert keys["keys"][0]["key"] == "s/p0/c0/z0"
                await ws.send_json({"select": "s/p0/c0/z0"})
                first = await _next(ws, "binary")
            # b does not acknowledge: a keeps getting frames, b gets nothing until it does
            for _ in range(5):
                seq += 1
                await server.publish(seq)
                await a.send_json({"ack": "raw"})
                got = await _next(a, "binary")
                assert got["seq"] == seq
            await b.send_json({"ack": "raw"})
            newest = await _next(b, "binary")
            assert newest["seq"] == seq and newest["n"] > first["n"] + 1  # newest, not the next
            status = await _next(a, "status", where=lambda m: m["ok"])
            assert status["server"]["engine"] == "gaussian"
            assert status["server"]["backend"] == ["onnxruntime cpu"]
            assert status["viewer"]["browsers"] == 2
            assert status["server"]["latency_ms"]["total"] == {"p50": 10.0, "p99": 20.0}

            await server.close()  # the engine server goes away ...
            down = await _next(a, "status", where=lambda m: not m["ok"])
            assert "server not answering" in down["error"]
            # ... and comes back on the same sockets, with a dead stage (the page says so)
            dead = {"stage": "writer", "error": "OSError: boom"}
            server = FakeServer(ctx, publish, control, failure=dead)
            sick = await _next(a, "status", where=lambda m: m["ok"])
            assert sick["server"]["healthy"] is False and sick["server"]["failure"] == dead
            await a.send_json({"ack": "raw"})
            deadline = time.monotonic() + 10
            while True:
                seq += 1
                await server.publish(seq)
                try:
                    got = await _next(a, "binary", timeout_s=0.3)
                    break
                except AssertionError:
                    assert time.monotonic() < deadline, "no frames after the server restarted"
            assert got["seq"] > newest["seq"]
            await a.close()
            await b.close()
    finally:
        await viewer.stop()
        await server.close()
        ctx.term()


# -- the real page in a real browser -------------------------------------------------------------


def _chromium_or_skip():
    """A headless Chromium driver; skip without Chromium, except in CI where it must exist."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package (extra dev)")
    if missing:
        why = f"{', '.join(missing)} not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must run the browser test: {why}")
        pytest.skip(why)
    profile = tempfile.mkdtemp(prefix="scopecast-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage", "--window-size=1600,860",
                 f"--user-data-dir={profile}"):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(30)
    return driver, profile


def _wait(what: str, check, timeout_s: float = 20.0, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every_s)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


@pytest.mark.slow
def test_demo_view_in_headless_chromium(tmp_path: Path) -> None:
    driver, profile = _chromium_or_skip()
    demo = subprocess.Popen(
        [sys.executable, "-m", "stream", "demo", "--view", "--view-port", "0", "--duration", "12",
         "--engine", "bicubic-x2", "--out", str(tmp_path), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []

    def read_stderr() -> None:
        for line in demo.stderr:
            lines.append(line)

    threading.Thread(target=read_stderr, daemon=True).start()
    try:
        url = _wait("the viewer's URL", lambda: next(
            (m[1] for line in lines if (m := re.search(r"live viewer: open (\S+)", line))), None
        ), timeout_s=60)  # fmt: skip
        driver.get(url)

        def probe() -> dict:
            return driver.execute_script("return window.scopecast.probe()")

        def showing() -> dict | None:
            p = probe()
            return (
                p if all(p[k]["shown"] and p[k]["std"] > 2 for k in ("raw", "enhanced")) else None
            )

        before = _wait("both panes to show a picture", showing)
        # the enhanced pane at its own resolution, the raw one shown at the same size
        assert before["enhanced"]["width"] == 2 * before["raw"]["width"] == 512
        sizes = driver.execute_script(
            "return ['raw', 'enhanced'].map(p => document.getElementById('canvas-' + p)"
            ".getBoundingClientRect().width)"
        )
        assert sizes[0] == sizes[1] > 200

        def updated() -> dict | None:
            p = probe()
            new = all(p[k]["seq"] != before[k]["seq"] and p[k]["hash"] != before[k]["hash"]
                      for k in ("raw", "enhanced"))  # fmt: skip
            return p if new else None

        after = _wait("both panes to update", updated)
        assert after["raw"]["std"] > 2 and after["enhanced"]["std"] > 2

        def text(id_: str) -> str:
            return driver.find_element("id", id_).text.strip()

        _wait("server numbers", lambda: text("st-engine") == "bicubic-x2")
        _wait("stream fps", lambda: (_number(text("st-fps-raw")) or 0) > 1)
        assert (_number(text("st-fps-enhanced")) or 0) > 1
        cpu = "openvino" if auto_here() is None else "onnxruntime"  # what auto takes here
        assert text("st-backend").startswith(cpu)
        assert (_number(text("st-received")) or 0) > 0
        assert _number(text("st-skipped")) is not None
        assert text("st-fidelity") == "- (no profile)"
        rows = driver.execute_script(
            "return [...document.querySelectorAll('#latency tbody tr')]"
            ".map(r => [...r.cells].map(c => c.textContent))"
        )
        stages = {r[0]: r[1:] for r in rows}
        assert {"inference", "total"} <= set(stages)
        assert _number(stages["total"][0]) and _number(stages["total"][1])  # p50, p99
        assert text("conn") == "live"
        # zoom with the wheel on one pane: both panes follow
        driver.execute_script(
            "document.querySelector('#pane-raw .viewport').dispatchEvent(new WheelEvent('wheel',"
            " {deltaY: -300, clientX: 200, clientY: 300, bubbles: true, cancelable: true}))"
        )
        transforms = driver.execute_script(
            "return ['raw', 'enhanced'].map(p => document.getElementById('canvas-' + p)"
            ".style.transform)"
        )
        assert transforms[0] == transforms[1] and "scale(" in transforms[0]
        driver.execute_script("document.getElementById('reset-view').click()")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(ARTIFACTS / "viewer.png"))

        out, _ = demo.communicate(timeout=90)
        assert demo.returncode == 0, "".join(lines)[-2000:]
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["frames_enhanced"] > 0
        # the demo stopped its viewer: the page says so (and keeps retrying)
        _wait("the page to notice the viewer stopped", lambda: "not reachable" in text("conn"))
    finally:
        if demo.poll() is None:
            demo.send_signal(2)  # SIGINT: the demo stops its server and its viewer
            try:
                demo.wait(30)
            except subprocess.TimeoutExpired:
                demo.kill()
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# -- the fidelity scan's flagged regions on the page ---------------------------------------------

BACKGROUND, SPOT = 100, 4000


def _flagged_pair(
    seq: int, scale: int, raw_shape: tuple[int, int], regions: list[dict]
) -> list[tuple[PublishedHeader, np.ndarray]]:
    """A raw frame and its enhanced frame (``scale`` times larger) whose fidelity scan flagged
    ``regions`` (raw px, as the server publishes them). Each region is shown where it is: an
    invented one (sign -1) as a bright block of the enhanced frame over its raw pixel, a removed
    one (+1) as a bright raw pixel; the rest is dark."""
    h, w = raw_shape
    raw = np.full(raw_shape, BACKGROUND, np.uint16)
    enhanced = np.full((h * scale, w * scale), BACKGROUND, np.uint16)
    for g in regions:
        y, x = int(g["y"]), int(g["x"])
        if g["sign"] > 0:
            raw[y, x] = SPOT
        else:
            enhanced[y * scale : (y + 1) * scale, x * scale : (x + 1) * scale] = SPOT
    fidelity = {"chi2": 1.02, "worst_block": 1.4, "noise": 0.99, "flagged": regions}
    enh = header(seq, "enhanced", shape=enhanced.shape).model_copy(
        update={"scale": scale, "fidelity": fidelity}
    )
    return [(header(seq, shape=raw_shape), raw), (enh, enhanced)]


class _LoopThread:
    """An asyncio loop in a thread: the viewer and the fake server run there while the test
    drives the browser."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout_s: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


#: Where the overlay's elements and the panes are on the page (CSS px), and the screen's scale.
LAYOUT_JS = """
const box = (e) => {
  const b = e.getBoundingClientRect();
  return [b.left, b.top, b.width, b.height];
};
const svg = document.getElementById('overlay-enhanced');
const canvas = document.getElementById('canvas-enhanced');
return {
  dpr: devicePixelRatio, seq: svg.dataset.seq, display: getComputedStyle(svg).display,
  raw: box(document.querySelector('#pane-raw .viewport')),
  enhanced: box(document.querySelector('#pane-enhanced .viewport')),
  px: canvas.getBoundingClientRect().width / canvas.width,
  regions: [...svg.querySelectorAll('g.region')].map((g) => ({
    kind: g.classList[1], label: g.querySelector('text').textContent,
    title: g.querySelector('title').textContent, box: box(g.querySelector('circle')),
  })),
};
"""


def _screenshot(driver) -> np.ndarray:
    from PIL import Image  # matplotlib's dependency

    png = driver.get_screenshot_as_png()
    return np.asarray(Image.open(BytesIO(png)).convert("RGB")).astype(np.int32)


def _centroid(shot: np.ndarray, dpr: float, color: str, box) -> tuple[float, float] | None:
    """The centre (CSS px) of the ``color`` pixels inside ``box`` (left, top, width, height);
    grey pixels (the picture) are neither magenta nor cyan."""
    left, top, width, height = (round(v * dpr) for v in box)
    r, g, b = (shot[top : top + height, left : left + width, i] for i in range(3))
    mask = {
        "white": (r > 200) & (g > 200) & (b > 200),
        "magenta": (r > 90) & (b > 90) & (g < 0.4 * np.minimum(r, b)),
        "cyan": (g > 90) & (b > 90) & (r < 0.4 * np.minimum(g, b)),
    }[color]
    if mask.sum() < 4:
        return None
    ys, xs = np.nonzero(mask)
    return (left + xs.mean() + 0.5) / dpr, (top + ys.mean() + 0.5) / dpr


def _grown(box, by: float = 4.0):
    return box[0] - by, box[1] - by, box[2] + 2 * by, box[3] + 2 * by


def _near(a, b, tol: float = 1.5) -> bool:
    return a is not None and b is not None and abs(a[0] - b[0]) < tol and abs(a[1] - b[1]) < tol


def test_fidelity_overlay_in_headless_chromium() -> None:
    """Flagged regions published in the frame's header are outlined on the enhanced pane where
    their structure is in the picture (scale 2 and 4, zoomed), colored by sign, labelled with z,
    gone with a frame that flagged nothing and hidden by the checkbox; the panel counts them."""
    from stream.viewer import Viewer, ViewerConfig

    driver, profile = _chromium_or_skip()
    loop = _LoopThread()
    publish, control = free_endpoint(), free_endpoint()

    async def start():
        ctx = zmq.asyncio.Context()
        server = FakeServer(ctx, publish, control, frames_flagged=3)
        viewer = Viewer(ViewerConfig(publish=publish, control=control, port=0,
                                     status_every_s=0.2))  # fmt: skip
        return ctx, server, viewer, await viewer.start()

    async def send(frames, until_known: bool = False) -> None:
        while True:  # PUB drops what it sends before the viewer's SUB is connected
            for h, px in frames:
                await server.pub.send_multipart(encode_published(h, px))
            if not until_known or viewer.latest.keys:
                return
            await asyncio.sleep(0.05)

    async def stop() -> None:
        await viewer.stop()
        await server.close()
        ctx.term()

    ctx, server, viewer, url = loop.run(start())
    try:
        invented = {"y": 10.0, "x": 30.0, "scale_px": 1.0, "z": 6.3, "sign": -1}
        removed = {"y": 25.0, "x": 12.0, "scale_px": 1.5, "z": 7.4, "sign": 1}
        loop.run(send(_flagged_pair(1, 2, (40, 48), [invented, removed]), until_known=True))
        driver.get(url)

        def layout(seq: int) -> dict | None:
            shown = driver.execute_script("return window.scopecast.probe()")
            if any(shown[p]["seq"] != seq for p in ("raw", "enhanced")):
                return None
            return driver.execute_script(LAYOUT_JS)

        def text(id_: str) -> str:
            return driver.find_element("id", id_).text.strip()

        page = _wait("frame 1 with its overlay", lambda: layout(1))
        assert page["seq"] == "1" and page["display"] != "none"
        regions = {g["kind"]: g for g in page["regions"]}
        assert set(regions) == {"invented", "removed"}
        assert regions["invented"]["label"] == "z 6.3" and regions["removed"]["label"] == "z 7.4"
        assert "does not support" in regions["invented"]["title"]
        assert "lacks" in regions["removed"]["title"]
        assert text("st-flagged") == "2 (1 invented, 1 removed)"
        _wait("the server's flagged frames", lambda: text("st-frames-flagged") == "3")

        def check(page: dict, scale: int, regions: list[dict]) -> None:
            """Each outline's ring is centred on its structure in the picture, and its radius
            is twice the filter's sigma in enhanced px at the pane's zoom."""
            shot = _screenshot(driver)
            dpr = page["dpr"]
            drawn_by_z = {d["label"]: d for d in page["regions"]}
            for g in regions:
                drawn = drawn_by_z[f"z {g['z']:.1f}"]
                ring = _centroid(shot, dpr, "magenta" if g["sign"] < 0 else "cyan",
                                 _grown(drawn["box"]))  # fmt: skip
                pane = "enhanced" if g["sign"] < 0 else "raw"
                spot = _centroid(shot, dpr, "white", page[pane])
                assert spot is not None, f"no {pane} spot on the screen"
                # the raw pane is drawn at the enhanced pane's size: compare within each pane
                spot = (spot[0] - page[pane][0] + page["enhanced"][0],
                        spot[1] - page[pane][1] + page["enhanced"][1])  # fmt: skip
                assert _near(ring, spot), (g, ring, spot)
                radius = drawn["box"][2] / 2
                assert abs(radius - 2 * g["scale_px"] * scale * page["px"]) < 1.0, (g, radius)

        check(page, 2, [invented, removed])
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(ARTIFACTS / "viewer-overlay.png"))
        # zoom in on the invented spot: both panes and the outlines follow
        spot = _centroid(_screenshot(driver), page["dpr"], "white", page["enhanced"])
        driver.execute_script(
            "document.querySelector('#pane-enhanced .viewport').dispatchEvent(new WheelEvent("
            "'wheel', {deltaY: -300, clientX: arguments[0], clientY: arguments[1], bubbles: true,"
            " cancelable: true}))", *spot,
        )  # fmt: skip
        zoomed = driver.execute_script(LAYOUT_JS)
        assert zoomed["px"] > 1.4 * page["px"]
        check(zoomed, 2, [invented])  # the removed one is out of view in the raw pane
        driver.execute_script("document.getElementById('reset-view').click()")

        # the checkbox hides the outlines and shows them again
        driver.find_element("id", "overlay").click()
        hidden = driver.execute_script(LAYOUT_JS)
        assert hidden["display"] == "none"
        shot = _screenshot(driver)
        assert _centroid(shot, hidden["dpr"], "magenta", hidden["enhanced"]) is None
        assert _centroid(shot, hidden["dpr"], "cyan", hidden["enhanced"]) is None
        driver.find_element("id", "overlay").click()
        check(driver.execute_script(LAYOUT_JS), 2, [invented, removed])

        # scale 4: the same raw-pixel regions land four times further out
        at_x4 = {"y": 3.0, "x": 17.0, "scale_px": 0.8, "z": 9.0, "sign": -1}
        loop.run(send(_flagged_pair(2, 4, (20, 24), [at_x4])))
        page = _wait("frame 2 with its overlay", lambda: layout(2))
        assert [g["label"] for g in page["regions"]] == ["z 9.0"]
        check(page, 4, [at_x4])
        assert text("st-flagged") == "1 (1 invented, 0 removed)"

        # a frame that flagged nothing: no outline is left over from the one before
        loop.run(send(_flagged_pair(3, 2, (40, 48), [])))
        page = _wait("frame 3", lambda: layout(3))
        assert page["regions"] == [] and text("st-flagged") == "0"
        assert _centroid(_screenshot(driver), page["dpr"], "magenta", page["enhanced"]) is None
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
        loop.run(stop())
        loop.close()
