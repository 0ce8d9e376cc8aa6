"""Training steps: single-node training in the step's own pod, or a multi-worker TFJob.

Both produce the same outputs, so the steps after them do not care which one ran:
``model`` (the training output folder: ``model.keras``, ``config.yaml``, ``metrics.json``,
``history.json``) and ``metrics`` (validation mIoU of the best epoch).
"""

# No `from __future__ import annotations`: kfp reads the real annotation objects.
from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from pipeline.images import cpu_image, gpu_image


@dsl.component(base_image=gpu_image(), install_kfp_package=False)
def train_model(
    tfrecords: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    config: str = "synthetic",
    overrides: str = "",
    epochs: int = 0,
    checkpoint_root: str = "",
    kfp_run_id: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    tracking_uri: str = "",
    experiment: str = "",
):
    """Train ViT-PCM on every GPU of this pod (or the CPU) and keep the best epoch.

    Args:
        tfrecords: Converted dataset (TFRecords + dataset.json).
        model: Output folder: model.keras (best epoch), config.yaml, metrics.json, history.json.
        metrics: Validation mIoU and pixel accuracy of the best epoch.
        config: Config name from configs/ (voc12_vit_s16, voc12_vit_b16, coco14_vit_b16,
            synthetic) or a YAML path inside the image.
        overrides: Space-separated KEY=VALUE config overrides, e.g. "train.lr=3e-4".
        epochs: Fine-tuning epochs; 0 keeps the config's train.epochs.
        checkpoint_root: s3:// prefix for checkpoints, so a retried or restarted step resumes
            from its last epoch; empty keeps them inside the model artifact (no resume).
        kfp_run_id: Run id naming the checkpoint folder under checkpoint_root.
        tracking_uri: MLflow server the epochs are logged to as they end (the register
            step continues that run); empty: no MLflow.
        experiment: MLflow experiment; empty keeps the config's.
    """
    import atexit
    import os
    import shlex
    import sys

    from vitpcm import storage
    from vitpcm.config import load_config
    from vitpcm.train import CONFIG_FILE, HISTORY_JSON, METRICS_JSON, MODEL_FILE, train

    sets = shlex.split(overrides)
    if epochs > 0:
        sets.append(f"train.epochs={epochs}")
    if experiment:
        sets.append(f"mlflow.experiment={experiment}")
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    else:  # as in the register step: no URI, no MLflow
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("KFP_RUN_ID", kfp_run_id)  # tagged on the MLflow run
    cfg = load_config(config, sets)
    out = model.path
    if checkpoint_root:
        out = storage.join(checkpoint_root, kfp_run_id, "train")
        if storage.is_s3(out) and os.environ.get("_KFP_RUNTIME") == "true":
            # tensorflow-io aborts at interpreter teardown after any s3:// access
            # (tensorflow/io#2039), which would fail the step after its outputs are
            # recorded; leave through os._exit with the right status instead.
            atexit.register(
                lambda: storage.exit_process(int(getattr(sys, "last_value", None) is not None))
            )
    result = train(cfg, data_uri=tfrecords.path, out_uri=out, progress=False)
    if out != model.path:
        for name in (MODEL_FILE, CONFIG_FILE, METRICS_JSON, HISTORY_JSON):
            data = storage.read_bytes(storage.join(out, name))
            storage.write_bytes(os.path.join(model.path, name), data)
        from vitpcm.tracking.training import export_tracking

        export_tracking(out, model.path)  # the MLflow run the register step continues

    metrics.log_metric("val_miou", float(result["miou"]))
    metrics.log_metric("val_pixel_accuracy", float(result["pixel_accuracy"]))
    if result.get("train_miou") is not None:
        metrics.log_metric("train_miou", float(result["train_miou"]))
    metrics.log_metric("best_epoch", int(result["best_epoch"]))  # counted from 1
    metrics.log_metric("epochs_run", int(result["epochs_run"]))
    model.metadata.update(
        {
            "framework": "keras",
            "config": cfg.name,
            "backbone": cfg.model.backbone,
            "num_classes": cfg.data.num_classes,
            "val_miou": float(result["miou"]),
        }
    )


@dsl.component(base_image=cpu_image(), install_kfp_package=False)
def train_model_tfjob(
    tfrecords: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    image: str,
    work_root: str,
    config: str = "voc12_vit_b16",
    overrides: str = "",
    epochs: int = 0,
    workers: int = 2,
    gpus_per_worker: int = 1,
    node_selector: dict = {},  # noqa: B006  (kfp takes the default as the UI's initial value)
    tolerations: list = [],  # noqa: B006
    env_secrets: list = [],  # noqa: B006
    timeout_hours: float = 72.0,
    kfp_run_id: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER,
):
    """Train with MultiWorkerMirroredStrategy as a Kubeflow Training Operator TFJob.

    The workers read the TFRecords straight from the pipeline's object store and write to
    work_root; this step waits for the job, then copies the run's outputs into ``model``.

    Args:
        tfrecords: Converted dataset; must live in S3-compatible storage (MinIO).
        model: Output folder: model.keras, config.yaml, metrics.json, history.json.
        metrics: Validation mIoU and pixel accuracy of the best epoch.
        image: Training image of the workers.
        work_root: s3:// prefix the workers write to (one folder per run).
        config: Config name from configs/ or a YAML path inside the image.
        overrides: Space-separated KEY=VALUE config overrides.
        epochs: Fine-tuning epochs; 0 keeps the config's train.epochs.
        workers: Worker pods (one replica each).
        gpus_per_worker: GPUs per worker pod.
        node_selector: Node labels the worker pods require.
        tolerations: Tolerations of the worker pods.
        env_secrets: Secrets whose keys become environment variables of the workers.
        timeout_hours: Give up (and delete the job) after this long.
        kfp_run_id: Run id naming the job and its output folder.
    """
    import shlex

    from components.tfjob import artifact_s3_uri, run_training_tfjob, training_out_uri

    sets = shlex.split(overrides)
    if epochs > 0:
        sets.append(f"train.epochs={epochs}")
    result = run_training_tfjob(
        run_id=kfp_run_id,
        image=image,
        config=config,
        overrides=sets,
        data_uri=artifact_s3_uri(tfrecords.uri),
        out_uri=training_out_uri(work_root, kfp_run_id),
        model_dir=model.path,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        node_selector=node_selector,
        tolerations=tolerations,
        env_secrets=env_secrets,
        timeout_s=timeout_hours * 3600.0,
    )
    metrics.log_metric("val_miou", float(result["miou"]))
    metrics.log_metric("val_pixel_accuracy", float(result["pixel_accuracy"]))
    metrics.log_metric("best_epoch", int(result["best_epoch"]))  # counted from 1
    metrics.log_metric("epochs_run", int(result["epochs_run"]))
    metrics.log_metric("workers", workers)
    model.metadata.update({"framework": "keras", "config": config, "workers": workers})
