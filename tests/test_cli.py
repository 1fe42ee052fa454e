"""The scopecast command as a user runs it: one clear line and exit 2 for expected mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def scopecast(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stream", *args], capture_output=True, text=True, timeout=timeout
    )


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
    rx = subprocess.Popen(
        [sys.executable, "-m", "stream", "receive", "--listen", endpoint, "--count", "6", "--json"],
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
