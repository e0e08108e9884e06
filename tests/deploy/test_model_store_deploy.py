"""The model store's deployments: ``python -m worker.publish`` (their one-shot) against a real SeaweedFS, the compose
profile "s3" and the k8s overlay model-store.

``python -m worker.publish`` runs as a subprocess in a folder outside the checkout, as the worker image runs it:
the checkout's top-level packages that docker/worker.Dockerfile does not COPY (``training``, ``service``, …) cannot
be imported there, as in the image (what the image installs is tested by tests/deploy/test_image_installs.py).
The compose file renders with the Docker Compose v2 binary (tests/deploy/test_compose.py), the overlay with
``kubectl kustomize`` and validates strictly (tests/deploy/test_k8s.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest

from facegen.contract.model_store import ModelStore, ModelStoreSettings, store_location
from facegen.model.checkpoints import BUNDLED_CHECKPOINTS, list_versions, read_manifest
from scripts.processes import free_port
from scripts.s3ctl import S3Server
from tests.deploy.test_compose import compose_bin, compose_env  # noqa: F401 - fixtures
from tests.deploy.test_compose import render as render_compose
from tests.deploy.test_image_installs import LEAKY, read_image
from tests.deploy.test_k8s import (
    API,
    CHECKPOINT_PVC,
    GPU,
    K8S_VERSION,
    NAMESPACE,
    REPO,
    S3_OVERLAY,
    WORKER,
    effective_security,
    find,
    find_prefixed,
    is_crd_object,
    main_container,
    pod_spec,
    quantity_le,
    render,
)
from tests.deploy.test_s3_deploy import API_CREDENTIALS, CREDENTIALS, LIFECYCLE_FILE
from tests.model_store.conftest import (  # noqa: F401 - fixtures
    BUNDLED_DIFFUSION,
    s3_server,
    store,
    store_env,
)

MODEL_STORE_OVERLAY = REPO / "k8s" / "overlays" / "model-store"
S3_ENV_FILE = REPO / "docker" / "s3.env"
WORKER_DOCKERFILE = REPO / "docker" / "worker.Dockerfile"
PUBLISH_JOB = "facegen-model-publish"
BUNDLED_VAE = read_manifest(BUNDLED_CHECKPOINTS / "diffusion" / BUNDLED_DIFFUSION).vae_version
IMAGE_CHECKPOINTS = "/app/checkpoints"  # where the worker image carries the bundled checkpoints
# Settings of the shell that would reach the processes this module starts or the compose file renders.
STORE_VARIABLES = ("MODEL_STORE", "MODEL_STORE_TIMEOUT_S", "CHECKPOINT_DIR", "FACEGEN_CHECKPOINT_DIR",
                   "MODEL_ALIAS_POLL_S", "LOADED_MODELS_MAX_MIB", "MODEL_STORE_CACHE_S")

# `python -m worker.publish ARGS` with the modules named in argv[1] unimportable.
AS_IN_THE_WORKER_IMAGE = """
import importlib.abc, runpy, sys
absent = set(sys.argv[1].split(","))
class NotInTheImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in absent:
            raise ModuleNotFoundError(f"No module named {name!r} (not in the worker image)", name=name)
        return None
sys.meta_path.insert(0, NotInTheImage())
sys.argv = ["python -m worker.publish", *sys.argv[2:]]
runpy.run_module("worker.publish", run_name="__main__", alter_sys=True)
"""


def packages_not_in_the_worker_image() -> list[str]:
    copied = set(read_image("worker").sources)
    packages = [path.name for path in REPO.iterdir() if (path / "__init__.py").is_file()]
    absent = sorted(name for name in packages if name not in copied)
    assert {"training", "service"} <= set(absent) and "worker" not in absent, absent
    return absent


def publish(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m worker.publish ARGS`` in ``cwd`` (outside the checkout) with ``env`` over a clean environment."""
    assert REPO not in cwd.resolve().parents, f"{cwd} is inside the checkout (TMPDIR)"
    base = {k: v for k, v in os.environ.items() if k not in (*LEAKY, *STORE_VARIABLES)}
    absent = ",".join(packages_not_in_the_worker_image())
    return subprocess.run([sys.executable, "-c", AS_IN_THE_WORKER_IMAGE, absent, *args], cwd=cwd,
                          env={**base, **env}, capture_output=True, text=True, timeout=300)


def refs(model_store: ModelStore) -> set[tuple[str, str]]:
    return {(record.kind, record.version) for record in model_store.versions()}


