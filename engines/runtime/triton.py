"""Triton backend: the engine runs in a Triton Inference Server, reached over gRPC.

``scopecast serve --backend triton --triton-url grpc://HOST:PORT`` (or ``$SCOPECAST_TRITON_URL``)
sends each tile batch to the Triton model named like the package (``NAME-tensorrt`` first when
Triton has it ready: the TensorRT plans ``scopecast engines export-triton`` writes for a GPU), and
returns its first output. Everything stateful stays in scopecast: the server's rings keep the
temporal window, previous output and background and hand them in as inputs, as for any backend.
Requests from several rigs (or tiles of several positions in flight at once) meet in Triton's
dynamic batcher.

At open, an unreachable Triton, a model that is not ready, inputs other than the package's, or
another ONNX than the package's (the export's ``scopecast.onnx_sha256`` parameter) is one
BackendError. Once running, a lost Triton makes every call a BackendError (the server then
writes the raw frame, counts the engine error and goes on) while the backend reconnects with
exponential backoff (0.25 s doubling to 8 s), checking the model again; enhancement resumes by
itself. ``describe()`` reports the URL, the model, its health, call counts and timings: the
client round trip per call, and Triton's own queue and compute times from its statistics.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..package import EnginePackage
from .base import Backend, BackendError, feed
from .registry import OpenOptions

URL_ENV = "SCOPECAST_TRITON_URL"
TIMEOUT_ENV = "SCOPECAST_TRITON_TIMEOUT_S"
DEFAULT_URL = "grpc://127.0.0.1:8001"
DEFAULT_TIMEOUT_S = 5.0
INSTALL = "pip install 'tritonclient[grpc]' (the triton extra)"
TENSORRT_SUFFIX = "-tensorrt"  # engines.offline.triton_repo writes plans under this name
SHA_PARAMETER = "scopecast.onnx_sha256"
BACKOFF_S = (0.25, 8.0)  # first wait after a loss, longest wait
STATS_EVERY_S = 2.0
_LOST = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "NOT_FOUND", "UNKNOWN"})


def _client_module() -> Any:
    try:
        import tritonclient.grpc as grpcclient
    except ImportError as e:
        raise BackendError(f"the triton backend needs tritonclient ({e}): {INSTALL}") from e
    return grpcclient


def parse_url(text: str) -> str:
    """``grpc://HOST:PORT`` (or ``HOST:PORT``; port 8001 when left out) -> ``HOST:PORT``;
    BackendError naming the value otherwise."""
    url = text.strip()
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "grpc", url
    if scheme != "grpc":
        raise BackendError(
            f"Triton URL {text!r}: scopecast talks to Triton over gRPC; give grpc://HOST:PORT "
            "(Triton's gRPC port, 8001 by default)"
        )
    host, colon, port = rest.rstrip("/").rpartition(":")
    if not colon or "]" in port:  # no port (an IPv6 literal's last colon is inside brackets)
        host, port = rest.rstrip("/"), "8001"
    if not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BackendError(f"Triton URL {text!r}: give grpc://HOST:PORT, e.g. {DEFAULT_URL}")
    return f"{host}:{int(port)}"


def configured_url() -> str:
    return os.environ.get(URL_ENV) or DEFAULT_URL


def configured_timeout() -> float:
    text = os.environ.get(TIMEOUT_ENV)
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 600:
        raise BackendError(f"${TIMEOUT_ENV}={text!r}: give seconds per call, > 0 and <= 600")
    return value


def _status_name(e: Exception) -> str:
    status = getattr(e, "status", lambda: None)()
    return str(status or "").removeprefix("StatusCode.")


def _message(e: Exception) -> str:
    text = getattr(e, "message", lambda: str(e))() or str(e)
    return " ".join(str(text).split())


@dataclass
class _Stats:
    calls: int = 0
    errors: int = 0
    reconnects: int = 0
    round_trip_s: float = 0.0
    last_round_trip_s: float = 0.0


class TritonBackend:
    """One engine package served by one model of a Triton server."""

    name = "triton"

    def __init__(self, package: EnginePackage, url: str, timeout_s: float) -> None:
        self._grpc = _client_module()
        self.package = package
        self.target = parse_url(url)
        self.url = f"grpc://{self.target}"
        self.device = self.url  # Backend.device: where it runs
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._reconnecting = threading.Lock()
        self._stats = _Stats()
        self._lost: str | None = None  # why Triton is considered lost, None while healthy
        self._lost_since = 0.0
        self._retry_at = 0.0
        self._backoff = BACKOFF_S[0]
        self._triton_stats: dict[str, Any] = {}
        self._stats_at = 0.0
        self._closed = False
        self._client = self._connect()
        self.model, self.reason_model = self._choose_model(self._client)
        self.config = self._check_model(self._client, self.model)
        self.max_batch = int(self.config.get("max_batch_size", 0))
        self._inputs = [t["name"] for t in self.config.get("input", [])]
        self.output = self.config["output"][0]["name"]
        self.server_version = self._server_version(self._client)

    # -- connecting and checking -------------------------------------------------------------

    def _connect(self) -> Any:
        """A client whose server answers live; BackendError naming the URL otherwise."""
        try:
            client = self._grpc.InferenceServerClient(self.target)
        except Exception as e:
            raise BackendError(f"Triton at {self.url}: cannot create a gRPC client ({e})") from e
        try:
            live = client.is_server_live(client_timeout=self.timeout_s)
        except Exception as e:  # noqa: BLE001 - InferenceServerException, grpc errors
            client.close()
            raise BackendError(
                f"Triton at {self.url} is unreachable ({_message(e)}): start it "
                "(tritonserver --model-repository DIR) or fix --triton-url / "
                f"${URL_ENV}"
            ) from None
        if not live:
            client.close()
            raise BackendError(f"Triton at {self.url} answers but is not live")
        return client

    def _choose_model(self, client: Any) -> tuple[str, str]:
        name = self.package.manifest.name
        for candidate in (f"{name}{TENSORRT_SUFFIX}", name):
            try:
                if client.is_model_ready(candidate, client_timeout=self.timeout_s):
                    kind = "TensorRT plans" if candidate != name else "the package's ONNX"
                    return candidate, f"model {candidate!r} ({kind})"
            except Exception as e:  # noqa: BLE001
                if _status_name(e) in _LOST - {"NOT_FOUND", "UNKNOWN"}:
                    raise BackendError(f"Triton at {self.url}: {_message(e)}") from None
        ready = self._ready_models(client)
        raise BackendError(
            f"Triton at {self.url} has no ready model {name!r} (nor {name + TENSORRT_SUFFIX!r}); "
            f"ready there: {', '.join(ready) or 'none'}. Export it with `scopecast engines "
            f"export-triton {name} --repository DIR` and point tritonserver at DIR"
        )

    def _ready_models(self, client: Any) -> list[str]:
        try:
            index = client.get_model_repository_index(as_json=True, client_timeout=self.timeout_s)
        except Exception:  # noqa: BLE001 - only for the message
            return []
        return sorted(m["name"] for m in index.get("models", []) if m.get("state") == "READY")

    def _check_model(self, client: Any, model: str) -> dict[str, Any]:
        """The model's config, checked against the package: same input names, an output, and
        (when the export recorded it) the same ONNX."""
        try:
            config = client.get_model_config(model, as_json=True, client_timeout=self.timeout_s)
        except Exception as e:  # noqa: BLE001
            raise BackendError(
                f"Triton at {self.url}: no config for {model!r}: {_message(e)}"
            ) from None
        config = config.get("config", config)
        m = self.package.manifest
        names = [t["name"] for t in config.get("input", [])]
        if sorted(names) != sorted(m.input_names):
            raise BackendError(
                f"Triton model {model!r} at {self.url} takes inputs {names}, but engine "
                f"{m.name!r} feeds {m.input_names}: export this package again"
            )
        if not config.get("output"):
            raise BackendError(f"Triton model {model!r} at {self.url} declares no output")
        served = config.get("parameters", {}).get(SHA_PARAMETER, {}).get("string_value")
        ours = m.files[m.model]
        if served is not None and served != ours:
            raise BackendError(
                f"Triton model {model!r} at {self.url} was exported from another model.onnx "
                f"(sha256 {served[:12]}...) than {self.package.path} ({ours[:12]}...): export "
                "this package again, or serve the package Triton has"
            )
        self.provenance = "checked" if served is not None else "unchecked (not a scopecast export)"
        return dict(config)

    def _server_version(self, client: Any) -> str:
        try:
            meta = client.get_server_metadata(as_json=True, client_timeout=self.timeout_s)
        except Exception:  # noqa: BLE001 - only for describe()
            return "?"
        return str(meta.get("version", "?"))

    # -- losing and finding Triton again -----------------------------------------------------

    def _mark_lost(self, why: str) -> None:
        with self._lock:
            if self._lost is None:
                self._lost_since = time.monotonic()
                self._backoff = BACKOFF_S[0]
            self._lost = why
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_S[1])

    def _reconnect(self) -> None:
        """Called while lost, when the backoff has passed: a fresh client, the model checked
        again (a restarted Triton may serve another export). BackendError while still lost."""
        old = self._client
        try:
            client = self._connect()
            if not client.is_model_ready(self.model, client_timeout=self.timeout_s):
                client.close()
                raise BackendError(f"Triton at {self.url} is back but {self.model!r} is not ready")
            self._check_model(client, self.model)
        except BackendError as e:
            self._mark_lost(str(e))
            raise self._lost_error() from None
        except Exception as e:  # noqa: BLE001 - any other failure is still "lost"
            self._mark_lost(_message(e))
            raise self._lost_error() from None
        with self._lock:
            self._client = client
            self._lost = None
            self._backoff = BACKOFF_S[0]
            self._stats.reconnects += 1
        with contextlib.suppress(Exception):  # the old channel is gone anyway
            old.close()

    def _lost_error(self) -> BackendError:
        since = time.monotonic() - self._lost_since
        wait = max(0.0, self._retry_at - time.monotonic())
        return BackendError(
            f"Triton at {self.url} lost {since:.1f} s ago ({self._lost}); next reconnect in "
            f"{wait:.1f} s, frames pass unenhanced meanwhile"
        )

    # -- the Backend interface ---------------------------------------------------------------

    def infer(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Send the model's inputs (a batch of tiles or frames) to Triton; its first output."""
        if self._closed:
            raise BackendError(f"backend for {self.package.manifest.name!r} is closed")
        arrays = feed(self.package.manifest.name, self._inputs, inputs)
        if self._lost is not None:
            # one caller reconnects; the others (positions in flight) fail fast meanwhile
            if time.monotonic() < self._retry_at or not self._reconnecting.acquire(blocking=False):
                self._stats.errors += 1
                raise self._lost_error()
            try:
                if self._lost is not None:
                    self._reconnect()
            except BackendError:
                self._stats.errors += 1
                raise
            finally:
                self._reconnecting.release()
        n = next(iter(arrays.values())).shape[0]
        step = self.max_batch or n
        t0 = time.perf_counter()
        parts = [
            self._call({k: v[i : i + step] for k, v in arrays.items()}) for i in range(0, n, step)
        ]
        spent = time.perf_counter() - t0
        with self._lock:
            self._stats.calls += 1
            self._stats.round_trip_s += spent
            self._stats.last_round_trip_s = spent
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _call(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        grpc = self._grpc
        request = []
        for name, array in arrays.items():
            item = grpc.InferInput(name, list(array.shape), "FP32")
            item.set_data_from_numpy(array)
            request.append(item)
        try:
            result = self._client.infer(
                self.model,
                request,
                outputs=[grpc.InferRequestedOutput(self.output)],
                client_timeout=self.timeout_s,
            )
            # a copy: the client's array is read-only, and the engine scales its output in place
            out = np.array(result.as_numpy(self.output))
        except Exception as e:  # noqa: BLE001 - InferenceServerException, grpc errors
            self._stats.errors += 1
            status = _status_name(e)
            shapes = {k: v.shape for k, v in arrays.items()}
            if status in _LOST or not status:
                self._mark_lost(f"{status or type(e).__name__}: {_message(e)}")
                raise self._lost_error() from None
            raise BackendError(
                f"Triton model {self.model!r} at {self.url} failed on inputs {shapes}: "
                f"{status}: {_message(e)}"
            ) from None
        if out is None:
            self._stats.errors += 1
            raise BackendError(f"Triton model {self.model!r} returned no {self.output!r}")
        return np.asarray(out, dtype=np.float32)

    def triton_statistics(self, refresh: bool = False) -> dict[str, Any]:
        """Triton's own figures for the model: requests, executions (fewer when batched), mean
        queue and compute milliseconds per request and per execution. Cached for 2 s."""
        now = time.monotonic()
        if self._lost is not None or (not refresh and now - self._stats_at < STATS_EVERY_S):
            return self._triton_stats
        self._stats_at = now
        try:
            got = self._client.get_inference_statistics(
                self.model, as_json=True, client_timeout=min(self.timeout_s, 0.5)
            )
            stats = got["model_stats"][0]
        except Exception:  # noqa: BLE001 - describe() must never fail on statistics
            return self._triton_stats
        inf = stats.get("inference_stats", {})

        def mean_ms(key: str) -> float | None:
            part = inf.get(key, {})
            count = int(part.get("count", 0))
            return round(int(part.get("ns", 0)) / count / 1e6, 3) if count else None

        self._triton_stats = {
            "inference_count": int(stats.get("inference_count", 0)),
            "execution_count": int(stats.get("execution_count", 0)),
            "requests": int(inf.get("success", {}).get("count", 0)),
            "failed": int(inf.get("fail", {}).get("count", 0)),
            "queue_ms": mean_ms("queue"),
            "compute_input_ms": mean_ms("compute_input"),
            "compute_infer_ms": mean_ms("compute_infer"),
            "compute_output_ms": mean_ms("compute_output"),
            "batch_sizes": {
                str(b["batch_size"]): int(b.get("compute_infer", {}).get("count", 0))
                for b in stats.get("batch_stats", [])
            },
        }
        return self._triton_stats

    def describe(self) -> dict[str, Any]:
        """URL, model, health, calls, errors, reconnects, client round trip and Triton's own
        queue/compute times (statistics refreshed at most every 2 s)."""
        s = self._stats
        lost = self._lost
        return {
            "name": self.name,
            "device": self.device,
            "engine": self.package.manifest.name,
            "url": self.url,
            "model": self.model,
            "model_choice": self.reason_model,
            "provenance": self.provenance,
            "health": "ready" if lost is None else f"lost: {lost}",
            "max_batch_size": self.max_batch,
            "calls": s.calls,
            "errors": s.errors,
            "reconnects": s.reconnects,
            "round_trip_ms": round(s.round_trip_s / s.calls * 1e3, 3) if s.calls else None,
            "last_round_trip_ms": round(s.last_round_trip_s * 1e3, 3),
            "timeout_s": self.timeout_s,
            "triton": self.triton_statistics(),
            "versions": {"triton": self.server_version, "tritonclient": _client_version()},
            "inputs": [_arg(t) for t in self.config.get("input", [])],
            "outputs": [_arg(t) for t in self.config.get("output", [])],
        }

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):  # closing a dead channel
            self._client.close()

    def __enter__(self) -> TritonBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _arg(t: dict[str, Any]) -> dict[str, Any]:
    return {"name": t.get("name"), "type": t.get("data_type"), "shape": t.get("dims", [])}


