"""One exit-2 path: a user's mistake in any command group, run as the installed ``scopecast``
(or ``python -m bench``), is one red ``error:`` line and exit code 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from calibration.errors import InvalidInput
from stream.console import MAX_ERROR_CHARS, ScopecastGroup, run_app

SCOPECAST = str(Path(sys.executable).with_name("scopecast"))


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def assert_one_error_line(r: subprocess.CompletedProcess, words: str) -> None:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert words in lines[0] and len(lines[0]) <= len("error: ") + MAX_ERROR_CHARS, lines[0]
    assert "Traceback" not in r.stderr + r.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["serve", "--engine", "nonexistent", "--out", "{tmp}"], "'nonexistent' not found"),
        (["engines", "show", "/nonexistent"], "no engine package folder at /nonexistent"),
        (["engines", "verify", "nope"], "engine 'nope' not found"),
        (["build", "gaussian", "--precision", "fp64"], "choose one of fp32, fp16, int8"),
        (
            ["calibrate", "register", "/nonexistent-low", "/nonexistent-high", "--out", "{tmp}"],
            "give two TIFF files or two folders",
        ),
        (["calibrate", "show", "/nonexistent"], "no calibration profile at /nonexistent"),
        (["train", "{tmp}/bad.yaml"], "unknown losses ['l3']"),
        (
            [
                "bench",
                "quality",
                "--engine",
                "nope",
                "--simulated",
                "confocal-20fps",
                "--pairs",
                "1",
                "--sequence",
                "0",
                "--out",
                "{tmp}",
            ],
            "engine 'nope'",
        ),
        (["bench", "server-latency", "--seconds", "0"], "--seconds 0 must be > 0"),
        (["demo", "--duration", "0"], "--duration 0.0 must be > 0"),
    ],
)
def test_a_mistake_in_each_group_is_one_line_and_exit_2(tmp_path, args, words) -> None:
    (tmp_path / "bad.yaml").write_text("name: bad\nlosses: {l3: 1.0}\n")
    r = run(SCOPECAST, *(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert_one_error_line(r, words)


def test_python_m_bench_reports_mistakes_the_same_way(tmp_path) -> None:
    r = run(sys.executable, "-m", "bench", "throughput", "--engine", "nope", "--size", "32",
            "--out", str(tmp_path))  # fmt: skip
    assert_one_error_line(r, "nope")


def test_usage_errors_and_decided_exits_stay_as_typer_makes_them() -> None:
    r = run(SCOPECAST, "engines", "info")
    assert r.returncode == 2 and "No such command 'info'" in r.stderr
    r = run(SCOPECAST, "bench", "throughput", "--engine", "identity", "--tile", "abc")
    assert r.returncode == 2 and "'abc' is not a tile side" in r.stderr
    assert "Traceback" not in r.stderr


def _app(fail: Exception) -> typer.Typer:
    app = typer.Typer(cls=ScopecastGroup)

    def convert(value: str) -> str:
        raise fail

    @app.command()
    def go(x: str = typer.Option("1", callback=convert)) -> None:
        """Fails while its option is converted, before the command runs."""

    @app.command()
    def bug() -> None:
        """Fails with an error that is not the user's."""
        raise KeyError("a bug")

    return app


def test_run_app_reports_a_mistake_raised_outside_a_command(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        run_app(_app(InvalidInput("--x 1 is bad: give 2")), "prog", ["go"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: --x 1 is bad: give 2"


def test_a_bug_is_not_a_user_mistake() -> None:
    r = CliRunner().invoke(_app(InvalidInput("x")), ["bug"])
    assert r.exit_code == 1 and isinstance(r.exception, KeyError)


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("server-latency", ["--seconds", "--engine", "--size", "--out", "--json"]),
        ("hook-latency", ["--seconds", "--json"]),
        (
            "model-speed",
            ["--threads", "--runs", "--budget", "--scale", "--hw", "--sizes", "--arch", "--json"],
        ),
        (
            "throughput",
            [
                "--engine",
                "--size",
                "--backend",
                "--tile",
                "--batch",
                "--threads",
                "--seconds",
                "--warmup",
                "--markdown",
                "--out",
            ],
        ),
        ("sim-noise", []),
    ],
)
def test_the_focused_benchmarks_are_bench_commands(command, options) -> None:
    r = subprocess.run([sys.executable, "-m", "bench", command, "--help"], capture_output=True,
                       text=True, timeout=60, check=False,
                       env={**os.environ, "COLUMNS": "200"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    for option in options:
        assert option in r.stdout, (command, option)