def stored_objects(server: S3Server, model_store: ModelStore) -> dict[str, tuple[str, object]]:
    """``{key: (ETag, LastModified)}`` of every object under the store's prefix."""
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=server.bucket,
                                                                      Prefix=model_store.prefix)
    return {item["Key"]: (item["ETag"], item["LastModified"]) for page in pages for item in page.get("Contents", ())}


def lines_naming(output: str, version: str) -> list[str]:
    return [line for line in output.splitlines() if f"diffusion {version}:" in line]


# ----- python -m worker.publish on a real SeaweedFS ---------------------------------------------------------------


def test_publishes_every_version_and_names_one_only_on_first_start(
        store_env: dict[str, str], store: ModelStore, s3_server: S3Server,  # noqa: F811
        tiny_student_checkpoints: Path, tmp_path: Path) -> None:
    # first start: the default folder (CHECKPOINT_DIR unset: the bundled checkpoints)
    first = publish(store_env, tmp_path)
    assert first.returncode == 0, first.stderr
    assert refs(store) == {("diffusion", BUNDLED_DIFFUSION), ("vae", BUNDLED_VAE)}
    (line,) = lines_naming(first.stderr, BUNDLED_DIFFUSION)
    assert f"published vae {BUNDLED_VAE}, diffusion {BUNDLED_DIFFUSION}" in line, first.stderr
    (move,) = store.alias_history("stable")
    assert (move.version, move.previous) == (BUNDLED_DIFFUSION, None) and move.by.startswith("worker.publish@")

    # another folder, another alias: every diffusion version there is published (a teacher and its student, one
    # line each), and the new alias names the newest plain version, not the newer student; stable stays
    manifests = list_versions(tiny_student_checkpoints, "diffusion")
    (teacher,) = [m.version for m in manifests if m.distillation is None]
    (student,) = [m.version for m in manifests if m.distillation is not None]
    assert manifests[-1].version == student
    second = publish(store_env, tmp_path, "--checkpoints", str(tiny_student_checkpoints), "--alias", "canary")
    assert second.returncode == 0, second.stderr
    assert {("diffusion", teacher), ("diffusion", student)} <= refs(store)
    assert len(lines_naming(second.stderr, teacher)) == len(lines_naming(second.stderr, student)) == 1
    aliases = store.aliases()
    assert (aliases["canary"].version, aliases["stable"].version) == (teacher, BUNDLED_DIFFUSION)

    # an operator moves stable; publishing the bundled folder again writes nothing and leaves stable where it is
    store.set_alias("stable", teacher, "operator@test")
    before = stored_objects(s3_server, store)
    third = publish(store_env, tmp_path)
    assert third.returncode == 0, third.stderr
    assert stored_objects(s3_server, store) == before  # every key, ETag and time of writing
    assert lines_naming(third.stderr, BUNDLED_DIFFUSION) == [
        line for line in third.stderr.splitlines() if "already in the store, nothing uploaded" in line]
    assert f"alias stable points at {teacher} (moved by operator@test" in third.stderr
    assert [m.version for m in store.alias_history("stable")] == [BUNDLED_DIFFUSION, teacher]


