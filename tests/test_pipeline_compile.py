"""The compiled pipelines: every step, GPU request, Secrets, scheduling, retries, caching."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from components import images
from pipeline import cluster
from pipeline.compile import compile_pipeline, main

STEPS = {
    "check-run",
    "download-data",
    "convert-data",
    "train-model",
    "evaluate-model",
    "infer-crf",
    "register-model",
    "gpu-placement",
}


def _load(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pipeline spec, kubernetes platform spec) of a compiled package."""
    docs = list(yaml.safe_load_all(path.read_text()))
    spec = docs[0]
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if docs[1:] else {}
    return spec, platform


def _all_tasks(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every task in the root DAG and in the condition sub-DAGs, by task name."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


@pytest.fixture(scope="module")
def cluster_package(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    return _load(compile_pipeline(tmp_path_factory.mktemp("c") / "p.yaml", "cluster"))


@pytest.fixture(scope="module")
def single_package(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    return _load(compile_pipeline(tmp_path_factory.mktemp("s") / "p.yaml", "single-node"))


def test_cluster_pipeline_trains_in_one_step_whichever_way(cluster_package) -> None:
    spec, _ = cluster_package
    assert spec["pipelineInfo"]["name"] == "vitpcm-wsss"
    tasks = _all_tasks(spec)
    # One train step, no branch and no artifact OneOf (resolved to the wrong branch by KFP
    # backends before 2.17): the step itself launches a distributed job when asked. The
    # deploy step is there too, a no-op unless the form's `deploy` flag is on.
    assert set(tasks) == STEPS | {"deploy-model"}
    assert not any("triggerPolicy" in t for t in tasks.values())
    assert not [c for c in spec["components"].values() if "dag" in c]
    evaluate = tasks["evaluate-model"]["inputs"]["artifacts"]["model"]
    assert evaluate["taskOutputArtifact"] == {
        "outputArtifactKey": "model",
        "producerTask": "train-model",
    }
    params = tasks["train-model"]["inputs"]["parameters"]
    assert params["distributed"] == {"componentInputParameter": "distributed"}
    assert params["workers"] == {"componentInputParameter": "workers"}
    assert params["gpus_per_worker"] == {"componentInputParameter": "gpus"}
    # The dataset arrives as the convert step's URI, not an artifact KFP would download.
    assert params["tfrecords_uri"]["taskOutputParameter"] == {
        "outputParameterKey": "Output",
        "producerTask": "convert-data",
    }
    assert "artifacts" not in tasks["train-model"]["inputs"]


def test_single_node_pipeline_has_no_condition(single_package) -> None:
    spec, _ = single_package
    tasks = _all_tasks(spec)
    assert set(tasks) == STEPS
    assert not any("triggerPolicy" in t for t in tasks.values())
    # The DAG order: each step consumes the previous one's artifact.
    producer = {
        step: {
            a["taskOutputArtifact"]["producerTask"]
            for a in tasks[step]["inputs"].get("artifacts", {}).values()
        }
        for step in STEPS
    }
    assert producer["convert-data"] == {"download-data"}
    assert producer["train-model"] == set()  # the dataset's URI, a parameter (see above)
    assert "convert-data" in tasks["train-model"]["dependentTasks"]
    # The scoring steps read their split in place: the dataset's URI, no artifact copy.
    assert producer["evaluate-model"] == {"train-model"}
    assert producer["infer-crf"] == {"train-model"}
    assert producer["register-model"] == {"train-model", "evaluate-model", "infer-crf"}
    for step in ("evaluate-model", "infer-crf", "register-model"):
        uri = tasks[step]["inputs"]["parameters"]["tfrecords_uri"]["taskOutputParameter"]
        assert uri == {"outputParameterKey": "Output", "producerTask": "convert-data"}, step
    # Process counts are parameters here (kfp.local sets them for the machine it runs on).
    workers = tasks["infer-crf"]["inputs"]["parameters"]["workers"]
    assert workers["componentInputParameter"] == "crf_workers"
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["crf_workers"]["defaultValue"] == cluster.CRF_WORKERS


def test_pipeline_form_parameters(cluster_package) -> None:
    spec, _ = cluster_package
    params = spec["root"]["inputDefinitions"]["parameters"]
    expected = {
        "dataset": "STRING",
        "config": "STRING",
        "epochs": "NUMBER_INTEGER",
        "gpus": "NUMBER_INTEGER",
        "distributed": "STRING",
        "workers": "NUMBER_INTEGER",
        "mlflow_tracking_uri": "STRING",
        "experiment": "STRING",
        "mirror": "STRING",
        "crf": "BOOLEAN",
        "pretrained": "STRING",
        "data_version": "STRING",
    }
    assert {k: params[k]["parameterType"] for k in expected} == expected
    assert params["distributed"]["defaultValue"] == "none"
    # Empty: the config's checkpoint (the official .npz) and the cached data.
    assert params["pretrained"]["defaultValue"] == ""
    assert params["data_version"]["defaultValue"] == ""
    assert params["mlflow_tracking_uri"]["defaultValue"] == "http://mlflow:5000"
    # The docstring becomes the form's help text.
    assert all(p.get("description") for p in params.values())


@pytest.mark.parametrize("variant", ["cluster", "single-node"])
def test_form_fields_reach_their_steps(variant: str, tmp_path: Path) -> None:
    spec, _ = _load(compile_pipeline(tmp_path / "p.yaml", variant))
    tasks = _all_tasks(spec)

    def source(task: str, name: str) -> str:
        return tasks[task]["inputs"]["parameters"][name]["componentInputParameter"]

    # A new data_version changes both data steps' cache keys (their inputs).
    assert source("download-data", "data_version") == "data_version"
    assert source("convert-data", "data_version") == "data_version"
    assert source("train-model", "pretrained") == "pretrained"


def test_training_requests_gpus_from_the_gpus_parameter(cluster_package) -> None:
    spec, _ = cluster_package
    executors = spec["deploymentSpec"]["executors"]
    accel = executors["exec-train-model"]["container"]["resources"]["accelerator"]
    # The resource name comes from the placement step: empty (no GPU limit) when gpus=0.
    placeholder = "{{$.inputs.parameters['pipelinechannel--gpu-placement-resource']}}"
    assert accel["resourceType"] == placeholder
    count = "{{$.inputs.parameters['pipelinechannel--gpu-placement-count']}}"
    assert accel["resourceCount"] == count
    train_inputs = _all_tasks(spec)["train-model"]["inputs"]["parameters"]
    # The run's gpus reach the placement step, which hands the count on as a string.
    placement_inputs = _all_tasks(spec)["gpu-placement"]["inputs"]["parameters"]
    assert placement_inputs["gpus"]["componentInputParameter"] == "gpus"
    assert train_inputs["pipelinechannel--gpu-placement-count"]["taskOutputParameter"] == {
        "outputParameterKey": "count",
        "producerTask": "gpu-placement",
    }
    assert train_inputs["pipelinechannel--gpu-placement-resource"]["taskOutputParameter"] == {
        "outputParameterKey": "resource",
        "producerTask": "gpu-placement",
    }
    # A step that launches a distributed job holds no GPU: the placement step gets the mode.
    placement = _all_tasks(spec)["gpu-placement"]["inputs"]["parameters"]
    assert placement["distributed"] == {"componentInputParameter": "distributed"}


def test_images_come_from_the_images_module(cluster_package) -> None:
    spec, _ = cluster_package
    executors = spec["deploymentSpec"]["executors"]
    used = {name: e["container"]["image"] for name, e in executors.items()}
    assert used.pop("exec-train-model") == images.gpu_image()
    assert set(used.values()) == {images.cpu_image()}
    # The workers' image is passed to the train step as a constant.
    worker = _all_tasks(spec)["train-model"]["inputs"]["parameters"]["worker_image"]
    assert worker["runtimeValue"]["constant"] == images.gpu_image()


def test_secrets_reach_the_steps_as_environment(cluster_package) -> None:
    _, platform = cluster_package

    def env_from(executor: str) -> dict[str, tuple[str, str]]:
        return {
            m["envVar"]: (s["secretName"], m["secretKey"])
            for s in platform[executor].get("secretAsEnv", [])
            for m in s["keyToEnv"]
        }

    s3 = {k: (cluster.S3_SECRET, k) for k in cluster.S3_SECRET_KEYS}
    mlflow = {
        **{k: (cluster.MLFLOW_SECRET, k) for k in cluster.MLFLOW_SECRET_KEYS},
        "MLFLOW_S3_ENDPOINT_URL": (cluster.S3_SECRET, "S3_ENDPOINT"),
    }
    # Both steps that talk to MLflow get its credentials and its artifact store.
    assert env_from("exec-train-model") == {**s3, **mlflow}
    assert env_from("exec-register-model") == {**s3, **mlflow}
    # The scoring steps read the dataset from the object store; the data steps write
    # through KFP's own credentials and get none.
    assert env_from("exec-evaluate-model") == env_from("exec-infer-crf") == s3
    for executor in ("exec-download-data", "exec-convert-data"):
        assert "secretAsEnv" not in platform.get(executor, {})


def test_training_placement_comes_from_the_placement_step(cluster_package) -> None:
    spec, platform = cluster_package
    train = platform["exec-train-model"]
    step = {"producerTask": "gpu-placement"}
    assert train["nodeSelector"] == {
        "nodeSelectorJson": {"taskOutputParameter": {**step, "outputParameterKey": "node_selector"}}
    }
    assert train["tolerations"] == [
        {"tolerationJson": {"taskOutputParameter": {**step, "outputParameterKey": "tolerations"}}}
    ]
    # The placement step gets the compile-time settings and the run's gpus.
    settings = cluster.gpu_placement()
    params = _all_tasks(spec)["gpu-placement"]["inputs"]["parameters"]
    assert params["gpus"]["componentInputParameter"] == "gpus"
    assert params["resource"]["runtimeValue"]["constant"] == settings.resource
    assert params["tolerations"]["runtimeValue"]["constant"] == settings.tolerations
    assert "gpu-placement" in _all_tasks(spec)["train-model"]["dependentTasks"]
    # The TFJob workers get the same placement, and the train pod's size, through the train
    # step's parameters (a TrainJob's tolerations come from its TrainingRuntime).
    params = _all_tasks(spec)["train-model"]["inputs"]["parameters"]
    assert params["worker_tolerations"]["runtimeValue"]["constant"] == settings.tolerations
    assert params["worker_node_selector"]["runtimeValue"]["constant"] == settings.node_selector
    size = json.loads(params["worker_size"]["runtimeValue"]["constant"])
    train = cluster.POD_SIZES["train"]
    assert size == {
        "gpu_resource": settings.resource,
        "cpu_request": train.cpu_request,
        "memory_request": train.memory_request,
        "cpu_limit": train.cpu_limit,
        "memory_limit": train.memory_limit,
    }


def test_placement_step_applies_nothing_without_gpus() -> None:
    from components import gpu_placement

    selector = {"pool": "a100"}
    tolerations = [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    args = {"resource": "amd.com/gpu", "node_selector": selector, "tolerations": tolerations}
    assert tuple(gpu_placement.python_func(gpus=0, **args)) == ("", "", {}, [])
    # A pod that launches a distributed job gets no GPU either: its workers do.
    for mode in ("trainjob", "tfjob"):
        none = ("", "", {}, [])
        assert tuple(gpu_placement.python_func(gpus=2, distributed=mode, **args)) == none
    assert tuple(gpu_placement.python_func(gpus=2, **args)) == (
        "amd.com/gpu",
        "2",
        selector,
        tolerations,
    )


def test_gpu_placement_settings_from_the_environment(tmp_path: Path) -> None:
    assert cluster.gpu_placement({}) == cluster.GpuPlacement()
    assert cluster.gpu_placement({}).node_selector == {}  # no vendor label by default
    env = {
        cluster.GPU_RESOURCE_ENV: "amd.com/gpu",
        cluster.GPU_NODE_SELECTOR_ENV: '{"pool": "mi300"}',
        cluster.GPU_TOLERATIONS_ENV: "[]",
    }
    assert cluster.gpu_placement(env) == cluster.GpuPlacement("amd.com/gpu", {"pool": "mi300"}, [])
    with pytest.raises(ValueError, match="VITPCM_GPU_NODE_SELECTOR is not JSON"):
        cluster.gpu_placement({cluster.GPU_NODE_SELECTOR_ENV: "pool=a100"})
    with pytest.raises(ValueError, match="VITPCM_GPU_TOLERATIONS must be a JSON list"):
        cluster.gpu_placement({cluster.GPU_TOLERATIONS_ENV: '{"key": "x"}'})
    with pytest.raises(ValueError, match="each toleration is an object"):
        cluster.gpu_placement({cluster.GPU_TOLERATIONS_ENV: '[{"kye": "x"}]'})


def test_retries_and_caching(cluster_package) -> None:
    spec, _ = cluster_package
    tasks = _all_tasks(spec)
    for step in ("download-data", "convert-data"):
        assert tasks[step]["cachingOptions"] == {"enableCache": True}
        retry = tasks[step]["retryPolicy"]
        assert retry["maxRetryCount"] == cluster.DATA_RETRIES
        assert retry["backoffDuration"] == cluster.RETRY_BACKOFF
        assert retry["backoffFactor"] == cluster.RETRY_BACKOFF_FACTOR
    for step in ("train-model", "evaluate-model", "infer-crf"):
        assert not tasks[step]["cachingOptions"].get("enableCache", False), step
    assert not tasks["register-model"]["cachingOptions"].get("enableCache", False)
    assert tasks["train-model"]["retryPolicy"]["maxRetryCount"] == cluster.TRAIN_RETRIES


def test_pod_sizes(cluster_package) -> None:
    spec, _ = cluster_package
    executors = spec["deploymentSpec"]["executors"]
    for executor, step in [
        ("exec-download-data", "download"),
        ("exec-convert-data", "convert"),
        ("exec-train-model", "train"),
        ("exec-evaluate-model", "evaluate"),
        ("exec-infer-crf", "infer"),
        ("exec-register-model", "register"),
    ]:
        resources = executors[executor]["container"]["resources"]
        size = cluster.POD_SIZES[step]
        assert resources["resourceCpuRequest"] == size.cpu_request
        assert resources["resourceMemoryRequest"] == size.memory_request
        assert resources["resourceCpuLimit"] == size.cpu_limit


def test_components_need_no_package_install_at_start(cluster_package) -> None:
    spec, _ = cluster_package
    for name, executor in spec["deploymentSpec"]["executors"].items():
        command = " ".join(executor["container"]["command"])
        assert "pip install" not in command, name  # the images carry kfp and vitpcm
        assert "kfp.dsl.executor_main" in command


def test_compile_cli_writes_the_package(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "build" / "vitpcm_pipeline.yaml"
    assert main(["--out", str(out)]) == 0
    assert out.is_file()
    assert "wrote" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    spec, _ = _load(out)
    assert spec["pipelineInfo"]["name"] == "vitpcm-wsss"


def test_image_registry_and_tag_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(images.REGISTRY_ENV, "registry.example.com/ml/")
    monkeypatch.setenv(images.TAG_ENV, "2026.11")
    assert images.image("gpu") == "registry.example.com/ml/vitpcm-gpu:2026.11"
    monkeypatch.delenv(images.TAG_ENV)
    from vitpcm import __version__

    assert images.image("cpu") == f"registry.example.com/ml/vitpcm-cpu:{__version__}"
    with pytest.raises(ValueError, match="unknown image kind"):
        images.image("tpu")


def test_images_cli_prints_one_reference(capsys: pytest.CaptureFixture) -> None:
    assert images.main(["--print", "gpu"]) == 0
    assert capsys.readouterr().out.strip() == images.gpu_image()


def test_prepared_data_pipeline_imports_the_folder_instead_of_downloading(
    tmp_path: Path,
) -> None:
    from kfp import compiler

    from pipeline.pipeline import prepared_data_pipeline

    out = tmp_path / "prepared.yaml"
    compiler.Compiler().compile(prepared_data_pipeline("/data/voc"), str(out))
    spec, _ = _load(out)
    tasks = _all_tasks(spec)
    assert "download-data" not in tasks
    assert {"importer", "convert-data", "train-model", "register-model"} <= set(tasks)
    importer = spec["deploymentSpec"]["executors"]["exec-importer"]["importer"]
    assert importer["artifactUri"] == {"constant": "/data/voc"}
    convert_input = tasks["convert-data"]["inputs"]["artifacts"]["raw"]
    assert convert_input["taskOutputArtifact"]["producerTask"] == "importer"


def test_readme_says_what_every_form_field_does(cluster_package) -> None:
    """The Kubeflow UI hides the descriptions: README's table is where users read them."""
    spec, _ = cluster_package
    params = spec["root"]["inputDefinitions"]["parameters"]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("### The run form", 1)[1].split("\n#", 1)[0]
    rows = [line.split("|")[1:4] for line in table.splitlines() if line.startswith("| `")]
    documented = {name.strip().strip("`"): default.strip() for name, default, _ in rows}
    assert set(documented) == set(params)
    for name, default in documented.items():
        value = params[name].get("defaultValue", "")
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # the spec stores integers as JSON numbers
        shown = "empty" if value == "" else str(value).lower().strip()
        assert default.strip("`") == shown, name
    # Essentials first: what a first run chooses.
    assert list(documented)[:4] == ["dataset", "config", "pretrained", "epochs"]


def test_a_new_step_is_a_component_and_a_table_entry(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every pipeline gets a step added to the table, wired from its sources."""
    from kfp import compiler, dsl
    from kfp.dsl import Input, Model

    from pipeline import pipeline, steps

    def audit_model(model, note):  # type: ignore[no-untyped-def]
        return note

    # The real annotation objects, as kfp reads them (this module's are strings).
    audit_model.__annotations__ = {"model": Input[Model], "note": str, "return": str}
    component = dsl.component(audit_model, base_image=images.cpu_image())
    step = steps.Step(
        "audit-model",
        "audit the model",
        component,
        {"model": steps.output("train-model.model"), "note": steps.value("experiment")},
    )
    monkeypatch.setattr(pipeline, "STEPS", (*steps.STEPS, step))
    monkeypatch.setitem(steps.BY_TASK, step.task, step)
    for variant in (pipeline.CLUSTER, pipeline.SINGLE_NODE):
        assert variant.steps[-1] == "audit-model"
        compiler.Compiler().compile(pipeline.build_pipeline(variant), str(tmp_path / "p.yaml"))
        spec, _ = _load(tmp_path / "p.yaml")
        task = _all_tasks(spec)["audit-model"]
        assert task["taskInfo"]["name"] == "audit the model"
        source = task["inputs"]["artifacts"]["model"]["taskOutputArtifact"]
        assert source == {"outputArtifactKey": "model", "producerTask": "train-model"}
        note = task["inputs"]["parameters"]["note"]
        assert note == {"componentInputParameter": "experiment"}
