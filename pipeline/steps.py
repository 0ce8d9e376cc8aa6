"""The steps of the ViT-PCM DAG, with what each asks of the cluster.

Each ``add_*`` function creates its tasks inside the pipeline being defined and attaches
the Kubernetes settings (pod sizes, GPU request and placement, Secrets as environment,
retries, caching), so every pipeline in :mod:`pipeline.pipeline` gets the same steps.
``kfp.local`` ignores these settings.
"""

import json

from kfp import dsl, kubernetes
from kfp.dsl import PipelineTask
from kfp.dsl.pipeline_channel import PipelineChannel

from components import (
    check_run,
    convert_data,
    download_data,
    evaluate_model,
    gpu_placement,
    images,
    infer_crf,
    register_model,
    train_model,
)
from pipeline import cluster


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


def _use_mlflow_secret(task: PipelineTask) -> None:
    """MLflow credentials, and the S3 endpoint under the name MLflow's artifact client reads."""
    kubernetes.use_secret_as_env(
        task, cluster.MLFLOW_SECRET, {key: key for key in cluster.MLFLOW_SECRET_KEYS}
    )


def _on_gpu_nodes(task: PipelineTask, gpus: int, distributed: str = "none") -> None:
    """Request ``gpus`` GPUs with the compile-time placement; none of it when ``gpus`` is 0
    or the task only launches a ``distributed`` job."""
    settings = cluster.gpu_placement()
    placement = gpu_placement(
        gpus=gpus,
        distributed=distributed,
        resource=settings.resource,
        node_selector=settings.node_selector,
        tolerations=settings.tolerations,
    ).set_display_name("GPU placement")
    placement.set_caching_options(True).set_cpu_limit("100m").set_memory_limit("256Mi")
    # The count as the placement step's string output, never the int `gpus` itself: the
    # driver resolves a parameterised count with GetStringValue() (see gpu_placement).
    task.set_accelerator_type(placement.outputs["resource"])
    task.set_accelerator_limit(placement.outputs["count"])
    kubernetes.add_node_selector_json(task, placement.outputs["node_selector"])
    kubernetes.add_toleration_json(task, placement.outputs["tolerations"])


def _data_retries(task: PipelineTask) -> PipelineTask:
    return task.set_retry(
        num_retries=cluster.DATA_RETRIES,
        backoff_duration=cluster.RETRY_BACKOFF,
        backoff_factor=cluster.RETRY_BACKOFF_FACTOR,
        backoff_max_duration=cluster.RETRY_BACKOFF_MAX,
    )


def add_check_step(dataset: str, config: str, overrides: str, pretrained: str = "") -> PipelineTask:
    """The first step: dataset, config and pre-trained weights fit (``vitpcm.run_plan``).

    Its output is the config name the training step loads (the dataset's default when
    ``config`` is empty). Not cached: it is cheap, and a local checkpoint may have gone.
    """
    check = check_run(dataset=dataset, config=config, overrides=overrides, pretrained=pretrained)
    check.set_display_name("check dataset and config").set_caching_options(False)
    return check.set_cpu_limit("500m").set_memory_limit("512Mi")


def add_data_steps(
    dataset: str,
    mirror: str,
    shards: int,
    workers: int = cluster.CONVERT_WORKERS,
    raw: PipelineChannel | None = None,
    after: PipelineTask | None = None,
    data_version: str = "",
    **synthetic: int,
) -> PipelineTask:
    """Download (or synthesise) and convert; returns the convert task (``tfrecords``).

    ``raw``, when given, is an already downloaded dataset (an importer's output) and the
    download step is left out. ``after`` (the check step) runs before either.
    ``data_version`` enters both steps' cache keys: a new value fetches the data again.
    """
    if raw is None:
        download = download_data(
            dataset=dataset, mirror=mirror, data_version=data_version, **synthetic
        )
        download.set_display_name("download data")
        _size(_data_retries(download), "download").set_caching_options(True)
        if after is not None:
            download.after(after)
        raw = download.outputs["raw"]
    convert = convert_data(
        raw=raw, dataset=dataset, shards=shards, workers=workers, data_version=data_version
    ).set_display_name("convert to TFRecords")
    _size(_data_retries(convert), "convert").set_caching_options(True)
    if after is not None:
        convert.after(after)
    return convert


