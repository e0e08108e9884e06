"""Hostile input generated from our own OpenAPI document: the schemathesis CLI runs all its phases (examples,
coverage, fuzzing, stateful) over real HTTP against ``python -m service`` with API keys on. No 5xx, and every
answer matches what the document promises (status codes, content types, headers, bodies, auth)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.app import create_app
from service.config import Settings
from tests.service.conftest import LiveServer
from tests.service.fakeworker import publish_model

KEY = "fuzz-key"
MIN_CASES = 500
APP = create_app(Settings(api_keys=KEY))


@pytest.mark.timeout(600)
def test_api_conforms_to_its_schema_under_generated_input(redis_url, conn, tmp_path):
    publish_model(conn, ttl=600)  # a live worker, so /readyz is 200 and labels come from the registry
    # GET /jobs/{id}/events streams until the job ends (none does here): short streams, frequent keep-alives
    server = LiveServer(redis_url, env={"API_KEYS": KEY, "EVENTS_KEEPALIVE_S": "1", "EVENTS_MAX_S": "2"})
    try:
        # Which labels, attributes and models exist is known only at run time (the workers' registry), so a
        # schema-valid body may still be refused with 422: schemathesis's "valid data is accepted" check is off.
        # DELETE /jobs/{id} cancels a job, which stays readable as `canceled` until it expires (README): the
        # "deleted resource still available" check (use_after_free) does not apply.
        result = subprocess.run(
            [str(Path(sys.executable).parent / "schemathesis"), "run", f"{server.url}/openapi.json",
             "--header", f"Authorization: Bearer {KEY}", "--max-examples", "60", "--seed", "1", "--no-color",
             "--exclude-checks", "positive_data_acceptance,use_after_free", "--generation-database", "none",
             "--report", "junit", "--report-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=540, env={**os.environ, "NO_COLOR": "1"},
            cwd=tmp_path,  # schemathesis keeps a cache folder in its working directory
        )
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout[-6000:]
    generated = re.search(r"(\d+) generated, (\d+) passed", result.stdout)
    assert generated, result.stdout[-3000:]
    assert int(generated.group(1)) >= MIN_CASES and generated.group(1) == generated.group(2), generated.group(0)
    print(f"[schemathesis] {generated.group(0)}")


def test_openapi_documents_every_operation():
    document = APP.openapi()
    operations = [(path, method, op) for path, ops in document["paths"].items() for method, op in ops.items()]
    assert len(operations) == 14
    for path, method, op in operations:
        assert op.get("summary") and op.get("description"), (method, path)
        assert "200" in op["responses"] or "202" in op["responses"], (method, path)
        if path not in ("/healthz", "/readyz", "/metrics"):
            assert "401" in op["responses"] and "503" in op["responses"], (method, path)
            assert op["security"] == [{"ApiKey": []}]
    create = document["components"]["schemas"]["JobCreate"]
    assert create["properties"]["seed"]["anyOf"][0]["maximum"] == 2**63 - 1  # exact, not a rounded float
    assert create["properties"]["count"]["maximum"] == 64 and create["properties"]["count"]["default"] == 4
    assert create["examples"] and create["oneOf"] == [{"required": ["label"]}, {"required": ["attributes"]}]
    assert set(document["paths"]["/generate"]["post"]["responses"]) == {"202", "401", "413", "415", "422", "429",
                                                                         "503"}
