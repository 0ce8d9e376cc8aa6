"""The ViT-PCM DAG: download -> convert -> train -> evaluate -> infer + CRF -> register.

Three pipelines share every step through :mod:`pipeline.steps`:

* :func:`vitpcm_pipeline` (``vitpcm-wsss``), the one to upload: training runs in the step's
  own GPU pod, or, with ``distributed``, the same step launches a Kubeflow Trainer v2
  TrainJob or a Training Operator TFJob and waits for it; one step either way, so no branch.
* :func:`vitpcm_single_node_pipeline` (``vitpcm-wsss-single-node``): training in the step's
  pod only, so ``kfp.local`` can run it (``make run-local``). It returns every step's outputs.
* :func:`prepared_data_pipeline`: the single-node DAG starting from a dataset folder on disk.
"""

# No `from __future__ import annotations`: kfp reads the real annotation objects.
from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Markdown, Metrics, Model, PipelineTask
from kfp.dsl.graph_component import GraphComponent

from components.images import cpu_image
from pipeline import cluster
from pipeline.steps import (
    add_check_step,
    add_data_steps,
    add_scoring_steps,
    add_train_step,
)

PIPELINE_NAME = "vitpcm-wsss"
SINGLE_NODE_PIPELINE_NAME = "vitpcm-wsss-single-node"


def add_deploy_step(register: PipelineTask, tracking_uri: str, enabled: bool) -> PipelineTask:
    """The ``deploy`` step after ``register`` (components/deploy.py); a no-op unless enabled."""
    from components.deploy import deploy_model

    task = deploy_model(
        summary=register.outputs["summary"],
        tracking_uri=tracking_uri,
        image=cpu_image(),
        enabled=enabled,
    ).set_display_name("deploy the champion (KServe)")
    task.set_caching_options(False)
    return task