def add_train_step(
    convert: PipelineTask,
    config: str,
    overrides: str,
    epochs: int,
    gpus: int,
    checkpoint_root: str,
    mlflow_tracking_uri: str = "",
    experiment: str = "",
    distributed: str = "none",
    workers: int = 2,
    pretrained: str = "",
    registered_model: str = "",
) -> PipelineTask:
    """Training, logging epochs to MLflow: on ``gpus`` GPUs of this step's pod, or, with
    ``distributed`` (trainjob, tfjob), as a job of ``workers`` pods with ``gpus`` GPUs each.

    The step reads the dataset from the convert step's artifact by its URI (its ``Output``),
    so KFP downloads nothing into a pod that only launches a job.
    """
    placement = cluster.gpu_placement()
    size = cluster.POD_SIZES["train"]
    worker_size = {
        "gpu_resource": placement.resource,
        "cpu_request": size.cpu_request,
        "memory_request": size.memory_request,
        "cpu_limit": size.cpu_limit,
        "memory_limit": size.memory_limit,
    }
    train = train_model(
        tfrecords_uri=convert.outputs["Output"],
        config=config,
        overrides=overrides,
        epochs=epochs,
        checkpoint_root=checkpoint_root,
        kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        tracking_uri=mlflow_tracking_uri,
        experiment=experiment,
        registered_model=registered_model,
        pretrained=pretrained,
        distributed=distributed,
        workers=workers,
        gpus_per_worker=gpus,
        worker_image=images.gpu_image(),
        worker_size=json.dumps(worker_size, sort_keys=True),
        worker_node_selector=placement.node_selector,
        worker_tolerations=placement.tolerations,
    ).set_display_name("train ViT-PCM")
    _size(train, "train").set_caching_options(False).set_retry(cluster.TRAIN_RETRIES)
    _on_gpu_nodes(train, gpus, distributed)
    _use_s3_secret(train, for_mlflow=True)
    _use_mlflow_secret(train)
    return train


def add_scoring_steps(
    model: PipelineChannel,
    tfrecords_uri: PipelineChannel,
    crf: bool,
    experiment: str,
    registered_model: str,
    mlflow_tracking_uri: str,
    crf_workers: int = cluster.CRF_WORKERS,
) -> tuple[PipelineTask, PipelineTask, PipelineTask]:
    """Evaluate, infer + CRF, register; returns the three tasks.

    ``tfrecords_uri`` is the convert step's output (the dataset's URI): each step reads the
    split it needs in place (with the S3 Secret) instead of a copy of every shard.
    """
    evaluate = evaluate_model(model=model, tfrecords_uri=tfrecords_uri)
    evaluate.set_display_name("evaluate")
    _size(evaluate, "evaluate").set_caching_options(False)
    _use_s3_secret(evaluate)
    infer = infer_crf(
        model=model, tfrecords_uri=tfrecords_uri, crf=crf, workers=crf_workers
    ).set_display_name("infer pseudo masks + CRF")
    _size(infer, "infer").set_caching_options(False)
    _use_s3_secret(infer)
    register = register_model(
        model=model,
        eval_metrics=evaluate.outputs["metrics"],
        test_metrics=infer.outputs["metrics"],
        eval_report=evaluate.outputs["report"],
        pseudo_masks=infer.outputs["pseudo_masks"],
        # For the sample overlays (test images and ground truth next to the pseudo masks).
        tfrecords_uri=tfrecords_uri,
        tracking_uri=mlflow_tracking_uri,
        experiment=experiment,
        model_name=registered_model,
        kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    ).set_display_name("register in MLflow")
    _size(register, "register").set_caching_options(False)
    _use_s3_secret(register, for_mlflow=True)
    _use_mlflow_secret(register)
    return evaluate, infer, register
