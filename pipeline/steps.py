"""The steps of the ViT-PCM DAG: one table that everything else reads.

:data:`STEPS` names, for each step, its component, where each argument comes from, what the
DAG returns of its outputs, and what its pod asks of the cluster (size, GPUs, Secrets,
retries, caching; ``kfp.local`` ignores these). :func:`pipeline.pipeline.build_pipeline`
wires the pipelines from it, and ``make run-local`` (:mod:`localrun`) takes its labels,
its step count and the outputs it collects from it too. Adding a step: a component in
``components/`` and one :class:`Step` here.

An argument's source is one of :func:`value` (a run parameter, or a value the pipeline
fixes), :func:`output` (an earlier step's output) or :func:`constant` (decided when the
pipeline is compiled).
"""

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kfp import dsl, kubernetes
from kfp.dsl import Dataset, PipelineTask

from components import (
    check_run,
    convert_data,
    deploy_model,
    download_data,
    evaluate_model,
    gpu_placement,
    infer_crf,
    register_model,
    train_model,
)
from components.images import cpu_image, gpu_image
from pipeline import cluster

_OMIT = object()


@dataclass
class Dag:
    """A DAG being built: the run's values by name and the tasks created so far."""

    values: Mapping[str, Any]
    tasks: dict[str, PipelineTask] = field(default_factory=dict)


Source = Callable[[Dag], Any]


def value(name: str) -> Source:
    """The run's ``name`` (a pipeline parameter, or a value the pipeline fixes); a name the
    pipeline lacks leaves the argument to the component's default."""
    return lambda dag: dag.values.get(name, _OMIT)


def output(*where: str) -> Source:
    """``"task.output"`` of an earlier step: the first of ``where`` whose task is in the DAG."""

    def find(dag: Dag) -> Any:
        for task, _, key in (w.partition(".") for w in where):
            if task in dag.tasks:
                return dag.tasks[task].outputs[key]
        return _OMIT

    return find


def constant(make: Callable[[], Any]) -> Source:
    """A value decided at compile time (an image name, a cluster setting)."""
    return lambda dag: make()


# -- pod settings (Kubernetes; kfp.local ignores them) ----------------------------------


def _size(task: PipelineTask, step: str) -> None:
    size = cluster.POD_SIZES[step]
    task.set_cpu_request(size.cpu_request).set_memory_request(size.memory_request)
    task.set_cpu_limit(size.cpu_limit).set_memory_limit(size.memory_limit)


def _use_s3_secret(task: PipelineTask, for_mlflow: bool = False) -> None:
    kubernetes.use_secret_as_env(task, cluster.S3_SECRET, {k: k for k in cluster.S3_SECRET_KEYS})
    if for_mlflow:  # the S3 endpoint under the name MLflow's artifact client reads
        kubernetes.use_secret_as_env(task, cluster.S3_SECRET, cluster.S3_ENDPOINT_FOR_MLFLOW)


def _use_mlflow_secrets(task: PipelineTask) -> None:
    """MLflow's credentials and its artifact store (train and register talk to MLflow)."""
    _use_s3_secret(task, for_mlflow=True)
    keys = {key: key for key in cluster.MLFLOW_SECRET_KEYS}
    kubernetes.use_secret_as_env(task, cluster.MLFLOW_SECRET, keys)


PodSettings = Callable[[PipelineTask, Dag], None]


def _small_pod(cpu: str, memory: str, cache: bool) -> PodSettings:
    def settings(task: PipelineTask, dag: Dag) -> None:
        task.set_caching_options(cache).set_cpu_limit(cpu).set_memory_limit(memory)

    return settings


def _data_pod(size: str) -> PodSettings:
    """Cached (``data_version`` is in the key) and retried: downloads meet flaky hosts."""

    def settings(task: PipelineTask, dag: Dag) -> None:
        task.set_retry(
            num_retries=cluster.DATA_RETRIES,
            backoff_duration=cluster.RETRY_BACKOFF,
            backoff_factor=cluster.RETRY_BACKOFF_FACTOR,
            backoff_max_duration=cluster.RETRY_BACKOFF_MAX,
        )
        _size(task, size)
        task.set_caching_options(True)

    return settings