def _client_version() -> str:
    try:
        from importlib.metadata import version

        return version("tritonclient")
    except Exception:  # noqa: BLE001
        return "?"


# -- the registry's functions (``registry``'s "triton" row) ---------------------------------


def open_triton(
    package: EnginePackage, requested: str, options: OpenOptions
) -> tuple[Backend, str]:
    """Open the package's model on the Triton server at ``$SCOPECAST_TRITON_URL``."""
    backend = TritonBackend(package, configured_url(), configured_timeout())
    why = (
        f"{requested}: Triton {backend.server_version} at {backend.url}, {backend.reason_model}, "
        f"provenance {backend.provenance}"
    )
    return backend, why


def unavailable(options: OpenOptions) -> str | None:
    """None when tritonclient imports (whether a server answers is found at open)."""
    try:
        _client_module()
    except BackendError as e:
        return str(e)
    return None


def status(options: OpenOptions) -> str:
    """tritonclient's version, and whether the configured Triton answers (1 s at most)."""
    url = configured_url()
    try:
        target = parse_url(url)
        client = _client_module().InferenceServerClient(target)
    except Exception as e:  # noqa: BLE001
        return f"tritonclient {_client_version()}; {url}: {e}"
    try:
        ready = client.is_server_ready(client_timeout=1.0)
        state = "ready" if ready else "live, not ready"
    except Exception as e:  # noqa: BLE001
        state = f"unreachable ({_status_name(e) or type(e).__name__})"
    finally:
        client.close()
    return f"tritonclient {_client_version()}; Triton at grpc://{target}: {state}"
