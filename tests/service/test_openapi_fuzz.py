"""Property-based requests generated from our own OpenAPI document (schemathesis): no 500s, and every answer
matches what the document promises (status codes, content types, headers, bodies, auth)."""

from __future__ import annotations

import os

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from service.app import create_app
from service.config import Settings
from tests.service.conftest import TEST_DB, _with_db
from tests.service.fakeworker import publish_model

KEY = "fuzz-key"
APP = create_app(Settings(redis_url=_with_db(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), TEST_DB),
                          api_keys=KEY))
AUTH = {"Authorization": f"Bearer {KEY}"}
schema = schemathesis.openapi.from_asgi("/openapi.json", APP, headers=AUTH)


@schema.parametrize()
@settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case, conn):
    publish_model(conn)  # a live worker, so /readyz is 200 and labels come from the registry
    # Which labels, attributes and model versions exist is known only at run time (the workers' registry), so
    # a schema-valid body may still be refused with 422: skip schemathesis's "valid data is accepted" check.
    case.call_and_validate(headers=AUTH, excluded_checks=[positive_data_acceptance])


def test_openapi_documents_every_operation():
    document = APP.openapi()
    operations = [(path, method, op) for path, ops in document["paths"].items() for method, op in ops.items()]
    assert len(operations) == 10
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