def _train_pod(task: PipelineTask, dag: Dag) -> None:
    """GPUs as the placement step decides (its outputs, so ``gpus=0`` asks for none)."""
    _size(task, "train")
    task.set_caching_options(False).set_retry(cluster.TRAIN_RETRIES)
    placement = dag.tasks["gpu-placement"].outputs
    # The count as the placement step's string output, never the int `gpus` itself: the
    # driver resolves a parameterised count with GetStringValue() (see gpu_placement).
    task.set_accelerator_type(placement["resource"])
    task.set_accelerator_limit(placement["count"])
    kubernetes.add_node_selector_json(task, placement["node_selector"])
    kubernetes.add_toleration_json(task, placement["tolerations"])
    _use_mlflow_secrets(task)


def _scoring_pod(size: str) -> PodSettings:
    """Reads its split of the dataset in place, from the object store."""

    def settings(task: PipelineTask, dag: Dag) -> None:
        _size(task, size)
        task.set_caching_options(False)
        _use_s3_secret(task)

    return settings


def _register_pod(task: PipelineTask, dag: Dag) -> None:
    _size(task, "register")
    task.set_caching_options(False)
    _use_mlflow_secrets(task)


def _uncached(task: PipelineTask, dag: Dag) -> None:
    task.set_caching_options(False)


def _import_folder(artifact_uri: str) -> PipelineTask:
    """A dataset folder already on disk enters the DAG in place of the download step."""
    return dsl.importer(artifact_uri=artifact_uri, artifact_class=Dataset, reimport=False)


def _worker_size() -> str:
    """The train pod's size and GPU resource, for the workers of a distributed job."""
    size = cluster.POD_SIZES["train"]
    return json.dumps(
        {
            "gpu_resource": cluster.gpu_placement().resource,
            "cpu_request": size.cpu_request,
            "memory_request": size.memory_request,
            "cpu_limit": size.cpu_limit,
            "memory_limit": size.memory_limit,
        },
        sort_keys=True,
    )


@dataclass(frozen=True)
class Step:
    """One step of the DAG.

    Attributes:
        task: the kfp task name (the component's name, e.g. ``train-model``).
        label: what the Kubeflow UI and ``make run-local`` show.
        component: the component (or any function that creates the task).
        inputs: component argument -> its :data:`Source`.
        outputs: what the single-node pipelines return: DAG output name -> the step's output.
        after: steps that must finish first although no output flows from them.
        pod: Kubernetes settings of the step's pod.
    """

    task: str
    label: str
    component: Callable[..., PipelineTask]
    inputs: Mapping[str, Source]
    outputs: Mapping[str, str] = field(default_factory=dict)
    after: tuple[str, ...] = ()
    pod: PodSettings | None = None


_RUN_ID = constant(lambda: dsl.PIPELINE_JOB_ID_PLACEHOLDER)
_DATASET_URI = output("convert-data.Output")  # each later step reads its split in place
_MODEL = output("train-model.model")

