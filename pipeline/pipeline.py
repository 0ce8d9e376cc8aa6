"""The ViT-PCM DAG: download -> convert -> train -> evaluate -> infer + CRF -> register.

Two pipelines share every step through the ``add_*`` helpers below:

* :func:`vitpcm_pipeline` (``vitpcm-wsss``), the one to upload: training runs in the step's
  own GPU pod, or, with ``multi_worker``, as a Training Operator TFJob (a ``dsl.If``).
* :func:`vitpcm_single_node_pipeline` (``vitpcm-wsss-single-node``): no branch, so
  ``kfp.local`` can run it (``make run-local``); it also suits a cluster without the
  Training Operator. It returns every step's outputs.

Kubernetes settings (GPU request, node selector, tolerations, Secrets, pod sizes) are
attached to the steps here; ``kfp.local`` ignores them.
"""

# No `from __future__ import annotations`: kfp reads the real annotation objects.
from typing import NamedTuple

from components import (
    convert_data,
    download_data,
    evaluate_model,
    infer_crf,
    register_model,
    train_model,
    train_model_tfjob,
)
from kfp import dsl, kubernetes
from kfp.dsl import Artifact, Dataset, Markdown, Metrics, Model, PipelineTask
from kfp.dsl.graph_component import GraphComponent
from kfp.dsl.pipeline_channel import PipelineChannel

from pipeline import cluster, images

PIPELINE_NAME = "vitpcm-wsss"
SINGLE_NODE_PIPELINE_NAME = "vitpcm-wsss-single-node"


def _size(task: PipelineTask, step: str) -> PipelineTask:
    size = cluster.POD_SIZES[step]
    return (
        task.set_cpu_request(size.cpu_request)
        .set_memory_request(size.memory_request)
        .set_cpu_limit(size.cpu_limit)
        .set_memory_limit(size.memory_limit)
    )


def _use_s3_secret(task: PipelineTask, for_mlflow: bool = False) -> None:
    keys = {key: key for key in cluster.S3_SECRET_KEYS}
    kubernetes.use_secret_as_env(task, cluster.S3_SECRET, keys)
    if for_mlflow:
        kubernetes.use_secret_as_env(task, cluster.S3_SECRET, cluster.S3_ENDPOINT_FOR_MLFLOW)


def _on_gpu_nodes(task: PipelineTask) -> None:
    for key, value in cluster.GPU_NODE_SELECTOR.items():
        kubernetes.add_node_selector(task, key, value)
    for toleration in cluster.GPU_TOLERATIONS:
        kubernetes.add_toleration(task, **toleration)


def _data_retries(task: PipelineTask) -> PipelineTask:
    return task.set_retry(
        num_retries=cluster.DATA_RETRIES,
        backoff_duration=cluster.RETRY_BACKOFF,
        backoff_factor=cluster.RETRY_BACKOFF_FACTOR,
        backoff_max_duration=cluster.RETRY_BACKOFF_MAX,
    )


def add_data_steps(
    dataset: str, mirror: str, shards: int, raw: PipelineChannel | None = None, **synthetic
) -> PipelineTask:
    """Download (or synthesise) and convert; returns the convert task (``tfrecords``).

    ``raw``, when given, is an already downloaded dataset (an importer's output) and the
    download step is left out.
    """
    if raw is None:
        download = download_data(dataset=dataset, mirror=mirror, **synthetic)
        download.set_display_name("download data")
        _size(_data_retries(download), "download").set_caching_options(True)
        raw = download.outputs["raw"]
    convert = convert_data(
        raw=raw, dataset=dataset, shards=shards, workers=cluster.CONVERT_WORKERS
    ).set_display_name("convert to TFRecords")
    _size(_data_retries(convert), "convert").set_caching_options(True)
    return convert


def add_train_step(
    tfrecords: PipelineChannel,
    config: str,
    overrides: str,
    epochs: int,
    gpus: int,
    checkpoint_root: str,
) -> PipelineTask:
    """Single-node training on ``gpus`` GPUs of one GPU node."""
    train = train_model(
        tfrecords=tfrecords,
        config=config,
        overrides=overrides,
        epochs=epochs,
        checkpoint_root=checkpoint_root,
        kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    ).set_display_name("train ViT-PCM")
    train.set_accelerator_type(cluster.GPU_RESOURCE).set_accelerator_limit(gpus)
    _size(train, "train").set_caching_options(False).set_retry(cluster.TRAIN_RETRIES)
    _on_gpu_nodes(train)
    _use_s3_secret(train)
    return train


