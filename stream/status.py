"""What a running engine server reports (``status``, and the summary ``stop`` and ``serve``
return): one pydantic model, sent over the control socket as its JSON.

The server builds a :class:`ServerStatus`; the control socket sends
``model_dump(mode="json")``; every reader (``scopecast status``, the viewer, the benches)
validates the answer back into a ServerStatus and reads attributes. Its JSON schema ships as
``stream/viewer/static/status.schema.json`` (regenerate with ``python -m stream.status``), the
reference for readers outside Python such as the viewer page.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

#: Where the JSON schema of :class:`ServerStatus` ships (served to the viewer page beside it).
SCHEMA_PATH = Path(__file__).parent / "viewer" / "static" / "status.schema.json"


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Counts(_Part):
    """Counts by kind with a field per known kind; only the kinds seen go on the wire (as the
    plain dict of counts they always were)."""

    @model_serializer(mode="wrap")
    def _seen_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v}

    def seen(self) -> dict[str, Any]:
        """The kinds that occurred, with their counts."""
        return {k: v for k, v in self if v}


class StageFailure(_Part):
    """The stage found dead by the supervisor, and why."""

    stage: str
    error: str


class BackendInfo(_Part):
    """What runs one engine of the chain; each backend adds its own details (providers,
    plan, versions, model inputs and outputs)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(description="backend, e.g. onnxruntime or tensorrt")
    device: str = Field(description="e.g. cpu or cuda:0")


class EngineInfo(_Part):
    """The engine chain being served."""

    engine: str = Field(description="chain name, engines joined by '+'")
    scale: int = Field(description="output pixels per input pixel along each axis")
    window: int = Field(description="frames the first engine takes (temporal window)")
    backend: list[BackendInfo] = Field(description="one per engine of the chain")
    reason: list[str] = Field(description="why each backend was chosen")
    id: str = Field(
        "",
        description="name@version:sha (the first 12 hex digits of its model's sha256) of each "
        "engine, joined by '+': how the index and the enhanced OME-TIFF name it",
    )
    units: list[str] = Field(
        default_factory=list,
        description="one per engine: the units it takes (adu, or electrons and the conversion "
        "used: the --profile's, else the camera its manifest assumes)",
    )


class SwapInfo(_Part):
    """The latest hot swap of the engine (``scopecast status --swap``; :mod:`stream.swap`)."""

    number: int = Field(description="1 for the server's first swap, 2 for the next, ...")
    state: Literal["loading", "ready", "done", "failed"] = Field(
        description="loading: opening, verifying and warming up the new engine off the critical "
        "path; ready: waiting for the engine stage's next frame boundary; done: it serves; "
        "failed: not loaded, the engine before keeps serving (error says why)"
    )
    engine: str = Field(description="the engine asked for (chain: joined by '+')")
    backend: str = Field(description="the backend setting it is opened with")
    previous: str = Field(description="the engine serving when the swap was asked for")
    engine_id: str | None = Field(None, description="once loaded: its name@version:sha")
    error: str | None = Field(None, description="failed: what was wrong and what to do")
    load_s: float | None = Field(
        None, description="seconds from the request to ready (open, verify, warm up) or failed"
    )
    warmup_shapes: list[list[int]] = Field(
        default_factory=list, description="frame shapes the new engine was warmed up on"
    )
    switched_after: int | None = Field(
        None, description="done: frames the server had enhanced before the new engine's first"
    )


class AdaptInfo(_Part):
    """``serve --adapt-after``: the adaptation of the serving engine to this recording
    (:mod:`stream.adapt_after`)."""

    state: Literal["collecting", "adapting", "swapping", "refused", "failed"] = Field(
        description="collecting: keeping the first stream key's raw frames; adapting: "
        "`scopecast adapt` runs in a niced one-thread child process while the engine serves; "
        "swapping: its gate passed and the hot swap to it was asked for (see swap); refused: "
        "the gate refused it (error says why), the engine serves on; failed: it did not run"
    )
    after_s: float = Field(description="seconds of frames it learns from (--adapt-after)")
    base: str = Field(description="the engine adapted")
    key: str | None = Field(None, description="the stream key whose frames it learns from")
    frames: int = Field(0, description="frames kept for it")
    adapt_s: float | None = Field(None, description="seconds the adaptation took")
    engine: str | None = Field(None, description="swapping: the adapted package")
    error: str | None = Field(None, description="refused or failed: why")


class Latency(_Part):
    """Percentiles (ms) of one stage's recent durations; None before the first sample."""

    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None


class FramesWritten(_Part):
    raw: int
    enhanced: int


class DiskErrors(_Counts):
    """Writes the disk refused, by what was being written (counted, the server goes on)."""

    raw: int = 0
    enhanced: int = 0
    close: int = 0
    spill: int = 0


