"""The Redis deployments beyond the single in-cluster server: the k8s overlays redis-sentinel (primary + replica +
three Sentinels, ACL user) and managed-redis (TLS + ACL), and the compose profile "sentinel". They render,
validate strictly, and point the API, the worker and KEDA's scaler at the same Redis with the same credentials."""

from __future__ import annotations

import kubernetes_validate
import pytest

from tests.deploy.test_compose import compose_bin, compose_env  # noqa: F401 - fixtures
from tests.deploy.test_compose import render as render_compose
from tests.deploy.test_k8s import (
    API,
    K8S_VERSION,
    NAMESPACE,
    QUEUE_LIST,
    REDIS,
    REPO,
    WORKER,
    containers,
    effective_security,
    find,
    find_prefixed,
    is_crd_object,
    main_container,
    pod_spec,
    render,
    selected_workloads,
)

SENTINEL_OVERLAY = REPO / "k8s" / "overlays" / "redis-sentinel"
MANAGED_OVERLAY = REPO / "k8s" / "overlays" / "managed-redis"
SENTINEL = "redis-sentinel"
MASTER = "facegen"
CREDENTIALS = "facegen-redis"  # the Secret the operator creates: REDIS_USERNAME, REDIS_PASSWORD
CA_SECRET = "facegen-redis-tls"


@pytest.fixture(scope="module")
def sentinel() -> list[dict]:
    return render(SENTINEL_OVERLAY)


@pytest.fixture(scope="module")
def managed() -> list[dict]:
    return render(MANAGED_OVERLAY)


@pytest.fixture(scope="module", params=["sentinel", "managed"])
def overlay(request, sentinel, managed) -> list[dict]:
    return {"sentinel": sentinel, "managed": managed}[request.param]


def env_sources(container: dict) -> tuple[set[str], set[str]]:
    """Names of the ConfigMaps and Secrets a container takes its environment from."""
    sources = container.get("envFrom", [])
    return ({s["configMapRef"]["name"] for s in sources if "configMapRef" in s},
            {s["secretRef"]["name"] for s in sources if "secretRef" in s})


def trigger_auth(objects: list[dict]) -> tuple[dict, dict]:
    """The worker's KEDA trigger and the TriggerAuthentication it refers to, by parameter."""
    trigger = find(objects, "ScaledObject", WORKER)["spec"]["triggers"][0]
    auth = find(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    return trigger, {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}


# ----- both overlays ----------------------------------------------------------------------------------------------


def test_every_builtin_object_validates_strictly(overlay):
    for obj in overlay:
        if not is_crd_object(obj):
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        assert obj["kind"] == "Namespace" or obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]


def test_api_and_worker_read_the_credentials_and_keda_uses_the_same_ones(overlay):
    config = find_prefixed(overlay, "ConfigMap", "facegen-config")["metadata"]["name"]
    for name in (API, WORKER):
        config_maps, secrets = env_sources(main_container(find(overlay, "Deployment", name)))
        assert config in config_maps and CREDENTIALS in secrets, name
    trigger, params = trigger_auth(overlay)
    assert trigger["metadata"]["listName"] == QUEUE_LIST
    assert (params["username"]["name"], params["username"]["key"]) == (CREDENTIALS, "REDIS_USERNAME")
    assert (params["password"]["name"], params["password"]["key"]) == (CREDENTIALS, "REDIS_PASSWORD")


# ----- redis-sentinel ---------------------------------------------------------------------------------------------