def unreachable_store() -> dict[str, str]:
    """A store on a port where nothing listens."""
    return {"MODEL_STORE": "s3://facegen/models", "S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
            "S3_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "facegen", "AWS_SECRET_ACCESS_KEY": "secret"}


@pytest.mark.parametrize(("settings", "empty_folder", "names"), [
    ({}, False, "MODEL_STORE is not set"),
    ({"MODEL_STORE": "https://models.example/prod"}, False, "MODEL_STORE must be s3://bucket/prefix"),
    (unreachable_store(), True, "no diffusion versions under"),
], ids=["no-store", "not-s3", "empty-folder"])
def test_a_misconfiguration_exits_2_with_one_line(settings: dict[str, str], empty_folder: bool, names: str,
                                                  tmp_path: Path) -> None:
    args = ("--checkpoints", str(tmp_path)) if empty_folder else ()
    result = publish(settings, tmp_path, *args)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("worker.publish: ") and names in line, line
    assert result.stdout == ""


def test_an_unreachable_store_exits_1(tmp_path: Path) -> None:
    result = publish(unreachable_store(), tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1].startswith("worker.publish: model store: could not "), result.stderr


# ----- compose: the profile "s3" -----------------------------------------------------------------------------------

PAIRS = {"AWS_ACCESS_KEY_ID": "facegen", "AWS_SECRET_ACCESS_KEY": "worker-secret",
         "S3_API_ACCESS_KEY_ID": "facegen-api", "S3_API_SECRET_ACCESS_KEY": "api-secret"}


@pytest.fixture(scope="module")
def shell(compose_env) -> tuple[dict[str, str], Path]:  # noqa: F811
    """The test environment of test_compose.py, without the model store's variables, with both key pairs."""
    env, env_file = compose_env
    return {**{k: v for k, v in env.items() if k not in STORE_VARIABLES}, **PAIRS}, env_file


def option(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, argv
    return argv[argv.index(name) + 1]


def mount_at(service: dict, target: str) -> dict:
    (mount,) = [m for m in service["volumes"] if m["target"] == target]
    return mount


def covering_mount(service: dict, path: str) -> dict:
    """The volume mount that holds ``path`` (the deepest one)."""
    mounts = [m for m in service["volumes"] if path == m["target"] or path.startswith(m["target"].rstrip("/") + "/")]
    assert mounts, f"nothing mounted at {path}"
    return max(mounts, key=lambda m: len(m["target"]))


def check_store_location(model_store: str, bucket: str, artifact_prefix: str) -> None:
    """The store is in the bucket the deployment makes, outside the prefix its lifecycle rule expires."""
    store_bucket, prefix = store_location(model_store)
    assert store_bucket == bucket
    assert not f"{prefix}/".startswith(artifact_prefix) and artifact_prefix in LIFECYCLE_FILE.read_text()


def test_compose_s3_profile_publishes_the_bundled_model_and_the_worker_pulls_it(compose_bin, shell) -> None:  # noqa: F811
    services = render_compose(compose_bin, shell, "--profile", "s3", "--env-file", str(S3_ENV_FILE))["services"]
    publisher, worker, api = services["model-publish"], services["worker"], services["api"]

    # the one-shot: the worker image, after the bucket, with the worker's pair, on the mounted checkpoints
    assert publisher["image"] == worker["image"] and publisher["build"] == worker["build"]
    command = publisher["command"]
    assert command[:3] == ["python", "-m", "worker.publish"]
    assert publisher["depends_on"] == {"s3-init": {"condition": "service_completed_successfully", "required": True}}
    assert publisher["restart"] == "no"
    source = mount_at(publisher, option(command, "--checkpoints"))
    assert source["read_only"] is True and source["source"] == mount_at(worker, IMAGE_CHECKPOINTS)["source"]
    assert {k: publisher["environment"][k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")} == {
        "AWS_ACCESS_KEY_ID": "facegen", "AWS_SECRET_ACCESS_KEY": "worker-secret"}

    # the worker waits for it, serves the alias it sets, and pulls into a writable volume
    assert worker["depends_on"]["model-publish"] == {"condition": "service_completed_successfully",
                                                     "required": False}
    env = worker["environment"]
    assert env["MODEL_VERSION"] == option(command, "--alias") == "stable"
    cache = covering_mount(worker, env["CHECKPOINT_DIR"])
    assert cache["type"] == "volume" and not cache.get("read_only", False), cache
    assert f"mkdir -p {cache['target']} && chown 10001:10001 {cache['target']}" in WORKER_DOCKERFILE.read_text()

    # one store for the three, in the bucket s3-init makes, each process with its own pair
    stores = {name: services[name]["environment"]["MODEL_STORE"] for name in ("model-publish", "worker", "api")}
    assert len(set(stores.values())) == 1, stores
    check_store_location(env["MODEL_STORE"], services["s3-init"]["environment"]["S3_BUCKET"], env["S3_PREFIX"])
    endpoint = urlsplit(publisher["environment"]["S3_ENDPOINT_URL"])
    assert endpoint.hostname == "seaweedfs"
    (port,) = services["seaweedfs"]["ports"]  # for operators' `training publish` from the host, on loopback only
    assert port["host_ip"] == "127.0.0.1" and port["target"] == endpoint.port
    assert api["environment"]["AWS_ACCESS_KEY_ID"] == "facegen-api"
    settings = ModelStoreSettings(model_store=env["MODEL_STORE"], s3_endpoint_url=env["S3_ENDPOINT_URL"])
    assert settings.model_store == env["MODEL_STORE"]


def test_compose_without_the_profile_serves_the_local_folder(compose_bin, shell) -> None:  # noqa: F811
    services = render_compose(compose_bin, shell)["services"]
    assert "model-publish" not in services
    worker = services["worker"]
    env = worker["environment"]
    assert env["MODEL_STORE"] is None and env["MODEL_VERSION"] == "latest"  # unset: no store
    assert env["CHECKPOINT_DIR"] == IMAGE_CHECKPOINTS
    mount = mount_at(worker, IMAGE_CHECKPOINTS)
    assert mount["type"] == "bind" and mount["read_only"] is True
    assert mount["source"] == str(REPO / "checkpoints")
    assert worker["depends_on"]["model-publish"]["required"] is False
    assert services["api"]["environment"]["MODEL_STORE"] is None


# ----- Kubernetes: the overlay model-store --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def overlay() -> list[dict]:
    return render(MODEL_STORE_OVERLAY)


@pytest.fixture(scope="module")
def config(overlay) -> dict[str, str]:
    return find_prefixed(overlay, "ConfigMap", "facegen-config-")["data"]


def ids(objects: list[dict]) -> set[tuple[str, str]]:
    """Kind and name of each object; a generated ConfigMap's name without its content hash."""
    return {(o["kind"], o["metadata"]["name"].rsplit("-", 1)[0] if o["kind"] == "ConfigMap" else o["metadata"]["name"])
            for o in objects}


def test_every_object_validates_strictly_in_the_namespace(overlay) -> None:
    failures = []
    for obj in overlay:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"
        if is_crd_object(obj):
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
    assert not failures, "\n".join(failures)


def test_overlay_is_the_s3_overlay_with_a_publish_job_and_no_checkpoint_volume(overlay) -> None:
    assert ids(overlay) == ids(render(S3_OVERLAY)) - {("PersistentVolumeClaim", CHECKPOINT_PVC)} | {("Job", PUBLISH_JOB)}


def test_workers_serve_the_alias_from_the_store_through_an_empty_dir(overlay, config, monkeypatch) -> None:
    assert config["MODEL_VERSION"] == "stable" and float(config["MODEL_ALIAS_POLL_S"]) > 0
    for name, value in config.items():
        monkeypatch.setenv(name, value)
    settings = ModelStoreSettings()  # what the worker, the API and the Job parse from it
    check_store_location(settings.model_store, config["S3_BUCKET"], config["S3_PREFIX"])

    worker = find(overlay, "Deployment", WORKER)
    spec = pod_spec(worker)
    assert "initContainers" not in spec  # nothing seeds a volume
    container = main_container(worker)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == config["CHECKPOINT_DIR"]]
    assert not mount.get("readOnly", False)  # pulls write there
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert set(volume) == {"name", "emptyDir"}
    assert all(v.get("persistentVolumeClaim", {}).get("claimName") != CHECKPOINT_PVC for v in spec["volumes"])
    secrets = [source["secretRef"]["name"] for source in container["envFrom"] if "secretRef" in source]
    assert CREDENTIALS in secrets and API_CREDENTIALS not in secrets
    api_secrets = [s["secretRef"]["name"] for s in main_container(find(overlay, "Deployment", API))["envFrom"]
                   if "secretRef" in s]
    assert API_CREDENTIALS in api_secrets and CREDENTIALS not in api_secrets  # lists the store, read-only


def test_the_publish_job_runs_worker_publish_from_the_worker_image(overlay, config) -> None:
    job = find(overlay, "Job", PUBLISH_JOB)
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["image"] == main_container(find(overlay, "Deployment", WORKER))["image"]
    command = container["command"]
    assert command[:3] == ["python", "-m", "worker.publish"]
    assert option(command, "--alias") == config["MODEL_VERSION"]
    assert option(command, "--checkpoints") == IMAGE_CHECKPOINTS  # the image's own: the Job mounts nothing there
    assert f"COPY checkpoints/ {IMAGE_CHECKPOINTS}/" in WORKER_DOCKERFILE.read_text()
    assert all(m["mountPath"] != IMAGE_CHECKPOINTS for m in container.get("volumeMounts", []))
    config_name = find_prefixed(overlay, "ConfigMap", "facegen-config-")["metadata"]["name"]
    assert container["envFrom"] == [{"configMapRef": {"name": config_name}}, {"secretRef": {"name": CREDENTIALS}}]

    # retried while the store is unreachable (exit 1), failed at once when misconfigured (exit 2)
    assert spec["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] > 0
    (rule,) = job["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob"
    assert rule["onExitCodes"] == {"containerName": container["name"], "operator": "In", "values": [2]}

    resources = container["resources"]
    assert GPU not in resources["limits"]
    for resource in ("cpu", "memory"):
        assert quantity_le(resources["requests"][resource], resources["limits"][resource])
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert effective_security(job, container, "runAsNonRoot") is True  # a Job's pod template is where a workload's is
    assert effective_security(job, container, "runAsUser") > 0
