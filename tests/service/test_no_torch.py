"""The API process never imports torch, nor any module of ours but the wire contract it shares with the worker
(facegen.contract: job spec and its field types, Redis connection policy, artifact store, model store, fair
queue)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.service.conftest import REPO

PROBE = """
import json, sys
from service.app import create_app
from service.config import Settings
import service.__main__, service.client
app = create_app(Settings(redis_url="redis://127.0.0.1:1/0"))
app.openapi()
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "facegen", "worker", "training", "numpy"))))
"""


def test_building_the_app_imports_no_torch():
    # A fresh interpreter: other tests in this process may have imported torch themselves.
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert "torch" not in modules
    shared = ["facegen", "facegen.contract", "facegen.contract.artifacts", "facegen.contract.connection",
              "facegen.contract.cost", "facegen.contract.fair_queue", "facegen.contract.fields",
              "facegen.contract.job_serializer", "facegen.contract.model_store", "facegen.contract.spec"]
    assert [m for m in modules if m.split(".")[0] in ("facegen", "worker", "training")] == shared
