"""A local ``tritonserver`` for benchmarks and tests: the one the ``nvidia-pytriton`` wheel ships.

That build (Triton 2.51) has the Python backend only and pins numpy<2, so it lives in its own
virtual environment (``$SCOPECAST_TRITON_VENV``, else ``.triton-venv`` in the repository) with
``onnxruntime`` beside it; engines are exported with ``--runtime python`` (the ONNX run by
onnxruntime inside Triton). :class:`TritonServer` starts it on a loopback gRPC port in its own
process group and :meth:`~TritonServer.kill` ends that group; it raises
:class:`TritonUnavailable` with the reason where it cannot start (tests turn that into a skip).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from calibration.errors import ScopecastError

ROOT = Path(__file__).resolve().parents[1]
VENV_ENV = "SCOPECAST_TRITON_VENV"


class TritonUnavailable(ScopecastError, RuntimeError):
    """No local tritonserver can be started here; the message says why."""


def default_venv() -> Path:
    return Path(os.environ.get(VENV_ENV) or ROOT / ".triton-venv")


def find_pytriton(venv: Path | None = None) -> tuple[Path, Path, Path]:
    """(venv, site-packages, tritonserver) of a venv with nvidia-pytriton and onnxruntime."""
    venv = Path(venv) if venv is not None else default_venv()
    found = sorted(venv.glob("lib/python3*/site-packages/pytriton/tritonserver/bin/tritonserver"))
    if not found:
        raise TritonUnavailable(
            f"no tritonserver in {venv}: create it with `python -m venv {venv} && {venv}/bin/pip "
            f"install nvidia-pytriton onnxruntime` or set ${VENV_ENV}"
        )
    binary = found[0]
    site = binary.parents[3]
    if not (site / "onnxruntime").is_dir():
        raise TritonUnavailable(
            f"{venv} has no onnxruntime for Triton's Python backend: pip install onnxruntime"
        )
    return venv, site, binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TritonServer:
    """``tritonserver`` on a loopback gRPC port, serving ``repo`` (Python backend, CPU)."""

    def __init__(
        self, repo: Path, work: Path, port: int | None = None, venv: Path | None = None
    ) -> None:
        venv, site, self.binary = find_pytriton(venv)
        self.repo, self.port = Path(repo), port or free_port()
        self.url = f"grpc://127.0.0.1:{self.port}"
        self.backends = Path(work) / "backends"
        python = self.backends / "python"
        if not python.is_dir():
            bundled = site / "pytriton" / "tritonserver"
            version = site.parent.name.removeprefix("python")  # lib/python3.11/site-packages
            stub = bundled / "python_backend_stubs" / version / "triton_python_backend_stub"
            if not stub.is_file():
                raise TritonUnavailable(
                    f"nvidia-pytriton has no Python backend stub for Python {version}"
                )
            python.mkdir(parents=True)
            for f in (bundled / "backends" / "python").iterdir():
                if f.is_file():
                    shutil.copy(f, python / f.name)
            shutil.copy(stub, python / stub.name)
        self.env = {
            **os.environ,
            "LD_LIBRARY_PATH": os.pathsep.join(
                filter(
                    None, [str(site / "nvidia_pytriton.libs"), os.environ.get("LD_LIBRARY_PATH")]
                )
            ),
            # the stub's embedded Python finds the venv (numpy<2, onnxruntime) through PATH
            "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.log = Path(work) / f"tritonserver-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 90) -> TritonServer:
        """Start it and wait until it is ready; :class:`TritonUnavailable` if it is not."""
        import tritonclient.grpc as grpcclient

        cmd = [str(self.binary), "--model-repository", str(self.repo),
               "--backend-directory", str(self.backends), "--grpc-address", "127.0.0.1",
               "--grpc-port", str(self.port), "--allow-http=false", "--allow-metrics=false",
               "--log-verbose=0"]  # fmt: skip
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)  # fmt: skip
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{self.port}")
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    tail = self.log.read_text(errors="replace")[-1500:]
                    code = self.proc.returncode
                    self.proc = None
                    raise TritonUnavailable(f"tritonserver exited with {code}: {tail}")
                try:
                    if client.is_server_ready(client_timeout=1):
                        return self
                except Exception:  # noqa: BLE001 - not up yet
                    pass
                time.sleep(0.2)
        finally:
            client.close()
        self.kill()
        tail = self.log.read_text(errors="replace")[-1500:]
        raise TritonUnavailable(f"tritonserver not ready within {timeout_s} s: {tail}")

    def kill(self) -> None:
        """SIGKILL the server and its Python-backend stubs (its own process group)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None


@contextmanager
def local_triton(
    engines: Sequence[str], *, venv: Path | None = None, queue_delay_us: int = 500,
    timeout_s: float = 120,
) -> Iterator[TritonServer]:  # fmt: skip
    """A tritonserver serving ``engines`` (exported on the fly, Python backend, CPU) for the
    duration of the ``with``; killed, and its repository deleted, afterwards."""
    from engines.offline.triton_repo import ExportOptions, export_repository

    find_pytriton(venv)  # no venv: say so before exporting anything
    with tempfile.TemporaryDirectory(prefix="scopecast-triton-") as tmp:
        repo = Path(tmp) / "repo"
        options = ExportOptions(device="cpu", runtime="python", queue_delay_us=queue_delay_us)
        export_repository(list(engines), repo, options)
        server = TritonServer(repo, Path(tmp), venv=venv)
        try:
            yield server.start(timeout_s)
        finally:
            server.kill()
