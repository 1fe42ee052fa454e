"""The server's status is one typed model: its shipped JSON schema is current, what the server
sends validates back to the same JSON, and the viewer page reads only fields it names."""

from __future__ import annotations

import json
import re
import threading

from test_server import ramp_frames, send_frames

from stream.acquire import free_endpoint
from stream.control import status as ask_status
from stream.ring import RESET_REASONS
from stream.server import GUARDED, EngineServer, ServerConfig
from stream.status import SCHEMA_PATH, RingResets, ServerStatus, StageErrors, schema_json
from stream.viewer.server import _brief

VIEWER_JS = SCHEMA_PATH.with_name("viewer.js")


def test_the_shipped_schema_is_current():
    assert SCHEMA_PATH.read_text() == schema_json(), (
        f"{SCHEMA_PATH} is stale: run `python -m stream.status` and commit it"
    )


def test_the_model_knows_every_stage_and_reset_reason():
    assert set(StageErrors.model_fields) == set(GUARDED)
    assert set(RingResets.model_fields) == set(RESET_REASONS)


def test_a_running_server_status_round_trips_as_the_same_json(tmp_path):
    config = ServerConfig(out_dir=tmp_path, listen=free_endpoint(), publish=None,
                          control=free_endpoint(), mode="complete")  # fmt: skip
    server = EngineServer(config)
    results: list = []
    runner = threading.Thread(target=lambda: results.append(server.run()))
    runner.start()
    try:
        send_frames(config.listen, ramp_frames(4, shape=(16, 16)))
        live = ask_status(config.control, timeout_s=10)
        server._fault("publish", KeyError("injected"))  # one counted stage error on the wire
        server.disk_errors("spill", "injected")
    finally:
        server.stop({"scope": 4}, timeout_s=60)
        runner.join(60)
    (summary,) = results
    assert isinstance(live, ServerStatus) and live.engine.engine == "identity"
    wire = json.loads(json.dumps(summary.model_dump(mode="json")))
    assert ServerStatus.model_validate(wire) == summary
    assert wire["stage_errors"] == {"publish": {"KeyError": 1}}  # only the stages that had one
    assert wire["disk_errors"] == {"spill": 1}
    assert wire["frames_written"] == {"raw": 4, "enhanced": 4}
    assert set(wire) == set(json.loads(SCHEMA_PATH.read_text())["properties"])
    assert len(wire) == len(ServerStatus.model_fields)
    assert {"p50", "p90", "p99", "max"} == set(wire["latency_ms"]["total"])


def test_the_viewer_page_reads_fields_the_schema_names(tmp_path):
    """Every ``s.NAME`` / ``st.server.NAME`` viewer.js reads is in the viewer's brief, and the
    brief's fields are ServerStatus fields (engine, scale and backend flattened)."""
    js = VIEWER_JS.read_text()
    assert "status.schema.json" in js
    read = set(re.findall(r"\bs\.([a-z_]+)\b", js)) | set(re.findall(r"st\.server\.([a-z_]+)", js))
    schema = json.loads(SCHEMA_PATH.read_text())
    config = ServerConfig(out_dir=tmp_path, listen=free_endpoint(), publish=None,
                          control=free_endpoint())  # fmt: skip
    server = EngineServer(config)
    runner = threading.Thread(target=server.run)
    runner.start()
    try:
        brief = _brief(server.status())
    finally:
        server.stop()
        runner.join(60)
    assert read and read <= set(brief), read - set(brief)
    flattened = {"scale", "backend"}  # from the schema's engine (EngineInfo)
    assert set(brief) - flattened <= set(schema["properties"])
    assert flattened <= set(schema["$defs"]["EngineInfo"]["properties"])
    assert {"stage", "error"} <= set(schema["$defs"]["StageFailure"]["properties"])
    assert {"p50", "p99"} <= set(schema["$defs"]["Latency"]["properties"])
