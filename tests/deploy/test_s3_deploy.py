"""The S3 artifact store's deployments: the k8s overlay s3 (SeaweedFS, a bucket Job, the S3 settings and a Secret
for the API and the worker) and the compose profile "s3". They render, validate strictly (the base's own checks
run on the overlay too: tests/deploy/test_k8s.py), and point the API, the worker and the bucket's creation at the
same store, bucket and prefix, with a lifecycle rule no shorter than ARTIFACT_TTL."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import kubernetes_validate
import pytest

from facegen.contract.artifacts import ArtifactSettings
from tests.deploy.test_compose import compose_bin, compose_env  # noqa: F401 - fixtures
from tests.deploy.test_compose import render as render_compose
from tests.deploy.test_k8s import (
    API,
    K8S_VERSION,
    NAMESPACE,
    REPO,
    S3_OVERLAY,
    WORKER,
    find,
    find_prefixed,
    main_container,
    render,
)

CREDENTIALS = "facegen-s3"  # the Secret the operator creates: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
LIFECYCLE_FILE = S3_OVERLAY / "s3-lifecycle.json"


@pytest.fixture(scope="module")
def overlay() -> list[dict]:
    return render(S3_OVERLAY)


@pytest.fixture(scope="module")
def config(overlay) -> dict[str, str]:
    return find_prefixed(overlay, "ConfigMap", "facegen-config-")["data"]


def check_lifecycle(rule_file: dict, settings: ArtifactSettings) -> None:
    """The rule deletes what the store writes (the prefix), no sooner than the job's record expires."""
    (rule,) = rule_file["Rules"]
    assert rule["Status"] == "Enabled"
    assert rule["Filter"]["Prefix"] == settings.s3_prefix
    assert rule["Expiration"]["Days"] >= settings.lifecycle_days()


def test_the_job_validates_strictly_and_runs_as_non_root(overlay):
    job = find(overlay, "Job", "facegen-s3-bucket")
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    assert job["metadata"]["namespace"] == NAMESPACE
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    (container,) = pod["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"cpu", "memory"} <= set(container["resources"]["limits"])


def test_api_and_worker_read_the_s3_settings_and_the_credentials(overlay, config, monkeypatch):
    for name in (API, WORKER):
        sources = main_container(find(overlay, "Deployment", name))["envFrom"]
        assert {"configMapRef": {"name": find_prefixed(overlay, "ConfigMap", "facegen-config-")["metadata"]["name"]}
                } in sources, name
        assert {"secretRef": {"name": CREDENTIALS}} in sources, name
    for name, value in config.items():
        monkeypatch.setenv(name, value)
    settings = ArtifactSettings()  # what both processes parse from it
    assert settings.artifact_store == "s3" and settings.s3_bucket


def test_the_store_the_settings_name_is_the_in_cluster_seaweedfs(overlay, config):
    endpoint = urlsplit(config["S3_ENDPOINT_URL"])
    service = find(overlay, "Service", endpoint.hostname)
    assert [port["port"] for port in service["spec"]["ports"]] == [endpoint.port]
    seaweedfs = main_container(find(overlay, "StatefulSet", "seaweedfs"))
    assert {"secretRef": {"name": CREDENTIALS}} in seaweedfs["envFrom"]  # its admin identity = the pods' keys
    assert f"-s3.port={endpoint.port}" in seaweedfs["args"]


def test_the_bucket_job_applies_the_lifecycle_rule_to_the_configured_bucket(overlay, config, monkeypatch):
    job = find(overlay, "Job", "facegen-s3-bucket")["spec"]["template"]["spec"]
    (container,) = job["containers"]
    script = container["args"][0]
    assert 'create-bucket --bucket "$S3_BUCKET"' in script and "put-bucket-lifecycle-configuration" in script
    lifecycle = find_prefixed(overlay, "ConfigMap", "facegen-s3-lifecycle-")
    assert {"configMap": {"name": lifecycle["metadata"]["name"]}} in [
        {k: v for k, v in volume.items() if k != "name"} for volume in job["volumes"]]
    for name, value in config.items():
        monkeypatch.setenv(name, value)
    check_lifecycle(json.loads(lifecycle["data"]["s3-lifecycle.json"]), ArtifactSettings())


def test_compose_s3_profile(compose_bin, compose_env):  # noqa: F811 - the fixtures imported above
    config = render_compose(compose_bin, compose_env, "--profile", "s3", "--env-file", str(REPO / "docker" / "s3.env"))
    services = config["services"]
    assert {"seaweedfs", "s3-init"} <= set(services)
    endpoint = services["api"]["environment"]["S3_ENDPOINT_URL"]
    assert urlsplit(endpoint).hostname == "seaweedfs" and "-s3.port=8333" in services["seaweedfs"]["command"]
    assert services["s3-init"]["environment"]["AWS_ENDPOINT_URL"] == endpoint
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["ARTIFACT_STORE"] == "s3" and env["S3_ENDPOINT_URL"] == endpoint
        assert env["S3_BUCKET"] == services["s3-init"]["environment"]["S3_BUCKET"]
        assert services[name]["depends_on"]["s3-init"]["condition"] == "service_completed_successfully"
    (mount,) = services["s3-init"]["volumes"]
    assert mount["source"] == str(LIFECYCLE_FILE) and mount["read_only"] is True
    env = services["api"]["environment"]
    check_lifecycle(json.loads(LIFECYCLE_FILE.read_text()),
                    ArtifactSettings(artifact_store="s3", s3_bucket=env["S3_BUCKET"], s3_prefix=env["S3_PREFIX"]))


def test_compose_without_the_profile_keeps_artifacts_in_redis(compose_bin, compose_env):  # noqa: F811
    services = render_compose(compose_bin, compose_env)["services"]
    assert "seaweedfs" not in services and "s3-init" not in services
    for name in ("api", "worker"):
        assert services[name]["environment"]["ARTIFACT_STORE"] is None  # unset: the default, redis
        assert services[name]["depends_on"]["s3-init"]["required"] is False
