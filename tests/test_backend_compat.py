"""The compiled pipelines only use what the oldest supported Kubeflow Pipelines backend reads.

The backend reads the package with protobuf types (``protojson``, unknown fields refused), so
every key of the compiled YAML is checked against the field lists of the floor release
(``pipeline.cluster.KFP_BACKEND_FLOOR``), derived from kubeflow/pipelines' .proto files at
the commits that release compiles (``tests/data/kfp_backend/``). The driver's resource
fields are checked too: a field the proto knows but the driver ignores drops the request.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import cluster
from pipeline.compile import VARIANTS, compile_pipeline

DATA = Path(__file__).parent / "data" / "kfp_backend"
ROOT = Path(__file__).resolve().parents[1]
# google.protobuf.Struct fields the backend decodes again as a message.
STRUCT_AS = {
    ("ml_pipelines.PipelineSpec", "deploymentSpec"): "ml_pipelines.PipelineDeploymentConfig",
    (
        "ml_pipelines.PlatformDeploymentConfig",
        "executors",
    ): "kfp_kubernetes.KubernetesExecutorConfig",
}
SCALAR_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "bool": (bool,),
    "bytes": (str,),
    "enum": (str, int),
}


def _fields(tag: str) -> dict[str, dict[str, str]]:
    return yaml.safe_load((DATA / f"fields-{tag}.yaml").read_text())["messages"]


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def unknown_fields(value: Any, message: str, fields: dict[str, dict[str, str]]) -> list[str]:
    """Paths of the keys (and wrongly typed values) ``message`` does not accept."""
    problems: list[str] = []

    def check(node: Any, type_name: str, path: str, owner: tuple[str, str] | None) -> None:
        if type_name.endswith("[]"):
            if not isinstance(node, list):
                problems.append(f"{path}: expected a list")
                return
            for i, item in enumerate(node):
                check(item, type_name[:-2], f"{path}[{i}]", owner)
            return
        if type_name.startswith("map:"):
            if not isinstance(node, dict):
                problems.append(f"{path}: expected a map")
                return
            for key, item in node.items():
                check(item, type_name[4:], f"{path}.{key}", owner)
            return
        if type_name == "struct" and owner in STRUCT_AS:
            type_name = STRUCT_AS[owner]
        if type_name in ("struct", "value", "list_value"):
            return  # free-form JSON
        if type_name in SCALAR_TYPES:
            if not isinstance(node, SCALAR_TYPES[type_name]):
                problems.append(f"{path}: expected {type_name}, got {node!r}")
            return
        if type_name not in fields:  # numbers: JSON numbers or numeric strings
            if isinstance(node, bool) or not isinstance(node, int | float | str):
                problems.append(f"{path}: expected a number ({type_name}), got {node!r}")
            return
        if not isinstance(node, dict):
            problems.append(f"{path}: expected a {type_name} object, got {node!r}")
            return
        declared = fields[type_name]
        for key, item in node.items():
            name = _camel(key)  # protojson takes the JSON name or the proto name
            if name not in declared:
                problems.append(f"{path}.{key}: unknown field of {type_name}")
                continue
            check(item, declared[name], f"{path}.{key}", (type_name, name))

    check(value, message, "", None)
    return problems


def _package(variant: str, tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    docs = list(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", variant).read_text()))
    return docs[0], docs[1] if len(docs) > 1 else {}


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, dict]]:
    return {v: _package(v, tmp_path_factory.mktemp(v)) for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_compiled_pipeline_uses_only_fields_the_floor_backend_knows(packages, variant) -> None:
    fields = _fields(cluster.KFP_BACKEND_FLOOR)
    spec, platform = packages[variant]
    assert unknown_fields(spec, "ml_pipelines.PipelineSpec", fields) == []
    assert platform, "the Kubernetes settings (Secrets, placement) are missing"
    assert unknown_fields(platform, "ml_pipelines.PlatformSpec", fields) == []


def test_the_check_refuses_what_the_release_before_the_floor_refuses(packages) -> None:
    """Backend 2.4.1 rejects what kfp-kubernetes 1.5 writes for Secrets and GPU placement."""
    _, platform = packages["cluster"]
    problems = unknown_fields(platform, "ml_pipelines.PlatformSpec", _fields("2.4.1"))
    assert {p.split(": ")[0].rsplit(".", 1)[1] + ": " + p.split(": ")[1] for p in problems} == {
        "secretNameParameter: unknown field of kfp_kubernetes.SecretAsEnv",
        "nodeSelectorJson: unknown field of kfp_kubernetes.NodeSelector",
        "tolerationJson: unknown field of kfp_kubernetes.Toleration",
    }
    # And a field nobody knows is caught wherever it is nested.
    spec, _ = packages["cluster"]
    bad = yaml.safe_load(yaml.safe_dump(spec))
    bad["root"]["dag"]["tasks"]["convert-data"]["cachingOptions"]["cacheTtl"] = "1d"
    caching = _fields("2.5.0")["ml_pipelines.PipelineTaskSpec"]["cachingOptions"]
    assert unknown_fields(bad, "ml_pipelines.PipelineSpec", _fields("2.5.0")) == [
        f".root.dag.tasks.convert-data.cachingOptions.cacheTtl: unknown field of {caching}"
    ]


def test_the_floor_driver_reads_every_resource_field_the_pipeline_sets(packages) -> None:
    """The GPU count is a run parameter: only drivers reading ``resourceCount`` request it."""
    reads = yaml.safe_load((DATA / "driver-resources.yaml").read_text())
    spec, _ = packages["cluster"]
    train = spec["deploymentSpec"]["executors"]["exec-train-model"]["container"]["resources"]
    accelerator = {k for k, v in train["accelerator"].items() if v}
    floor = reads[cluster.KFP_BACKEND_FLOOR]
    assert set(train) <= set(floor["resources"])
    assert accelerator <= set(floor["accelerator"])
    # Backend 2.3 knows only the integer count: the parameterised GPU request would vanish.
    assert "resourceCount" in accelerator
    assert "resourceCount" not in reads["2.3.0"]["accelerator"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parameterised_resources_are_string_parameters(packages, variant) -> None:
    """Drivers 2.5 through 2.17 resolve a ``{{$.inputs.parameters[...]}}`` resource field with
    ``GetStringValue()`` (backend/src/v2/driver: util.go at 2.5.0, resolve.go at 2.17.0): an
    INTEGER parameter there reads as "" and the request is silently dropped."""
    spec, _ = packages[variant]
    placeholder = re.compile(r"^\{\{\$\.inputs\.parameters\['([^']+)'\]\}\}$")
    checked = 0
    for task, dag_inputs, siblings in _tasks(spec, spec["root"]):
        component = spec["components"][task["componentRef"]["name"]]
        executor = spec["deploymentSpec"]["executors"].get(component.get("executorLabel"), {})
        resources = executor.get("container", {}).get("resources", {})
        values = [*resources.values(), *resources.get("accelerator", {}).values()]
        for value in values:
            match = placeholder.match(value) if isinstance(value, str) else None
            if not match:
                continue
            checked += 1
            source = task["inputs"]["parameters"][match.group(1)]
            if "componentInputParameter" in source:
                declared = dag_inputs[source["componentInputParameter"]]
            else:
                producer = siblings[source["taskOutputParameter"]["producerTask"]]
                outputs = spec["components"][producer["componentRef"]["name"]]["outputDefinitions"]
                declared = outputs["parameters"][
                    source["taskOutputParameter"]["outputParameterKey"]
                ]
            assert declared["parameterType"] == "STRING", (task["taskInfo"]["name"], value)
    assert checked, "no parameterised resource field found: the GPU request is not set"


def _tasks(spec: dict, owner: dict) -> list[tuple[dict, dict, dict]]:
    """(task, its DAG's input parameters, the tasks beside it) for every task, nested DAGs too."""
    found = []
    tasks = owner.get("dag", {}).get("tasks", {})
    dag_inputs = owner.get("inputDefinitions", {}).get("parameters", {})
    for task in tasks.values():
        found.append((task, dag_inputs, tasks))
        found.extend(_tasks(spec, spec["components"][task["componentRef"]["name"]]))
    return found


def test_readme_states_the_floor_the_check_uses() -> None:
    readme = (ROOT / "README.md").read_text()
    matrix = readme.split("## Supported versions", 1)[1].split("\n## ", 1)[0]
    assert re.search(rf"\b{re.escape(cluster.KFP_BACKEND_FLOOR)}\b", matrix)
    assert (DATA / f"fields-{cluster.KFP_BACKEND_FLOOR}.yaml").is_file()
