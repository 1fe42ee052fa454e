"""The scopecast command as a user runs it: one clear line and exit 2 for expected mistakes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import useq

from engines.package import ZOO_DIR
from stream.acquire import free_endpoint
from stream.control import request, wait_ready
from stream.hook import FrameHook
from stream.security import Curve


def scopecast(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stream", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def error_lines(r: subprocess.CompletedProcess) -> list[str]:
    """The non-empty stderr lines of a run (an expected mistake must give exactly one)."""
    return [line for line in r.stderr.splitlines() if line.strip()]


def start(*args: str) -> subprocess.Popen:
    """``scopecast ARGS`` in the background, stdout and stderr captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "stream", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["acquire", "--preset", "nope", "--wait", "0"], "unknown preset 'nope'"),
        (["acquire", "--config", "missing.cfg"], "'missing.cfg' does not exist"),
        (["acquire", "--to", "localhost:5555"], "is not tcp://HOST:PORT"),
        (["acquire", "--preset", "confocal-20fps", "--config", "x.cfg"], "not both"),
        (["acquire", "--duration", "0"], "--duration 0.0 must be > 0"),
        (
            ["receive", "--listen", "tcp://0.0.0.0:5599", "--idle-timeout", "0.1"],
            "refusing to bind tcp://0.0.0.0:5599",
        ),
        (["demo", "--preset", "widefield"], "unknown preset 'widefield'"),
    ],
)
def test_expected_mistakes_give_one_clear_line(args: list[str], message: str) -> None:
    r = scopecast(*args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_unreachable_receiver(endpoint: str) -> None:
    r = scopecast("acquire", "--to", endpoint, "--wait", "0.3", "--duration", "1")
    assert r.returncode == 2
    assert f"no receiver answered at {endpoint}" in r.stderr
    # the engine server is what a user means to start; receive is the plain test end point
    assert f"`scopecast serve --listen {endpoint}`" in r.stderr
    assert "`scopecast receive" in r.stderr and "test end point" in r.stderr
    assert len(error_lines(r)) == 1


def test_bad_sequence_files(tmp_path: Path) -> None:
    syntax = tmp_path / "syntax.yaml"
    syntax.write_text("time_plan: [")
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("time_plan:\n  interval: 0.1\n  loops: many\n")
    cfg = tmp_path / "empty.cfg"
    cfg.write_text("# nothing\n")
    for path, message in [
        (syntax, "could not be read"),
        (invalid, "not a valid useq"),
        (tmp_path / "seq.txt", "does not exist"),
    ]:
        r = scopecast("acquire", "--sequence", str(path), "--wait", "0")
        assert r.returncode == 2 and message in r.stderr, r.stderr
    r = scopecast("acquire", "--config", str(cfg))
    assert r.returncode == 2 and "sets no camera" in r.stderr, r.stderr


def test_receive_and_acquire_a_sequence_file(endpoint: str, tmp_path: Path) -> None:
    seq = tmp_path / "seq.yaml"
    seq.write_text("channels: [FITC, DAPI]\ntime_plan: {interval: 0, loops: 3}\n")
    # no --count: a receiver that leaves once it has every frame looks, from the hook, like
    # one that died with frames in its buffers (acquire then warns and exits 1)
    cmd = [sys.executable, "-m", "stream", "receive", "--listen", endpoint, "--idle-timeout", "3",
           "--json"]  # fmt: skip
    rx = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        r = scopecast("acquire", "--to", endpoint, "--sequence", str(seq), "--wait", "20", "--json")
        out = rx.communicate(timeout=60)[0]
    finally:
        rx.kill()
    assert r.returncode == 0, r.stderr
    sent = json.loads(r.stdout)
    assert sent["frames_seen"] == sent["frames_sent"] == 6
    assert json.loads(out)["frames_received"] == 6


def test_help_lists_the_commands() -> None:
    r = scopecast("--help")
    assert r.returncode == 0
    for cmd in ("acquire", "receive", "demo", "presets", "serve", "status", "keys", "recover",
                "engines"):  # fmt: skip
        assert cmd in r.stdout


# -- "never a silent zombie": what a user sees ----------------------------------------------------


def _broken_packages(tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "not-a-package"
    empty.mkdir()
    bad = tmp_path / "bad-manifest"
    shutil.copytree(ZOO_DIR / "identity", bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest.pop("task")
    (bad / "manifest.json").write_text(json.dumps({**manifest, "scale": 3, "speed": "fast"}))
    return {"empty": empty, "bad": bad}


@pytest.mark.parametrize(
    ("which", "message"),
    [("empty", "missing manifest.json"),
     ("bad", "invalid manifest: task: Field required; scale: Input should be 1, 2 or 4")],
)  # fmt: skip
def test_serve_engine_package_errors_are_one_red_line(tmp_path, which, message) -> None:
    package = _broken_packages(tmp_path)[which]
    r = scopecast("serve", "--engine", str(package), "--out", str(tmp_path / "runs"),
                  "--listen", free_endpoint(), "--publish", "none",
                  "--control", free_endpoint())  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = error_lines(r)
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: engine package {package} cannot be loaded")
    assert message in lines[0]
    if which == "bad":
        assert "speed: Extra inputs are not permitted" in lines[0]


def test_insecure_warning_is_printed_once(tmp_path) -> None:
    listen = f"tcp://0.0.0.0:{free_endpoint().rsplit(':', 1)[1]}"
    control = free_endpoint()
    server = start("serve", "--listen", listen, "--insecure", "--publish", "none",
                   "--control", control, "--out", str(tmp_path), "--quiet")  # fmt: skip
    try:
        wait_ready(control, process=server, timeout_s=60)
        request(control, "stop", timeout_s=30)
    finally:
        _, errors = finish(server)
    assert server.returncode == 0, errors
    assert errors.count(f"binding {listen} without authentication") == 1, errors


def test_nan_input_frame_is_blamed_on_the_input_not_the_engine(tmp_path) -> None:
    listen, control = free_endpoint(), free_endpoint()
    server = start("serve", "--engine", "identity", "--mode", "complete", "--listen", listen,
                   "--publish", "none", "--control", control, "--out", str(tmp_path),
                   "--json")  # fmt: skip
    try:
        wait_ready(control, process=server, timeout_s=60)
        hook = FrameHook(listen, hwm=100)
        hook.wait_for_receiver(10)
        hook.sequenceStarted(useq.MDASequence(time_plan={"interval": 0, "loops": 2}))
        nan = np.ones((16, 16), np.float32)
        nan[3, 4] = np.nan
        for i, frame in enumerate((nan, np.ones((16, 16), np.float32))):
            assert hook.send(frame, event=useq.MDAEvent(index={"t": i}))
        hook.close()
        summary = request(control, "stop", expect={"scope": 2}, timeout_s=60)
    finally:
        _, errors = finish(server)
    assert summary["engine_errors"] == {"input": 1}, summary["engine_errors"]
    assert summary["frames_enhanced"] == 1 and summary["frames_written"]["raw"] == 2
    assert "the input frame holds 1 NaN/inf values" in errors
    assert "not the engine" in errors and "produced" not in errors


@pytest.mark.slow
def test_acquire_exits_1_with_a_warning_when_its_server_is_killed(tmp_path) -> None:
    listen, control = free_endpoint(), free_endpoint()
    server = start("serve", "--listen", listen, "--publish", "none", "--control", control,
                   "--out", str(tmp_path), "--quiet")  # fmt: skip
    acq = None
    try:
        wait_ready(control, process=server, timeout_s=60)
        acq = start("acquire", "--to", listen, "--duration", "5", "--json")
        deadline = time.monotonic() + 60
        while request(control, "status", timeout_s=5)["frames_received"] < 5:
            assert time.monotonic() < deadline and acq.poll() is None, "no frames arrived"
            time.sleep(0.1)
        server.send_signal(signal.SIGKILL)
        out, errors = finish(acq, timeout=120)
    finally:
        if acq is not None and acq.poll() is None:
            acq.kill()
        finish(server)
    assert acq.returncode == 1, errors
    sent = json.loads(out)
    assert sent["frames_not_handed_over"] > 0 and sent["receiver_disconnects"] == 1, sent
    assert sent["receiver_connected"] is False
    warning = [line for line in errors.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1, errors
    assert "frames not handed over" in warning[0] and f"{listen} disconnected" in warning[0]


def test_keys_are_private_and_acquire_feeds_a_curve_server(tmp_path) -> None:
    keys = tmp_path / "keys"
    r = scopecast("keys", str(keys))
    assert r.returncode == 0, r.stderr
    mode = {p.name: stat.S_IMODE(p.stat().st_mode) for p in keys.rglob("*")}
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    assert mode["server.key_secret"] == mode["client.key_secret"] == 0o600, mode
    assert mode["server.key"] == mode["client.key"] == 0o644
    listen, control = free_endpoint(), free_endpoint()
    server = start("serve", "--keys", str(keys), "--listen", listen, "--publish", "none",
                   "--control", control, "--out", str(tmp_path / "runs"), "--json")  # fmt: skip
    try:
        wait_ready(control, process=server, timeout_s=60, curve=Curve(keys))
        # without keys the hook never completes the handshake: one clear line, exit 2
        no_keys = scopecast("acquire", "--to", listen, "--wait", "1", "--duration", "0.5")
        assert no_keys.returncode == 2 and "no receiver answered" in no_keys.stderr
        ok = scopecast("acquire", "--to", listen, "--keys", str(keys), "--duration", "1",
                       "--json")  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        sent = json.loads(ok.stdout)
        assert sent["frames_sent"] == sent["frames_seen"] == 20
        stop = scopecast("status", "--control", control, "--keys", str(keys), "--stop", "--json")
        assert stop.returncode == 0, stop.stderr
    finally:
        out, errors = finish(server)
    assert server.returncode == 0, errors
    assert json.loads(out.strip().splitlines()[-1])["frames_received"] == 20


@pytest.mark.slow
def test_demo_prints_its_endpoints_so_status_reaches_it(tmp_path) -> None:
    demo = start("demo", "--engine", "identity", "--duration", "4", "--out", str(tmp_path),
                 "--json")  # fmt: skip
    line = ""
    try:
        deadline = time.monotonic() + 90
        while "engine server:" not in line:
            assert time.monotonic() < deadline and demo.poll() is None, "no endpoints printed"
            line = demo.stderr.readline()
        endpoints = dict(zip(("listen", "publish", "control"),
                             (w for w in line.split() if w.startswith("tcp://")),
                             strict=True))  # fmt: skip
        status = scopecast("status", "--control", endpoints["control"], "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["listen"] == endpoints["listen"]
        out, _ = finish(demo, timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 0
    assert json.loads(out.strip().splitlines()[-1])["endpoints"] == endpoints


@pytest.mark.slow
def test_demo_checks_fidelity_with_the_presets_profile_and_says_when_one_does_not_match(
    tmp_path,
) -> None:
    """--profile preset: every frame's noise and the scheduled full check, no mismatch; the same
    profile with the gain doubled: the alarm fires (after MISMATCH_RUN = 10 frames of 40)."""
    from calibration.profile import CalibrationProfile

    ok = scopecast("demo", "--engine", "identity", "--duration", "2", "--profile", "preset",
                   "--out", str(tmp_path / "a"), "--json")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    fid = json.loads(ok.stdout)["fidelity"]
    assert fid["mismatch"] is None and fid["frames_checked"] >= 1 and fid["fidelity_every"] >= 1
    saved = CalibrationProfile.load(tmp_path / "a" / "profiles" / "confocal-20fps")
    wrong = saved.updated(camera=saved.camera.model_copy(
        update={"gain_adu_per_electron": 2 * saved.camera.gain_adu_per_electron}))  # fmt: skip
    wrong.save(tmp_path / "wrong")
    bad = scopecast("demo", "--engine", "identity", "--duration", "2", "--profile",
                    str(tmp_path / "wrong"), "--out", str(tmp_path / "b"), "--json")  # fmt: skip
    assert bad.returncode == 0, bad.stderr
    mismatch = json.loads(bad.stdout)["fidelity"]["mismatch"]
    assert mismatch and "does not match this camera" in mismatch and "low" in mismatch


def test_demo_unknown_engine_is_one_line_naming_the_known_ones(tmp_path) -> None:
    r = scopecast("demo", "--engine", "unknown", "--duration", "1", "--out", str(tmp_path))
    assert r.returncode == 2
    lines = error_lines(r)
    assert len(lines) == 1, r.stderr
    assert "engine 'unknown' not found; available: " in lines[0]
    assert "identity" in lines[0] and "`scopecast engines list`" in lines[0]


_DYING_SERVE = """
import sys
import stream.server as server

def boom(self):
    raise RuntimeError("the engine stage blew up")

server.EngineServer._engine_loop = boom
sys.argv = ["scopecast", "serve", *sys.argv[1:]]
from stream.cli import main
main()
"""


@pytest.mark.parametrize("as_json", [False, True])
def test_serve_exits_3_naming_the_stage_that_died(tmp_path, as_json) -> None:
    listen, control = free_endpoint(), free_endpoint()
    r = subprocess.run(
        [sys.executable, "-c", _DYING_SERVE, "--listen", listen, "--publish", "none",
         "--control", control, "--out", str(tmp_path), "--quiet",
         *(["--json"] if as_json else [])],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert r.returncode == 3, r.stderr
    red = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(red) == 1, r.stderr
    assert "engine stage died" in red[0] and "the engine stage blew up" in red[0]
    if as_json:
        summary = json.loads(r.stdout.strip().splitlines()[-1])
        assert summary["healthy"] is False and summary["failure"]["stage"] == "engine"


def test_serve_help_documents_exit_codes_and_ring_mb() -> None:
    r = subprocess.run([sys.executable, "-m", "stream", "serve", "--help"], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "COLUMNS": "400"},
                       check=False)  # fmt: skip
    assert r.returncode == 0
    text = " ".join(r.stdout.replace("│", " ").split())
    assert "--ring-mb" in text and "idle keys are evicted past it" in text
    for code in ("0 stopped as asked", "1 an unexpected error", "2 an expected mistake",
                 "3 a stage of the server died"):  # fmt: skip
        assert code in text, code


def test_serve_passes_ring_mb_to_the_server(tmp_path) -> None:
    control = free_endpoint()
    server = start("serve", "--ring-mb", "3.5", "--listen", free_endpoint(), "--publish",
                   "none", "--control", control, "--out", str(tmp_path), "--quiet")  # fmt: skip
    try:
        wait_ready(control, process=server, timeout_s=60)
        status = request(control, "stop", timeout_s=30)
    finally:
        finish(server)
    assert status["rings"]["budget_bytes"] == int(3.5 * 2**20)
    bad = scopecast("serve", "--ring-mb", "0", "--out", str(tmp_path))
    assert bad.returncode == 2 and len(error_lines(bad)) == 1
    assert "ring_mb" in bad.stderr


@pytest.mark.slow
def test_demo_exits_3_when_its_server_dies(tmp_path) -> None:
    """The server process the demo starts loses its engine stage (injected through
    sitecustomize): the demo stops acquiring, and says which stage died, exit 3."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import stream.server as server\n\n"
        "def boom(self):\n"
        "    raise RuntimeError('the engine stage blew up')\n\n"
        "server.EngineServer._engine_loop = boom\n"
    )
    path = os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")]))
    r = subprocess.run(
        [sys.executable, "-m", "stream", "demo", "--engine", "identity", "--duration", "20",
         "--out", str(tmp_path / "runs"), "--json"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": path},
        check=False,
    )  # fmt: skip
    assert r.returncode == 3, r.stderr
    red = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(red) == 1 and "engine stage died" in red[0] and "blew up" in red[0], r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["healthy"] is False and result["failure"]["stage"] == "engine"
    assert result["frames_acquired"] < 400  # the acquisition stopped; it did not run 20 s