@dsl.pipeline(
    name=PIPELINE_NAME,
    description=(
        "ViT-PCM weakly supervised semantic segmentation (ECCV 2022): data, training on "
        "GPUs (optionally multi-worker), evaluation, CRF pseudo masks, MLflow registration."
    ),
)
def vitpcm_pipeline(
    dataset: str = "voc12",
    config: str = "",
    pretrained: str = "",
    epochs: int = 0,
    overrides: str = "",
    gpus: int = 1,
    distributed: str = "none",
    workers: int = 2,
    mirror: str = "",
    crf: bool = True,
    mlflow_tracking_uri: str = cluster.DEFAULT_MLFLOW_URI,
    experiment: str = "vitpcm",
    registered_model: str = "",
    checkpoint_root: str = "",
    shards: int = 0,
    data_version: str = "",
    deploy: bool = False,
):
    """Train and evaluate ViT-PCM, and register the model in MLflow.

    Args:
        dataset: voc12 (VOC 2012 + SBD), coco14, or synthetic (a small built-in set).
        config: Config name: voc12_vit_s16, voc12_vit_b16, coco14_vit_b16 or synthetic;
            empty follows the dataset (voc12_vit_s16, coco14_vit_b16, synthetic).
        pretrained: Backbone checkpoint: empty for the config's (the public Google ViT .npz
            of the paper configs), a path, s3:// or https:// URI, or none for random weights.
        epochs: Fine-tuning epochs; 0 keeps the config's value.
        overrides: Space-separated KEY=VALUE config overrides, e.g. "train.lr=3e-4".
        gpus: GPUs of the training pod (of each worker when distributed): 0, 1, 2, 4, 8, 16.
        distributed: none (train in the step's pod), trainjob (Kubeflow Trainer v2 TrainJob,
            manifests/trainer/ applied) or tfjob (Training Operator v1 TFJob).
        workers: Worker pods of a distributed job.
        mirror: Base URL serving the official dataset archives; empty for the official hosts.
        crf: Refine the pseudo masks with the dense CRF.
        mlflow_tracking_uri: MLflow server; empty to skip MLflow.
        experiment: MLflow experiment.
        registered_model: MLflow registered model name; empty for the config's
            (mlflow.registered_model: vitpcm-voc12, vitpcm-coco14, vitpcm-synthetic).
        checkpoint_root: s3:// prefix for training checkpoints (resume after a restart);
            required when distributed.
        shards: TFRecord shards per split; 0 for about 1000 images per shard.
        data_version: Any label of the dataset's version (e.g. 2026-12): a new value makes the
            data steps fetch and convert again instead of reusing their cached outputs.
        deploy: Point the KServe InferenceService "vitpcm" at the model when this run makes
            it the champion (manifests/serving/ applied); off: MLflow only.
    """
    check = add_check_step(dataset, config, overrides, pretrained)
    convert = add_data_steps(dataset, mirror, shards, after=check, data_version=data_version)
    train = add_train_step(
        convert,
        check.output,
        overrides,
        epochs,
        gpus,
        checkpoint_root,
        mlflow_tracking_uri=mlflow_tracking_uri,
        experiment=experiment,
        distributed=distributed,
        workers=workers,
        pretrained=pretrained,
        registered_model=registered_model,
    )
    _evaluate, _infer, register = add_scoring_steps(
        train.outputs["model"],
        convert.outputs["Output"],
        crf,
        experiment,
        registered_model,
        mlflow_tracking_uri,
    )
    # Always in the DAG and a no-op unless asked (no branch, like the train step's launcher).
    add_deploy_step(register, mlflow_tracking_uri, deploy)


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
    *,
    config: str,
    pretrained: str,
    epochs: int,
    overrides: str,
    gpus: int,
    crf: bool,
    crf_workers: int,
    mlflow_tracking_uri: str,
    experiment: str,
    registered_model: str,
    checkpoint_root: str,
) -> SingleNodeOutputs:
    """Training and scoring after the data steps, shared by the single-node pipelines."""
    tfrecords = convert.outputs["tfrecords"]
    train = add_train_step(
        convert,
        config,
        overrides,
        epochs,
        gpus,
        checkpoint_root,
        mlflow_tracking_uri=mlflow_tracking_uri,
        experiment=experiment,
        pretrained=pretrained,
        registered_model=registered_model,
    )
    evaluate, infer, register = add_scoring_steps(
        train.outputs["model"],
        convert.outputs["Output"],
        crf,
        experiment,
        registered_model,
        mlflow_tracking_uri,
        crf_workers=crf_workers,
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
    config: str = "",
    pretrained: str = "",
    epochs: int = 0,
    overrides: str = "",
    gpus: int = 1,
    mirror: str = "",
    crf: bool = True,
    mlflow_tracking_uri: str = "",
    experiment: str = "vitpcm",
    registered_model: str = "",
    checkpoint_root: str = "",
    shards: int = 0,
    convert_workers: int = cluster.CONVERT_WORKERS,
    crf_workers: int = cluster.CRF_WORKERS,
    synthetic_train: int = 2000,  # = vitpcm data synth's defaults (vitpcm.data.synth)
    synthetic_val: int = 100,
    synthetic_test: int = 200,
    synthetic_size: int = 128,
    data_version: str = "",
) -> SingleNodeOutputs:
    """Train and evaluate ViT-PCM on one node, and register the model in MLflow.

    Args:
        dataset: voc12 (VOC 2012 + SBD), coco14, or synthetic (a small built-in set).
        config: Config name: voc12_vit_s16, voc12_vit_b16, coco14_vit_b16 or synthetic;
            empty follows the dataset (voc12_vit_s16, coco14_vit_b16, synthetic).
        pretrained: Backbone checkpoint: empty for the config's (the public Google ViT .npz
            of the paper configs), a path, s3:// or https:// URI, or none for random weights.
        epochs: Fine-tuning epochs; 0 keeps the config's value.
        overrides: Space-separated KEY=VALUE config overrides, e.g. "train.lr=3e-4".
        gpus: GPUs of the training pod: 0, 1, 2, 4, 8 or 16.
        mirror: Base URL serving the official dataset archives; empty for the official hosts.
        crf: Refine the pseudo masks with the dense CRF.
        mlflow_tracking_uri: MLflow server; empty to skip MLflow.
        experiment: MLflow experiment.
        registered_model: MLflow registered model name; empty for the config's
            (mlflow.registered_model: vitpcm-voc12, vitpcm-coco14, vitpcm-synthetic).
        checkpoint_root: s3:// prefix for training checkpoints (resume after a restart).
        shards: TFRecord shards per split; 0 for about 1000 images per shard.
        convert_workers: TFRecord encoding processes; 0 for every core of the machine.
        crf_workers: CRF processes; 0 keeps the config's crf.workers.
        synthetic_train: Synthetic training images (dataset=synthetic).
        synthetic_val: Synthetic validation images.
        synthetic_test: Synthetic test images.
        synthetic_size: Synthetic image side in pixels.
        data_version: Any label of the dataset's version (e.g. 2026-12): a new value makes the
            data steps fetch and convert again instead of reusing their cached outputs.
    """
    check = add_check_step(dataset, config, overrides, pretrained)
    convert = add_data_steps(
        dataset,
        mirror,
        shards,
        workers=convert_workers,
        after=check,
        data_version=data_version,
        synthetic_train=synthetic_train,
        synthetic_val=synthetic_val,
        synthetic_test=synthetic_test,
        synthetic_size=synthetic_size,
    )
    return _single_node_dag(
        convert,
        config=check.output,
        pretrained=pretrained,
        epochs=epochs,
        overrides=overrides,
        gpus=gpus,
        crf=crf,
        crf_workers=crf_workers,
        mlflow_tracking_uri=mlflow_tracking_uri,
        experiment=experiment,
        registered_model=registered_model,
        checkpoint_root=checkpoint_root,
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
        config: str = "",
        pretrained: str = "",
        epochs: int = 0,
        overrides: str = "",
        gpus: int = 1,
        crf: bool = True,
        mlflow_tracking_uri: str = "",
        experiment: str = "vitpcm",
        registered_model: str = "",
        checkpoint_root: str = "",
        shards: int = 0,
        convert_workers: int = cluster.CONVERT_WORKERS,
        crf_workers: int = cluster.CRF_WORKERS,
    ) -> SingleNodeOutputs:
        raw = dsl.importer(artifact_uri=source_dir, artifact_class=Dataset, reimport=False)
        raw.set_display_name("dataset folder")
        check = add_check_step(dataset, config, overrides, pretrained)
        convert = add_data_steps(
            dataset, "", shards, workers=convert_workers, raw=raw.output, after=check
        )
        return _single_node_dag(
            convert,
            config=check.output,
            pretrained=pretrained,
            epochs=epochs,
            overrides=overrides,
            gpus=gpus,
            crf=crf,
            crf_workers=crf_workers,
            mlflow_tracking_uri=mlflow_tracking_uri,
            experiment=experiment,
            registered_model=registered_model,
            checkpoint_root=checkpoint_root,
        )

    return pipeline
