"""``python -m bench``: the benchmarks (the same as ``scopecast bench``)."""

from bench.cli import app

app(prog_name="python -m bench")
