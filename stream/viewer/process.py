"""``scopecast view`` in a child process (``scopecast demo --view``): the viewer gets its own
interpreter, so encoding frames for browsers never competes with the acquisition for the GIL."""

from __future__ import annotations

import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from .server import ViewerError


class ViewerProcess:
    """Start with ``start()`` (returns the URL once the viewer listens), end with ``stop()``."""

    def __init__(
        self,
        publish: str,
        control: str | None,
        *,
        host: str = "127.0.0.1",
        port: int = 8765,
        token: str | None = None,
        keys: Path | None = None,
    ) -> None:
        self.cmd = [sys.executable, "-m", "stream", "view", "--publish", publish, "--control",
                    control or "none", "--host", host, "--port", str(port)]  # fmt: skip
        if token:
            self.cmd += ["--token", token]
        if keys:
            self.cmd += ["--keys", str(keys)]
        self.url = ""
        self._proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed by __exit__

    def start(self, timeout_s: float = 30.0) -> str:
        """Start the viewer; its first line on stdout is the URL it serves."""
        self._proc = p = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL, text=True
        )
        deadline = time.monotonic() + timeout_s
        assert p.stdout is not None
        while time.monotonic() < deadline and p.poll() is None:
            if select.select([p.stdout], [], [], 0.1)[0]:
                line = p.stdout.readline().strip()
                if line.startswith("http"):
                    self.url = line
                    return line
        self.stop()
        why = self.log_tail().removeprefix("error:").strip() or "it printed nothing"
        raise ViewerError(f"the viewer did not start: {why}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the viewer to finish (SIGINT), and kill it if it does not within ``timeout_s``."""
        p = self._proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p is not None and p.stdout is not None:
            p.stdout.close()

    def log_tail(self, chars: int = 2000) -> str:
        """The end of what the viewer wrote on stderr (its errors, one line each)."""
        self._log.seek(0)
        return self._log.read()[-chars:].strip()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        self._log.close()