def add_tfjob_train_step(
    tfrecords: PipelineChannel,
    config: str,
    overrides: str,
    epochs: int,
    gpus: int,
    workers: int,
    checkpoint_root: str,
) -> PipelineTask:
    """Multi-worker training: a launcher pod creates a TFJob and waits for it."""
    launch = train_model_tfjob(
        tfrecords=tfrecords,
        image=images.gpu_image(),
        work_root=checkpoint_root,
        config=config,
        overrides=overrides,
        epochs=epochs,
        workers=workers,
        gpus_per_worker=gpus,
        node_selector=dict(cluster.GPU_NODE_SELECTOR),
        tolerations=[dict(t) for t in cluster.GPU_TOLERATIONS],
        env_secrets=[cluster.S3_SECRET],
        kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    ).set_display_name("train ViT-PCM (TFJob)")
    _size(launch, "tfjob").set_caching_options(False)
    _use_s3_secret(launch)
    return launch


def add_scoring_steps(
    model: PipelineChannel,
    tfrecords: PipelineChannel,
    crf: bool,
    experiment: str,
    registered_model: str,
    mlflow_tracking_uri: str,
) -> tuple[PipelineTask, PipelineTask, PipelineTask]:
    """Evaluate, infer + CRF, register; returns the three tasks."""
    evaluate = evaluate_model(model=model, tfrecords=tfrecords).set_display_name("evaluate")
    _size(evaluate, "evaluate").set_caching_options(False)
    infer = infer_crf(
        model=model, tfrecords=tfrecords, crf=crf, workers=cluster.CRF_WORKERS
    ).set_display_name("infer pseudo masks + CRF")
    _size(infer, "infer").set_caching_options(False)
    register = register_model(
        model=model,
        eval_metrics=evaluate.outputs["metrics"],
        test_metrics=infer.outputs["metrics"],
        eval_report=evaluate.outputs["report"],
        pseudo_masks=infer.outputs["pseudo_masks"],
        tracking_uri=mlflow_tracking_uri,
        experiment=experiment,
        model_name=registered_model,
        kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    ).set_display_name("register in MLflow")
    _size(register, "register").set_caching_options(False)
    _use_s3_secret(register, for_mlflow=True)
    kubernetes.use_secret_as_env(
        register, cluster.MLFLOW_SECRET, {key: key for key in cluster.MLFLOW_SECRET_KEYS}
    )
    return evaluate, infer, register


@dsl.pipeline(
    name=PIPELINE_NAME,
    description=(
        "ViT-PCM weakly supervised semantic segmentation (ECCV 2022): data, training on "
        "GPUs (optionally multi-worker), evaluation, CRF pseudo masks, MLflow registration."
    ),
)
def vitpcm_pipeline(
    dataset: str = "voc12",
    config: str = "voc12_vit_b16",
    epochs: int = 0,
    overrides: str = "",
    gpus: int = 1,
    multi_worker: bool = False,
    workers: int = 2,
    mirror: str = "",
    crf: bool = True,
    mlflow_tracking_uri: str = cluster.DEFAULT_MLFLOW_URI,
    experiment: str = "vitpcm",
    registered_model: str = "vitpcm",
    checkpoint_root: str = "",
    shards: int = 0,
):
    """Train and evaluate ViT-PCM, and register the model in MLflow.

    Args:
        dataset: voc12 (VOC 2012 + SBD), coco14, or synthetic (a small built-in set).
        config: Config name: voc12_vit_s16, voc12_vit_b16, coco14_vit_b16 or synthetic.
        epochs: Fine-tuning epochs; 0 keeps the config's value.
        overrides: Space-separated KEY=VALUE config overrides, e.g. "train.lr=3e-4".
        gpus: GPUs of the training pod (per worker when multi_worker): 0, 1, 2, 4, 8 or 16.
        multi_worker: Train as a TFJob over several GPU nodes (Training Operator required).
        workers: Worker pods of the multi-worker TFJob.
        mirror: Base URL serving the official dataset archives; empty for the official hosts.
        crf: Refine the pseudo masks with the dense CRF.
        mlflow_tracking_uri: MLflow server; empty to skip MLflow.
        experiment: MLflow experiment.
        registered_model: MLflow registered model name.
        checkpoint_root: s3:// prefix for training checkpoints (resume after a restart);
            required when multi_worker.
        shards: TFRecord shards per split; 0 for about 1000 images per shard.
    """
    convert = add_data_steps(dataset, mirror, shards)
    tfrecords = convert.outputs["tfrecords"]
    with dsl.If(multi_worker == True, "multi-worker"):  # noqa: E712  (kfp builds a condition)
        tfjob = add_tfjob_train_step(
            tfrecords, config, overrides, epochs, gpus, workers, checkpoint_root
        )
    with dsl.Else("single-node"):
        single = add_train_step(tfrecords, config, overrides, epochs, gpus, checkpoint_root)
    model = dsl.OneOf(tfjob.outputs["model"], single.outputs["model"])
    add_scoring_steps(model, tfrecords, crf, experiment, registered_model, mlflow_tracking_uri)


class SingleNodeOutputs(NamedTuple):
    """Every step's outputs (kfp.local returns them from a run)."""

    tfrecords: Dataset
    model: Model
    train_metrics: Metrics
    eval_metrics: Metrics
    class_iou: Markdown
    eval_report: Artifact
    test_metrics: Metrics
    pseudo_masks: Dataset
    summary: Artifact