STEPS: tuple[Step, ...] = (
    Step(
        "check-run",
        "check dataset and config",
        check_run,
        # Not cached: it is cheap, and a local checkpoint may have gone.
        {name: value(name) for name in ("dataset", "config", "overrides", "pretrained")},
        pod=_small_pod("500m", "512Mi", cache=False),
    ),
    Step(
        "download-data",
        "download / synthesise data",
        download_data,
        {
            **{name: value(name) for name in ("dataset", "mirror", "data_version")},
            **{f"synthetic_{k}": value(f"synthetic_{k}") for k in ("train", "val", "test")},
            "synthetic_size": value("synthetic_size"),
        },
        after=("check-run",),
        pod=_data_pod("download"),
    ),
    Step(
        "importer",
        "import dataset folder",
        _import_folder,
        {"artifact_uri": value("source_dir")},
    ),
    Step(
        "convert-data",
        "convert to TFRecords",
        convert_data,
        {
            "raw": output("download-data.raw", "importer.artifact"),
            "dataset": value("dataset"),
            "shards": value("shards"),
            "workers": value("convert_workers"),
            "data_version": value("data_version"),
        },
        outputs={"tfrecords": "tfrecords"},
        after=("check-run",),
        pod=_data_pod("convert"),
    ),
    Step(
        "gpu-placement",
        "GPU placement",
        gpu_placement,
        {
            "gpus": value("gpus"),
            "distributed": value("distributed"),
            "resource": constant(lambda: cluster.gpu_placement().resource),
            "node_selector": constant(lambda: cluster.gpu_placement().node_selector),
            "tolerations": constant(lambda: cluster.gpu_placement().tolerations),
        },
        pod=_small_pod("100m", "256Mi", cache=True),
    ),
    Step(
        "train-model",
        "train ViT-PCM",
        train_model,
        {
            "tfrecords_uri": _DATASET_URI,
            "config": output("check-run.Output"),
            **{n: value(n) for n in ("overrides", "epochs", "checkpoint_root", "experiment")},
            "kfp_run_id": _RUN_ID,
            "tracking_uri": value("mlflow_tracking_uri"),
            **{n: value(n) for n in ("registered_model", "pretrained", "distributed")},
            "workers": value("workers"),
            "gpus_per_worker": value("gpus"),
            "worker_image": constant(gpu_image),
            "worker_size": constant(_worker_size),
            "worker_node_selector": constant(lambda: cluster.gpu_placement().node_selector),
            "worker_tolerations": constant(lambda: cluster.gpu_placement().tolerations),
        },
        outputs={"model": "model", "train_metrics": "metrics"},
        pod=_train_pod,
    ),
    Step(
        "evaluate-model",
        "evaluate baseline pseudo masks",
        evaluate_model,
        {"model": _MODEL, "tfrecords_uri": _DATASET_URI},
        outputs={"eval_metrics": "metrics", "class_iou": "class_iou", "eval_report": "report"},
        pod=_scoring_pod("evaluate"),
    ),
    Step(
        "infer-crf",
        "infer pseudo masks + CRF",
        infer_crf,
        {
            "model": _MODEL,
            "tfrecords_uri": _DATASET_URI,
            "crf": value("crf"),
            "workers": value("crf_workers"),
        },
        outputs={"test_metrics": "metrics", "pseudo_masks": "pseudo_masks"},
        pod=_scoring_pod("infer"),
    ),
    Step(
        "register-model",
        "register in MLflow",
        register_model,
        {
            "model": _MODEL,
            "eval_metrics": output("evaluate-model.metrics"),
            "test_metrics": output("infer-crf.metrics"),
            "eval_report": output("evaluate-model.report"),
            "pseudo_masks": output("infer-crf.pseudo_masks"),
            # For the sample overlays (test images and ground truth next to the pseudo masks).
            "tfrecords_uri": _DATASET_URI,
            "tracking_uri": value("mlflow_tracking_uri"),
            "experiment": value("experiment"),
            "model_name": value("registered_model"),
            "kfp_run_id": _RUN_ID,
        },
        outputs={"summary": "summary"},
        pod=_register_pod,
    ),
    Step(
        "deploy-model",
        "deploy the champion (KServe)",
        deploy_model,
        # Always in its DAG and a no-op unless asked (no branch, like the train step's
        # launcher).
        {
            "summary": output("register-model.summary"),
            "tracking_uri": value("mlflow_tracking_uri"),
            "image": constant(cpu_image),
            "enabled": value("deploy"),
        },
        pod=_uncached,
    ),
)

BY_TASK: dict[str, Step] = {step.task: step for step in STEPS}


def add_step(dag: Dag, step: Step) -> PipelineTask:
    """Create ``step``'s task in the pipeline being defined, wired from ``dag``."""
    arguments = {name: source(dag) for name, source in step.inputs.items()}
    task = step.component(**{k: v for k, v in arguments.items() if v is not _OMIT})
    task.set_display_name(step.label)
    for name in step.after:
        if name in dag.tasks:
            task.after(dag.tasks[name])
    if step.pod is not None:
        step.pod(task, dag)
    dag.tasks[step.task] = task
    return task
