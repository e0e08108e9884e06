"""The kustomize base and the KEDA overlay render, validate, and keep their production properties.

Rendering is ``kubectl kustomize`` (offline). Every built-in object is validated with kubernetes-validate in
strict mode (unknown fields are errors) against its bundled schemas for ``K8S_VERSION``; the two custom
resources (Prometheus Operator PodMonitor, KEDA ScaledObject) have no bundled schema, so their required fields
are checked here.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions, major_minor

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "k8s" / "base"
KEDA_OVERLAY = REPO / "k8s" / "overlays" / "keda"
S3_OVERLAY = REPO / "k8s" / "overlays" / "s3"

K8S_VERSION = "1.32.0"
NAMESPACE = "facegen"
API = "facegen-api"
WORKER = "facegen-worker"
WEBHOOKS = "facegen-webhooks"
REDIS = "redis"
CHECKPOINT_PVC = "facegen-checkpoints"
QUEUE_LIST = "rq:queue:facegen"
GPU = "nvidia.com/gpu"
CRD_GROUPS = {"monitoring.coreos.com", "keda.sh"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet"}


# ----- rendering and lookup ---------------------------------------------------------------------------------------


def kubectl() -> str:
    path = shutil.which("kubectl") or ("/usr/bin/kubectl" if Path("/usr/bin/kubectl").is_file() else None)
    if path is None:
        pytest.fail(
            "kubectl is not on PATH (nor at /usr/bin/kubectl); these tests render with `kubectl kustomize`"
        )
    return path


def render(directory: Path) -> list[dict]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed:\n{proc.stderr}"
    objects = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    assert objects, f"kubectl kustomize {directory} rendered nothing"
    return objects


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return render(BASE)


@pytest.fixture(scope="module")
def keda() -> list[dict]:
    return render(KEDA_OVERLAY)


@pytest.fixture(scope="module")
def s3() -> list[dict]:
    return render(S3_OVERLAY)


@pytest.fixture(scope="module", params=["base", "keda", "s3"])
def rendered(request, base, keda, s3) -> list[dict]:
    return {"base": base, "keda": keda, "s3": s3}[request.param]


def api_group(obj: dict) -> str:
    api_version = obj["apiVersion"]
    return api_version.split("/")[0] if "/" in api_version else ""


def is_crd_object(obj: dict) -> bool:
    return api_group(obj) in CRD_GROUPS


def find(objects: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected exactly one {kind}/{name}, found {len(matches)}"
    return matches[0]


def find_prefixed(objects: list[dict], kind: str, prefix: str) -> dict:
    """ConfigMaps from a generator carry a content-hash suffix: ``facegen-config-<hash>``."""
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(prefix)]
    assert len(matches) == 1, f"expected exactly one {kind} named {prefix}*, found {len(matches)}"
    return matches[0]


def workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in WORKLOAD_KINDS]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict, init: bool = True) -> list[dict]:
    spec = pod_spec(workload)
    return spec["containers"] + (spec.get("initContainers", []) if init else [])


def main_container(workload: dict) -> dict:
    main = pod_spec(workload)["containers"]
    assert len(main) == 1, f"{workload['metadata']['name']}: expected one main container, found {len(main)}"
    return main[0]


def container_port(container: dict, port: int | str) -> int:
    """Resolve a probe/Service port (number or port name) to the container's port number."""
    if isinstance(port, int):
        assert any(p["containerPort"] == port for p in container.get("ports", [])), f"{port} not exposed"
        return port
    named = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert named, f"container {container['name']} has no port named {port!r}"
    return named[0]


def selected_workloads(objects: list[dict], match_labels: dict) -> list[dict]:
    assert match_labels, "empty selector would select everything"
    return [
        w
        for w in workloads(objects)
        if match_labels.items() <= w["spec"]["template"]["metadata"].get("labels", {}).items()
    ]


# ----- schema validation ------------------------------------------------------------------------------------------


def test_validator_bundles_the_chosen_kubernetes_version():
    assert major_minor(K8S_VERSION) in {major_minor(v) for v in all_versions()}, all_versions()


