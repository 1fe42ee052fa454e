"""``python -m bench``: the benchmarks (the same as ``scopecast bench``), with the same handling
of a user's mistake: one red ``error:`` line and exit code 2."""

from bench.cli import app
from stream.console import run_app

run_app(app, prog_name="python -m bench")
