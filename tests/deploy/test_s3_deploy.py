"""The S3 artifact store's deployments: the k8s overlay s3 (SeaweedFS, a bucket Job, the S3 settings, a Secret for
the worker and a read-only one for the API) and the compose profile "s3". They render, validate strictly (the
base's own checks run on the overlay too: tests/deploy/test_k8s.py), and point the API, the worker and the
bucket's creation at the same store, bucket and prefix, with a lifecycle rule no shorter than ARTIFACT_TTL. That
the API's identity may read and not write is shown on a real SeaweedFS by tests/artifacts/test_s3_read_only.py."""

from __future__ import annotations

import json
import os
import subprocess
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

# The Secrets the operator creates, each with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY: the worker's, the API's.
CREDENTIALS = "facegen-s3"
API_CREDENTIALS = "facegen-s3-api"
LIFECYCLE_FILE = S3_OVERLAY / "s3-lifecycle.json"
START_SCRIPT = S3_OVERLAY / "seaweedfs-start.sh"


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
    for name, own, other in ((API, API_CREDENTIALS, CREDENTIALS), (WORKER, CREDENTIALS, API_CREDENTIALS)):
        sources = main_container(find(overlay, "Deployment", name))["envFrom"]
        assert {"configMapRef": {"name": find_prefixed(overlay, "ConfigMap", "facegen-config-")["metadata"]["name"]}
                } in sources, name
        secrets = [source["secretRef"]["name"] for source in sources if "secretRef" in source]
        assert own in secrets and other not in secrets, name  # the API never holds the worker's write key
    for name, value in config.items():
        monkeypatch.setenv(name, value)
    settings = ArtifactSettings()  # what both processes parse from it
    assert settings.artifact_store == "s3" and settings.s3_bucket


def test_the_store_the_settings_name_is_the_in_cluster_seaweedfs(overlay, config):
    endpoint = urlsplit(config["S3_ENDPOINT_URL"])
    service = find(overlay, "Service", endpoint.hostname)
    assert [port["port"] for port in service["spec"]["ports"]] == [endpoint.port]
    statefulset = find(overlay, "StatefulSet", "seaweedfs")
    seaweedfs = main_container(statefulset)
    assert f"-s3.port={endpoint.port}" in seaweedfs["args"]


def test_seaweedfs_starts_with_the_worker_and_the_read_only_api_identities(overlay):
    statefulset = find(overlay, "StatefulSet", "seaweedfs")
    seaweedfs = main_container(statefulset)
    assert {"secretRef": {"name": CREDENTIALS}} in seaweedfs["envFrom"]  # the worker's pair, as AWS_*
    api_pair = {entry["name"]: entry["valueFrom"]["secretKeyRef"] for entry in seaweedfs["env"]}
    assert api_pair == {"S3_API_ACCESS_KEY_ID": {"name": API_CREDENTIALS, "key": "AWS_ACCESS_KEY_ID"},
                        "S3_API_SECRET_ACCESS_KEY": {"name": API_CREDENTIALS, "key": "AWS_SECRET_ACCESS_KEY"}}
    assert seaweedfs["command"] == ["sh", "/etc/facegen/seaweedfs-start.sh"] and "server" not in seaweedfs["args"]
    (mount,) = [m for m in seaweedfs["volumeMounts"] if m["mountPath"] == "/etc/facegen"]
    (volume,) = [v for v in statefulset["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    script = find(overlay, "ConfigMap", volume["configMap"]["name"])["data"]["seaweedfs-start.sh"]
    assert script == START_SCRIPT.read_text()


@pytest.mark.parametrize("missing", ["AWS_SECRET_ACCESS_KEY", "S3_API_ACCESS_KEY_ID", "S3_API_SECRET_ACCESS_KEY"])
def test_seaweedfs_refuses_to_start_without_both_identities(missing, tmp_path):
    env = {"PATH": os.environ["PATH"], "TMPDIR": str(tmp_path), "AWS_ACCESS_KEY_ID": "facegen",
           "AWS_SECRET_ACCESS_KEY": "worker-secret", "S3_API_ACCESS_KEY_ID": "facegen-api",
           "S3_API_SECRET_ACCESS_KEY": "api-secret"}
    del env[missing]
    proc = subprocess.run(["sh", str(START_SCRIPT)], env=env, capture_output=True, text=True, timeout=10)
    assert proc.returncode == 2 and f"set {missing}" in proc.stderr
    quoted = {**env, missing: 'a"b'}
    proc = subprocess.run(["sh", str(START_SCRIPT)], env=quoted, capture_output=True, text=True, timeout=10)
    assert proc.returncode == 2 and "only letters, digits" in proc.stderr  # never breaks out of the JSON
    assert not list(tmp_path.iterdir())  # no identities file written


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
    seaweedfs = services["seaweedfs"]
    assert seaweedfs["entrypoint"] == ["sh", "/etc/facegen/seaweedfs-start.sh"]
    assert {"source": str(START_SCRIPT), "target": "/etc/facegen/seaweedfs-start.sh", "read_only": True} in [
        {k: v for k, v in mount.items() if k in ("source", "target", "read_only")} for mount in seaweedfs["volumes"]]
    (mount,) = services["s3-init"]["volumes"]
    assert mount["source"] == str(LIFECYCLE_FILE) and mount["read_only"] is True
    env = services["api"]["environment"]
    check_lifecycle(json.loads(LIFECYCLE_FILE.read_text()),
                    ArtifactSettings(artifact_store="s3", s3_bucket=env["S3_BUCKET"], s3_prefix=env["S3_PREFIX"]))


def test_compose_gives_the_api_the_read_only_pair(compose_bin, compose_env):  # noqa: F811
    env, env_file = compose_env
    pairs = {"AWS_ACCESS_KEY_ID": "facegen", "AWS_SECRET_ACCESS_KEY": "worker-secret",
             "S3_API_ACCESS_KEY_ID": "facegen-api", "S3_API_SECRET_ACCESS_KEY": "api-secret"}
    services = render_compose(compose_bin, ({**env, **pairs}, env_file), "--profile", "s3", "--env-file",
                              str(REPO / "docker" / "s3.env"))["services"]
    worker_pair = {"AWS_ACCESS_KEY_ID": "facegen", "AWS_SECRET_ACCESS_KEY": "worker-secret"}
    for name in ("worker", "s3-init"):
        assert {k: services[name]["environment"][k] for k in worker_pair} == worker_pair, name
    api = services["api"]["environment"]
    assert (api["AWS_ACCESS_KEY_ID"], api["AWS_SECRET_ACCESS_KEY"]) == ("facegen-api", "api-secret")
    assert {k: services["seaweedfs"]["environment"][k] for k in pairs} == pairs  # it makes both identities
    # without a read-only pair (another store, one key pair) the API signs with the worker's
    worker_only = {k: v for k, v in pairs.items() if k.startswith("AWS_")}
    services = render_compose(compose_bin, ({**env, **worker_only}, env_file))["services"]
    assert services["api"]["environment"]["AWS_ACCESS_KEY_ID"] == "facegen"


def test_compose_without_the_profile_keeps_artifacts_in_redis(compose_bin, compose_env):  # noqa: F811
    services = render_compose(compose_bin, compose_env)["services"]
    assert "seaweedfs" not in services and "s3-init" not in services
    for name in ("api", "worker"):
        assert services[name]["environment"]["ARTIFACT_STORE"] is None  # unset: the default, redis
        assert services[name]["depends_on"]["s3-init"]["required"] is False