def test_every_builtin_object_validates_strictly(rendered):
    failures = []
    for obj in rendered:
        if is_crd_object(obj):
            continue
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            failures.append(f"{name}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            failures.append(f"{name}: {e.message}")
    assert not failures, "\n".join(failures)


def test_strict_validation_rejects_an_unknown_field(base):
    """Negative control: a misspelt field (readinessprobe) must fail, so passing validation means something."""
    broken = copy.deepcopy(find(base, "Deployment", API))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_custom_resources_are_only_the_expected_ones(base, keda):
    crds = lambda objects: {(o["kind"], o["metadata"]["name"]) for o in objects if is_crd_object(o)}  # noqa: E731
    assert crds(base) == {("PodMonitor", API), ("PodMonitor", WORKER), ("PodMonitor", WEBHOOKS)}
    assert crds(keda) == crds(base) | {("ScaledObject", WORKER), ("TriggerAuthentication", "facegen-redis")}


def test_everything_lives_in_the_facegen_namespace(rendered):
    find(rendered, "Namespace", NAMESPACE)
    for obj in rendered:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"


def test_selectors_select_what_they_should(rendered):
    for workload in workloads(rendered):
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selected_workloads(rendered, selector) == [workload], workload["metadata"]["name"]
    for service in (o for o in rendered if o["kind"] == "Service"):
        targets = selected_workloads(rendered, service["spec"]["selector"])
        assert len(targets) == 1, f"Service {service['metadata']['name']} selects {len(targets)} workloads"
        for port in service["spec"]["ports"]:
            container_port(main_container(targets[0]), port.get("targetPort", port["port"]))
    for pdb in (o for o in rendered if o["kind"] == "PodDisruptionBudget"):
        assert len(selected_workloads(rendered, pdb["spec"]["selector"]["matchLabels"])) == 1


# ----- API --------------------------------------------------------------------------------------------------------


def test_api_deployment(rendered):
    api = find(rendered, "Deployment", API)
    assert api["spec"]["replicas"] == 2
    container = main_container(api)
    readiness, liveness = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz"
    assert liveness["path"] == "/healthz"
    assert container_port(container, readiness["port"]) == 8000
    assert container_port(container, liveness["port"]) == 8000
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert effective_security(api, container, "runAsNonRoot") is True
    assert effective_security(api, container, "runAsUser") == 10001
    tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp, "the read-only API container needs a writable /tmp"
    volumes = {v["name"]: v for v in pod_spec(api)["volumes"]}
    assert "emptyDir" in volumes[tmp[0]["name"]]


def test_api_needs_its_keys_from_a_secret(rendered):
    """Never an open API in the cluster: the pods start only once the Secret holds API_KEYS (the API binds
    0.0.0.0, where `python -m service` also refuses to serve without keys)."""
    container = main_container(find(rendered, "Deployment", API))
    assert "--host" in container["command"] and "0.0.0.0" in container["command"]
    secret = secret_env(container, "API_KEYS")
    assert secret["name"] == "facegen-api-keys" and not secret.get("optional", False)
    assert "ALLOW_OPEN_API" not in {e["name"] for e in container.get("env", [])}


def test_api_service_maps_80_to_8000(rendered):
    service = find(rendered, "Service", API)
    api = selected_workloads(rendered, service["spec"]["selector"])
    assert api == [find(rendered, "Deployment", API)]
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80
    assert container_port(main_container(api[0]), port["targetPort"]) == 8000


def test_disruption_budgets(rendered):
    api_pdb = find(rendered, "PodDisruptionBudget", API)
    assert api_pdb["spec"]["minAvailable"] == 1
    assert selected_workloads(rendered, api_pdb["spec"]["selector"]["matchLabels"]) == [
        find(rendered, "Deployment", API)
    ]
    worker_pdb = find(rendered, "PodDisruptionBudget", WORKER)
    assert selected_workloads(rendered, worker_pdb["spec"]["selector"]["matchLabels"]) == [
        find(rendered, "Deployment", WORKER)
    ]
    assert "minAvailable" in worker_pdb["spec"] or "maxUnavailable" in worker_pdb["spec"]


# ----- worker -----------------------------------------------------------------------------------------------------


def test_worker_gets_one_gpu_on_a_gpu_node(rendered):
    worker = find(rendered, "Deployment", WORKER)
    resources = main_container(worker)["resources"]
    assert int(resources["limits"][GPU]) == 1
    if GPU in resources.get("requests", {}):  # extended resources: requests must equal limits
        assert int(resources["requests"][GPU]) == 1
    spec = pod_spec(worker)
    assert any(
        t.get("key") == GPU
        and t.get("effect") == "NoSchedule"
        and (t.get("operator") == "Exists" or (t.get("operator", "Equal") == "Equal" and "value" in t))
        for t in spec.get("tolerations", [])
    ), spec.get("tolerations")
    assert any(key.startswith("nvidia.com/") for key in spec.get("nodeSelector", {})), spec.get(
        "nodeSelector"
    )
    # only the worker asks for a GPU
    for other in workloads(rendered):
        if other is not worker:
            for c in containers(other):
                assert GPU not in c.get("resources", {}).get("limits", {}), other["metadata"]["name"]


def test_worker_checkpoints_metrics_and_probes(rendered):
    worker = find(rendered, "Deployment", WORKER)
    container = main_container(worker)
    volumes = {v["name"]: v for v in pod_spec(worker)["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    checkpoint_volume = volumes[mounts["/app/checkpoints"]["name"]]
    assert checkpoint_volume["persistentVolumeClaim"]["claimName"] == CHECKPOINT_PVC
    find(rendered, "PersistentVolumeClaim", CHECKPOINT_PVC)
    cache_volume = volumes[mounts["/cache"]["name"]]  # the image's inductor/Triton cache dirs, kept across pods
    find(rendered, "PersistentVolumeClaim", cache_volume["persistentVolumeClaim"]["claimName"])
    assert {"name": "metrics", "containerPort": 9100} in [
        {k: p[k] for k in ("name", "containerPort") if k in p} for p in container["ports"]
    ]
    for probe in ("startupProbe", "livenessProbe"):  # the main loop's liveness, not the metrics thread's
        assert container[probe]["httpGet"]["path"] == "/healthz"
        assert container_port(container, container[probe]["httpGet"]["port"]) == 9100
    assert container["command"] == ["python", "-m", "worker"]


def test_shared_config_map(rendered):
    config = find_prefixed(rendered, "ConfigMap", "facegen-config")
    data = config["data"]
    assert data["REDIS_URL"].startswith(f"redis://{REDIS}:6379/")
    assert data["QUEUES"] == "facegen"
    assert data["CHECKPOINT_DIR"] == "/app/checkpoints"
    assert data["METRICS_PORT"] == "9100"
    for name in (API, WORKER):
        refs = [
            e["configMapRef"]["name"]
            for e in main_container(find(rendered, "Deployment", name)).get("envFrom", [])
            if "configMapRef" in e
        ]
        assert config["metadata"]["name"] in refs, f"{name} does not read {config['metadata']['name']}"


# ----- webhooks ---------------------------------------------------------------------------------------------------


def secret_env(container: dict, name: str) -> dict:
    (entry,) = [e for e in container.get("env", []) if e["name"] == name]
    return entry["valueFrom"]["secretKeyRef"]


def test_webhook_delivery_runs_the_api_image_with_the_signing_secret(rendered):
    webhooks = find(rendered, "Deployment", WEBHOOKS)
    container = main_container(webhooks)
    assert container["command"] == ["python", "-m", "service.webhooks"]
    assert container["image"].split(":")[0] == main_container(find(rendered, "Deployment", API))["image"].split(":")[0]
    assert GPU not in container["resources"]["limits"]
    secret = secret_env(container, "WEBHOOK_SECRET")
    assert secret["name"] == WEBHOOKS and not secret.get("optional", False)  # never runs unsigned
    api_secret = secret_env(main_container(find(rendered, "Deployment", API)), "WEBHOOK_SECRET")
    assert api_secret == {**secret, "optional": True}  # the API refuses webhooks until the Secret exists
    assert container["livenessProbe"]["httpGet"]["path"] == "/metrics"
    assert container_port(container, container["livenessProbe"]["httpGet"]["port"]) == 9101
    assert {"name": "WEBHOOK_METRICS_PORT", "value": "9101"} in container["env"]
    refs = [e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e]
    assert find_prefixed(rendered, "ConfigMap", "facegen-config")["metadata"]["name"] in refs  # same Redis


# ----- Redis ------------------------------------------------------------------------------------------------------


def test_redis_statefulset_is_durable(rendered):
    redis = find(rendered, "StatefulSet", REDIS)
    assert redis["spec"]["replicas"] == 1
    container = main_container(redis)
    argv = container.get("command", []) + container.get("args", [])
    assert "--appendonly" in argv and argv[argv.index("--appendonly") + 1] == "yes", argv
    assert "--appendfsync" in argv and argv[argv.index("--appendfsync") + 1] == "everysec", argv
    claims = {t["metadata"]["name"] for t in redis["spec"].get("volumeClaimTemplates", [])}
    assert claims, "Redis needs a PersistentVolumeClaim template"
    data_mounts = [m for m in container["volumeMounts"] if m["name"] in claims]
    assert [m["mountPath"] for m in data_mounts] == ["/data"]
    service = find(rendered, "Service", redis["spec"]["serviceName"])
    assert service["spec"].get("clusterIP") == "None", "the governing Service of a StatefulSet is headless"
    assert [p["port"] for p in service["spec"]["ports"]] == [6379]
    assert selected_workloads(rendered, service["spec"]["selector"]) == [redis]


# ----- every container --------------------------------------------------------------------------------------------


def effective_security(workload: dict, container: dict, field: str):
    """A container's securityContext field, falling back to the pod's."""
    value = container.get("securityContext", {}).get(field)
    return value if value is not None else pod_spec(workload).get("securityContext", {}).get(field)


def test_every_container_has_requests_limits_and_runs_as_non_root(rendered):
    checked = 0
    for workload in workloads(rendered):
        for container in containers(workload):
            where = f"{workload['metadata']['name']}/{container['name']}"
            resources = container.get("resources", {})
            for kind in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resource in resources.get(kind, {}), f"{where}: no {kind}.{resource}"
            for resource in ("cpu", "memory"):
                assert quantity_le(resources["requests"][resource], resources["limits"][resource]), where
            assert effective_security(workload, container, "runAsNonRoot") is True, where
            uid = effective_security(workload, container, "runAsUser")
            assert isinstance(uid, int) and uid > 0, f"{where}: runAsUser {uid!r}"
            assert container.get("securityContext", {}).get("allowPrivilegeEscalation") is False, where
            assert container.get("securityContext", {}).get("capabilities", {}).get("drop") == ["ALL"], where
            checked += 1
    assert checked >= 4  # api, worker (+ its init container), redis


_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity_value(value) -> float:
    """A Kubernetes quantity as a number: "250m" -> 0.25, "2" -> 2.0, "256Mi" -> 268435456.0."""
    text = str(value)
    for suffix, factor in _BINARY.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def quantity_le(request, limit) -> bool:
    return quantity_value(request) <= quantity_value(limit)


# ----- Prometheus -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [API, WORKER, WEBHOOKS])
def test_pod_monitor_scrapes_the_metrics_port(rendered, name):
    monitor = find(rendered, "PodMonitor", name)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"] == name
    targets = selected_workloads(rendered, monitor["spec"]["selector"]["matchLabels"])
    assert targets == [find(rendered, "Deployment", name)]
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert endpoints, "PodMonitor without podMetricsEndpoints scrapes nothing"
    expected_port = {API: 8000, WORKER: 9100, WEBHOOKS: 9101}[name]
    for endpoint in endpoints:
        assert endpoint.get("path", "/metrics") == "/metrics"
        assert container_port(main_container(targets[0]), endpoint["port"]) == expected_port


@pytest.mark.parametrize(("name", "port"), [(API, 8000), (WORKER, 9100), (WEBHOOKS, 9101)])
def test_prometheus_annotations(rendered, name, port):
    workload = find(rendered, "Deployment", name)
    annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true"
    assert annotations.get("prometheus.io/port") == str(port)
    assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"
    container_port(main_container(workload), port)


# ----- KEDA overlay -----------------------------------------------------------------------------------------------


def test_overlay_is_the_base_plus_a_scaled_object(base, keda):
    ids = lambda objects: {(o["kind"], o["metadata"]["name"]) for o in objects}  # noqa: E731
    # the scaler's credentials and the policy that lets KEDA's operator reach Redis come with it
    assert ids(keda) == ids(base) | {("ScaledObject", WORKER), ("TriggerAuthentication", "facegen-redis"),
                                     ("NetworkPolicy", "redis-from-keda")}


def test_scaled_object_scales_the_worker_on_the_rq_queue(keda):
    scaled = find(keda, "ScaledObject", WORKER)
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["metadata"]["namespace"] == NAMESPACE
    target = scaled["spec"]["scaleTargetRef"]
    assert target["name"] == find(keda, "Deployment", WORKER)["metadata"]["name"]
    assert target.get("kind", "Deployment") == "Deployment"
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "redis"
    meta = trigger["metadata"]
    assert meta["listName"] == QUEUE_LIST
    host, port = meta["address"].rsplit(":", 1)
    assert host == f"{REDIS}.{NAMESPACE}.svc" and port == "6379"
    find(keda, "Service", REDIS)  # the address points at a Service that exists
    assert int(meta["listLength"]) > 0
    low, high = scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]
    # The API's /readyz needs a live worker: scaling to zero would take the API out of its Service for good.
    assert low >= 1 and high >= low


def test_overlay_hands_worker_replicas_to_keda(base, keda):
    assert "replicas" in find(base, "Deployment", WORKER)["spec"]
    assert "replicas" not in find(keda, "Deployment", WORKER)["spec"]
    assert find(keda, "Deployment", API)["spec"]["replicas"] == 2