class StageErrors(_Counts):
    """Unexpected exceptions per guarded stage, by exception type (counted, the stage goes
    on); only stages that had one go on the wire."""

    receive: dict[str, int] = {}
    engine: dict[str, int] = {}
    writer: dict[str, int] = {}
    control: dict[str, int] = {}
    publish: dict[str, int] = {}
    spill: dict[str, int] = {}


class Viewers(_Part):
    """Subscriber connections accepted on PUB, and those that went away."""

    connected: int
    gone: int


class Queues(_Part):
    """Items waiting: for enhancement (engine), for the disk (writer)."""

    engine: int
    writer: int


class RingResets(_Part):
    """Temporal-state resets by reason (see :mod:`stream.ring`)."""

    first: int
    acquisition: int
    shape: int
    order: int
    gap: int
    pause: int


class Evictions(_Part):
    budget: int
    idle: int


class RingStats(_Part):
    """The temporal state kept per (stream, position, channel, z)."""

    keys: int
    resets: RingResets
    bytes: int
    budget_bytes: int | None
    evicted: Evictions


class StreamTransport(_Part):
    """How one stream's pixels reach the server (:mod:`stream.shm`)."""

    transport: Literal["shm", "inline"] = Field(
        description="how its latest frame came: shm (a same-host hook's shared-memory ring, "
        "the message carrying only the header) or inline (the pixels in the message)"
    )
    frames_shm: int = Field(description="frames whose pixels came through shared memory")
    frames_inline: int = Field(description="frames whose pixels came in the message")
    fallbacks: int = Field(
        description="inline frames after the stream had used shared memory (its ring was full, "
        "or a frame outgrew the slots)"
    )
    rejected: dict[str, int] = Field(
        description="shared-memory references refused, by kind (also in frames_rejected): shm "
        "(no such segment, outside it), shm_overwritten (slot written again before or while it "
        "was read: dropped, never read torn)"
    )
    offers_refused: int = Field(
        description="offered segments the server could not map (another host): stays inline"
    )


class ServerStatus(_Part):
    """Health, counters, per-stage latency percentiles (ms), engine, backend, queue depths."""

    healthy: bool = Field(description="false once a stage died; the server is then stopping")
    failure: StageFailure | None
    engine: EngineInfo
    mode: Literal["live", "complete"]
    listen: str
    publish: str | None
    out_dir: str = Field(description="this run's folder")
    uptime_s: float
    rss_mb: float | None = Field(description="resident memory; None where /proc is missing")
    cpu_s: float
    frames_received: int
    frames_received_by_stream: dict[str, int]
    frames_missing: int = Field(description="gaps between consecutive sequence numbers")
    frames_rejected: dict[str, int] = Field(description="malformed messages, by kind")
    frames_enhanced: int
    frames_skipped: int = Field(description="live mode: replaced by a newer frame of the key")
    frames_spilled: int = Field(description="complete mode: backlog moved to disk")
    frames_not_enhanced: int = Field(description="complete mode: no room in memory nor on disk")
    frames_written: FramesWritten
    engine_errors: dict[str, int] = Field(description="frames the engine refused, by kind")
    disk_errors: DiskErrors
    stage_errors: StageErrors
    requests_rejected: int = Field(description="malformed control requests")
    published: int
    viewers: Viewers
    queues: Queues
    rings: RingStats
    latency_ms: dict[str, Latency] = Field(description="by stage, in pipeline order")
    files: list[str]
    fidelity_mismatch: str | None = Field(
        None,
        description="set while the --profile's noise model does not describe the camera (a "
        "stream's raw noise stayed out of its expected band): the fidelity check is unreliable; "
        "recalibrate with `scopecast calibrate camera`",
    )
    frames_flagged: int = Field(
        0,
        description="enhanced frames whose fidelity scan (needs --profile) flagged a region the "
        "raw frame does not support (invented or removed structure; at most about 5% of honest "
        "frames)",
    )
    frames_checked: int = Field(
        0, description="enhanced frames given the full fidelity check (chi-square and scan)"
    )
    swap: SwapInfo | None = Field(
        None, description="the latest hot swap of the engine (`scopecast status --swap`), if any"
    )
    adapt: AdaptInfo | None = Field(
        None, description="serve --adapt-after: the adaptation of the serving engine, if asked"
    )
    transport: dict[str, StreamTransport] = Field(
        default_factory=dict, description="by stream: how its pixels arrive (shm or inline)"
    )
    fidelity_every: int | None = Field(
        None,
        description="the full fidelity check's schedule in force: one enhanced frame in this "
        "many per stream key (--fidelity-every, or automatic from its cost); None without a "
        "--profile. The camera-noise check runs on every frame",
    )


def schema_json() -> str:
    """The JSON schema of :class:`ServerStatus`, as shipped in :data:`SCHEMA_PATH`."""
    return json.dumps(ServerStatus.model_json_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":  # python -m stream.status: rewrite the shipped schema
    SCHEMA_PATH.write_text(schema_json())
    print(SCHEMA_PATH)
