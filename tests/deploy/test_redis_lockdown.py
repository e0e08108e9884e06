"""docker-compose.yml and the kustomizations run Redis locked down: redis-server started by k8s/base/redis/start.sh
with the ACL k8s/base/redis/users.acl (one folder, mounted by compose and generated into a ConfigMap by kustomize),
the password from .env (compose) or the Secret facegen-redis (k8s), maxmemory below the container's limit with
noeviction; every facegen process connects as the user facegen; a NetworkPolicy admits only facegen's pods.
What the ACL allows and refuses at run time: tests/deploy/test_redis_acl.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.deploy.test_compose import REDIS_PASSWORD, compose_bin, compose_env, run_compose  # noqa: F401 - fixtures
from tests.deploy.test_compose import render as render_compose
from tests.deploy.test_k8s import (
    API,
    BASE,
    KEDA_OVERLAY,
    REDIS,
    REPO,
    S3_OVERLAY,
    WEBHOOKS,
    WORKER,
    find,
    main_container,
    pod_spec,
    quantity_value,
    render,
    workloads,
)

ACL_DIR = REPO / "k8s" / "base" / "redis"
SCRIPT_DIR = "/etc/facegen/redis"  # where compose and k8s mount ACL_DIR
START = ["sh", f"{SCRIPT_DIR}/start.sh"]
USER = "facegen"
SECRET = "facegen-redis"
FACEGEN_PODS = {API, WORKER, WEBHOOKS}
OVERLAYS = {"base": BASE, "keda": KEDA_OVERLAY, "s3": S3_OVERLAY,
            "redis-sentinel": REPO / "k8s" / "overlays" / "redis-sentinel"}
MANAGED_OVERLAY = REPO / "k8s" / "overlays" / "managed-redis"
REDIS_UNITS = {"kb": 2**10, "mb": 2**20, "gb": 2**30}


def redis_bytes(value: str) -> int:
    """A redis-server memory argument in bytes: ``768mb`` -> 805306368."""
    number, unit = re.fullmatch(r"(\d+)([kmg]b)", value.lower()).groups()
    return int(number) * REDIS_UNITS[unit]


def option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def test_the_acl_names_only_the_facegen_prefixes_and_turns_the_default_user_off() -> None:
    users = {line.split()[1]: line.split()[2:] for line in (ACL_DIR / "users.acl").read_text().splitlines()
             if line.startswith("user ")}
    assert set(users) == {"default", USER, "replication", "admin"}
    assert users["default"][0] == "off"
    facegen = users[USER]
    assert [rule for rule in facegen if rule.startswith(("~", "%", "&"))] == ["~rq:*", "~facegen:*", "&rq:pubsub:*"]
    assert "allkeys" not in facegen and "+@all" not in facegen and "-@all" in facegen
    for dangerous in ("+flushall", "+flushdb", "+config", "+keys", "+debug", "+acl", "+module", "+shutdown"):
        assert dangerous not in facegen
    assert "allkeys" not in users["replication"] and "resetkeys" in users["replication"]


# ----- Docker Compose ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose(compose_bin, compose_env) -> dict:  # noqa: F811 - the fixtures imported above
    return render_compose(compose_bin, compose_env, "--profile", "webhooks")["services"]


def test_compose_starts_redis_with_the_acl_and_noeviction(compose) -> None:
    redis = compose["redis"]
    command = redis["command"]
    assert command[:2] == START
    assert option(command, "--maxmemory-policy") == "noeviction"
    assert redis_bytes(option(command, "--maxmemory")) == 2 * 2**30  # REDIS_MAXMEMORY's default (DEPLOYMENT.md)
    mounts = {v["target"]: v for v in redis["volumes"]}
    assert Path(mounts[SCRIPT_DIR]["source"]) == ACL_DIR and mounts[SCRIPT_DIR]["read_only"] is True
    assert redis["environment"]["REDIS_PASSWORD"] == REDIS_PASSWORD
    assert "/run/redis" in redis["tmpfs"]  # the ACL with the password's hash lives in memory
    assert redis["user"] == "999:999" and redis["read_only"] is True and redis["cap_drop"] == ["ALL"]
    assert "--user facegen" in " ".join(redis["healthcheck"]["test"])


def test_compose_processes_connect_as_the_facegen_user(compose) -> None:
    for name in ("api", "worker", "webhooks"):
        env = compose[name]["environment"]
        assert (env["REDIS_USERNAME"], env["REDIS_PASSWORD"]) == (USER, REDIS_PASSWORD), name


def test_compose_without_a_redis_password_stops_with_a_clear_error(compose_bin, compose_env) -> None:  # noqa: F811
    env, env_file = compose_env
    without = {k: v for k, v in env.items() if k != "REDIS_PASSWORD"}
    proc = run_compose(compose_bin, (without, env_file), "config", "--quiet")
    assert proc.returncode != 0
    assert "REDIS_PASSWORD" in proc.stderr and ".env" in proc.stderr, proc.stderr


def test_compose_sentinel_profile_replicates_as_the_replication_user(compose_bin, compose_env) -> None:  # noqa: F811
    services = render_compose(compose_bin, compose_env, "--profile", "sentinel", "--env-file",
                              str(REPO / "docker" / "sentinel.env"))["services"]
    replica, primary = services["redis-replica"]["command"], services["redis"]["command"]
    assert replica[:len(primary)] == primary and option(replica, "--replicaof") == "redis"  # same ACL and limits
    for name in ("redis", "redis-replica", "sentinel-1"):
        assert "REDIS_REPLICATION_PASSWORD" in services[name]["environment"], name
    script = services["sentinel-2"]["command"][0]
    assert "sentinel auth-user facegen replication" in script and "$$REDIS_REPLICATION_PASSWORD" in script


# ----- Kubernetes -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def rendered(request) -> list[dict]:
    return render(OVERLAYS[request.param])


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return render(BASE)


def matches(selector: dict, labels: dict) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) selects these labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        held = {"In": present and labels[key] in values, "NotIn": not present or labels[key] not in values,
                "Exists": present, "DoesNotExist": not present}[operator]
        if not held:
            return False
    return True


def pods_selected(objects: list[dict], selector: dict) -> set[str]:
    assert selector, "an empty selector selects every pod"
    return {w["metadata"]["name"] for w in workloads(objects)
            if matches(selector, w["spec"]["template"]["metadata"].get("labels", {}))}


def test_redis_runs_start_sh_from_the_acl_config_map(rendered) -> None:
    redis = find(rendered, "StatefulSet", REDIS)
    container = main_container(redis)
    argv = container["command"] + container["args"]
    assert argv[:2] == START or f"exec sh {SCRIPT_DIR}/start.sh \"$@\"" in container["command"][2]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(redis)["volumes"]}
    config_map = volumes[mounts[SCRIPT_DIR]["name"]]["configMap"]["name"]
    data = find(rendered, "ConfigMap", config_map)["data"]
    for name in ("users.acl", "start.sh"):  # the same files as compose mounts
        assert data[name] == (ACL_DIR / name).read_text(), name
    assert volumes[mounts["/run/redis"]["name"]]["emptyDir"]["medium"] == "Memory"
    (password,) = [e for e in container["env"] if e["name"] == "REDIS_PASSWORD"]
    assert password["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": "REDIS_PASSWORD"}  # required


def test_redis_maxmemory_is_below_the_memory_limit_with_noeviction(rendered) -> None:
    container = main_container(find(rendered, "StatefulSet", REDIS))
    args = container["args"]
    assert option(args, "--maxmemory-policy") == "noeviction"
    limit = quantity_value(container["resources"]["limits"]["memory"])
    assert 0 < redis_bytes(option(args, "--maxmemory")) <= 0.8 * limit  # room for the AOF rewrite's fork


def test_facegen_pods_read_the_redis_credentials(rendered) -> None:
    for name in FACEGEN_PODS:
        secrets = [s["secretRef"]["name"] for s in main_container(find(rendered, "Deployment", name))["envFrom"]
                   if "secretRef" in s]
        assert secrets.count(SECRET) == 1, name


def test_network_policy_admits_only_facegen_pods_to_redis(base) -> None:
    (policy,) = [o for o in base if o["kind"] == "NetworkPolicy"]
    spec = policy["spec"]
    assert pods_selected(base, spec["podSelector"]) == {REDIS}
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    assert [p["port"] for p in rule["ports"]] == [6379]
    admitted = set()
    for peer in rule["from"]:
        assert set(peer) == {"podSelector"}, peer  # pods of this namespace only: no namespaceSelector, no ipBlock
        admitted |= pods_selected(base, peer["podSelector"])
    assert admitted == FACEGEN_PODS


def test_keda_and_sentinel_overlays_admit_their_own_redis_clients() -> None:
    keda = render(KEDA_OVERLAY)
    (extra,) = [o for o in keda if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] != REDIS]
    (peer,) = extra["spec"]["ingress"][0]["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "keda"}
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "keda-operator"}
    trigger = find(keda, "ScaledObject", WORKER)["spec"]["triggers"][0]
    auth = find(keda, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert {(r["parameter"], r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]} == {
        ("username", SECRET, "REDIS_USERNAME"), ("password", SECRET, "REDIS_PASSWORD")}

    sentinel = render(OVERLAYS["redis-sentinel"])
    (replication,) = [o for o in sentinel if o["kind"] == "NetworkPolicy"
                      and o["metadata"]["name"] not in (REDIS, extra["metadata"]["name"])]
    assert pods_selected(sentinel, replication["spec"]["podSelector"]) == {REDIS}
    (peer,) = replication["spec"]["ingress"][0]["from"]
    assert pods_selected(sentinel, peer["podSelector"]) == {REDIS, "redis-sentinel"}


def test_managed_redis_drops_the_in_cluster_redis_config_and_policies() -> None:
    managed = render(MANAGED_OVERLAY)
    assert not [o for o in managed if o["kind"] == "NetworkPolicy" or o["metadata"]["name"].startswith("redis")]
    for name in FACEGEN_PODS:  # the webhook sender too reaches the managed Redis with its CA
        mounts = [m["mountPath"] for m in main_container(find(managed, "Deployment", name))["volumeMounts"]]
        assert "/etc/facegen/redis-tls" in mounts, name