def test_sentinel_overlay_runs_a_primary_a_replica_and_three_sentinels(sentinel):
    redis = find(sentinel, "StatefulSet", REDIS)
    sentinels = find(sentinel, "StatefulSet", SENTINEL)
    assert redis["spec"]["replicas"] == 2 and sentinels["spec"]["replicas"] == 3
    script = main_container(sentinels)["args"][0]
    assert f"sentinel monitor {MASTER} $primary 6379 2" in script  # quorum 2 of 3
    assert f"sentinel auth-user {MASTER} replication" in script  # the ACL user of replicas and Sentinels
    assert f"sentinel auth-pass {MASTER} $REDIS_REPLICATION_PASSWORD" in script
    command = main_container(redis)["command"]
    assert command[:2] == ["sh", "-c"]  # the base's start.sh (the ACL) with the base's args after the script
    assert '--replicaof "$primary" 6379' in command[2] and 'exec sh /etc/facegen/redis/start.sh "$@"' in command[2]
    args = main_container(redis)["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    for workload in (redis, sentinels):  # the password reaches a file in memory, never the command line
        assert env_sources(main_container(workload))[1] == {CREDENTIALS}
        runtime = [v for v in pod_spec(workload)["volumes"] if v["name"] == "runtime"]
        assert runtime and runtime[0]["emptyDir"]["medium"] == "Memory"
    service = find(sentinel, "Service", SENTINEL)
    assert selected_workloads(sentinel, service["spec"]["selector"]) == [sentinels]
    assert [p["port"] for p in service["spec"]["ports"]] == [26379]


def test_sentinel_overlay_points_api_worker_and_keda_at_the_sentinels(sentinel):
    data = find_prefixed(sentinel, "ConfigMap", "facegen-config")["data"]
    assert data["REDIS_SENTINEL_MASTER"] == MASTER
    hosts = [item.rsplit(":", 1) for item in data["REDIS_SENTINELS"].split(",")]
    assert [(h.split(".")[0], p) for h, p in hosts] == [(f"{SENTINEL}-{i}", "26379") for i in range(3)]
    trigger, _ = trigger_auth(sentinel)
    assert trigger["type"] == "redis-sentinel" and "address" not in trigger["metadata"]
    assert trigger["metadata"]["sentinelMaster"] == MASTER
    keda_hosts = [item.rsplit(":", 1)[0] for item in trigger["metadata"]["addresses"].split(",")]
    assert keda_hosts == [f"{SENTINEL}-{i}.{SENTINEL}.{NAMESPACE}.svc" for i in range(3)]


def test_sentinel_containers_run_as_non_root_with_limits(sentinel):
    for container in containers(find(sentinel, "StatefulSet", SENTINEL)):
        workload = find(sentinel, "StatefulSet", SENTINEL)
        assert effective_security(workload, container, "runAsNonRoot") is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"cpu", "memory"} <= set(container["resources"]["limits"])


# ----- managed-redis ----------------------------------------------------------------------------------------------


def test_managed_overlay_has_no_in_cluster_redis_and_speaks_tls_with_the_ca(managed):
    assert not [o for o in managed if o["metadata"]["name"] == REDIS]
    data = find_prefixed(managed, "ConfigMap", "facegen-config")["data"]
    assert data["REDIS_URL"].startswith("rediss://")
    for name in (API, WORKER):
        deployment = find(managed, "Deployment", name)
        mounts = {m["name"]: m for m in main_container(deployment)["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        ca_mount = [m for m in mounts.values() if data["REDIS_CA_CERT"].startswith(m["mountPath"] + "/")]
        assert len(ca_mount) == 1 and ca_mount[0]["readOnly"] is True, name
        assert volumes[ca_mount[0]["name"]]["secret"]["secretName"] == CA_SECRET, name
    trigger, params = trigger_auth(managed)
    host = data["REDIS_URL"].split("://", 1)[1].split("/", 1)[0]
    assert trigger["metadata"]["address"] == host  # KEDA watches the same Redis
    assert (params["ca"]["name"], params["ca"]["key"]) == (CA_SECRET, "ca.crt")
    tls_secret = find(managed, "Secret", params["tls"]["name"])
    assert tls_secret["data"][params["tls"]["key"]] == "ZW5hYmxl"  # base64 of "enable"


# ----- compose profile "sentinel" ---------------------------------------------------------------------------------


def test_compose_sentinel_profile(compose_bin, compose_env):  # noqa: F811 - the fixtures imported above
    config = render_compose(compose_bin, compose_env, "--profile", "sentinel", "--env-file",
                            str(REPO / "docker" / "sentinel.env"))
    services = config["services"]
    assert {"redis", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"} <= set(services)
    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1:][:2] == ["redis", "6379"]
    for name in ("sentinel-1", "sentinel-2", "sentinel-3"):
        script = services[name]["command"][0]
        assert f"sentinel monitor {MASTER} redis 6379 2" in script
        assert services[name]["environment"]["SENTINEL_NAME"] == name
        assert services[name]["volumes"][0]["source"] == f"{name}-data"
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["REDIS_SENTINEL_MASTER"] == MASTER
        assert env["REDIS_SENTINELS"] == "sentinel-1:26379,sentinel-2:26379,sentinel-3:26379"