def _single_node_dag(
    convert: PipelineTask,
    config: str,
    epochs: int,
    overrides: str,
    gpus: int,
    crf: bool,
    mlflow_tracking_uri: str,
    experiment: str,
    registered_model: str,
    checkpoint_root: str,
) -> SingleNodeOutputs:
    """Training and scoring after the data steps, shared by the single-node pipelines."""
    tfrecords = convert.outputs["tfrecords"]
    train = add_train_step(tfrecords, config, overrides, epochs, gpus, checkpoint_root)
    evaluate, infer, register = add_scoring_steps(
        train.outputs["model"], tfrecords, crf, experiment, registered_model, mlflow_tracking_uri
    )
    return SingleNodeOutputs(
        tfrecords=tfrecords,
        model=train.outputs["model"],
        train_metrics=train.outputs["metrics"],
        eval_metrics=evaluate.outputs["metrics"],
        class_iou=evaluate.outputs["class_iou"],
        eval_report=evaluate.outputs["report"],
        test_metrics=infer.outputs["metrics"],
        pseudo_masks=infer.outputs["pseudo_masks"],
        summary=register.outputs["summary"],
    )


@dsl.pipeline(
    name=SINGLE_NODE_PIPELINE_NAME,
    description="ViT-PCM on one node (kfp.local, or a cluster without the Training Operator).",
)
def vitpcm_single_node_pipeline(
    dataset: str = "synthetic",
    config: str = "synthetic",
    epochs: int = 0,
    overrides: str = "",
    gpus: int = 1,
    mirror: str = "",
    crf: bool = True,
    mlflow_tracking_uri: str = "",
    experiment: str = "vitpcm",
    registered_model: str = "vitpcm",
    checkpoint_root: str = "",
    shards: int = 0,
    synthetic_train: int = 200,
    synthetic_val: int = 50,
    synthetic_test: int = 50,
    synthetic_size: int = 128,
) -> SingleNodeOutputs:
    """Train and evaluate ViT-PCM on one node, and register the model in MLflow.

    Args:
        dataset: voc12 (VOC 2012 + SBD), coco14, or synthetic (a small built-in set).
        config: Config name: voc12_vit_s16, voc12_vit_b16, coco14_vit_b16 or synthetic.
        epochs: Fine-tuning epochs; 0 keeps the config's value.
        overrides: Space-separated KEY=VALUE config overrides, e.g. "train.lr=3e-4".
        gpus: GPUs of the training pod: 0, 1, 2, 4, 8 or 16.
        mirror: Base URL serving the official dataset archives; empty for the official hosts.
        crf: Refine the pseudo masks with the dense CRF.
        mlflow_tracking_uri: MLflow server; empty to skip MLflow.
        experiment: MLflow experiment.
        registered_model: MLflow registered model name.
        checkpoint_root: s3:// prefix for training checkpoints (resume after a restart).
        shards: TFRecord shards per split; 0 for about 1000 images per shard.
        synthetic_train: Synthetic training images (dataset=synthetic).
        synthetic_val: Synthetic validation images.
        synthetic_test: Synthetic test images.
        synthetic_size: Synthetic image side in pixels.
    """
    convert = add_data_steps(
        dataset,
        mirror,
        shards,
        synthetic_train=synthetic_train,
        synthetic_val=synthetic_val,
        synthetic_test=synthetic_test,
        synthetic_size=synthetic_size,
    )
    return _single_node_dag(
        convert,
        config,
        epochs,
        overrides,
        gpus,
        crf,
        mlflow_tracking_uri,
        experiment,
        registered_model,
        checkpoint_root,
    )


def prepared_data_pipeline(source_dir: str) -> GraphComponent:
    """A single-node pipeline that starts from an already downloaded dataset folder.

    The folder (holding ``VOCdevkit/`` or ``coco2014/``) enters through ``dsl.importer``
    instead of the download step; everything after it is the single-node DAG.
    """

    @dsl.pipeline(
        name=f"{SINGLE_NODE_PIPELINE_NAME}-prepared-data",
        description="ViT-PCM on one node from a dataset folder already on disk.",
    )
    def pipeline(
        dataset: str = "voc12",
        config: str = "voc12_vit_s16",
        epochs: int = 0,
        overrides: str = "",
        gpus: int = 1,
        crf: bool = True,
        mlflow_tracking_uri: str = "",
        experiment: str = "vitpcm",
        registered_model: str = "vitpcm",
        checkpoint_root: str = "",
        shards: int = 0,
    ) -> SingleNodeOutputs:
        raw = dsl.importer(artifact_uri=source_dir, artifact_class=Dataset, reimport=False)
        raw.set_display_name("dataset folder")
        convert = add_data_steps(dataset, "", shards, raw=raw.output)
        return _single_node_dag(
            convert,
            config,
            epochs,
            overrides,
            gpus,
            crf,
            mlflow_tracking_uri,
            experiment,
            registered_model,
            checkpoint_root,
        )

    return pipeline
