"""The training step: trains in its own pod, or launches a distributed job and waits for it.

One step whichever way it trains, with the same outputs, so the DAG has no branch whose
outputs must be merged (an artifact ``dsl.OneOf`` resolves to the wrong branch on KFP
backends before 2.17, kubeflow/pipelines#13436) and every supported backend runs it:
``model`` (``model.keras``, ``config.yaml``, ``metrics.json``, ``history.json``) and
``metrics`` (validation mIoU of the best epoch).

``distributed`` chooses: ``none`` trains on the GPUs of this pod; ``trainjob`` runs the
workers as a Kubeflow Trainer v2 TrainJob, ``tfjob`` as a Training Operator v1 TFJob
(:mod:`components.launchers`). The dataset comes in as its URI, not as an input artifact,
so a launching step downloads nothing it does not read (KFP downloads every input
artifact into the pod); training reads the TFRecords straight from the artifact store.
"""

# No `from __future__ import annotations`: kfp reads the real annotation objects.
from kfp import dsl
from kfp.dsl import Metrics, Model, Output

from components.images import gpu_image


@dsl.component(base_image=gpu_image(), install_kfp_package=False)
def train_model(
    tfrecords_uri: str,
    model: Output[Model],
    metrics: Output[Metrics],
    config: str = "synthetic",
    overrides: str = "",
    epochs: int = 0,
    checkpoint_root: str = "",
    kfp_run_id: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    tracking_uri: str = "",
    experiment: str = "",
    registered_model: str = "",
    pretrained: str = "",
    distributed: str = "none",
    workers: int = 2,
    gpus_per_worker: int = 1,
    worker_image: str = "",
    worker_size: str = "",
    worker_node_selector: dict = {},  # noqa: B006  (kfp takes the default as a constant)
    worker_tolerations: list = [],  # noqa: B006
    timeout_hours: float = 72.0,
):
    """Train ViT-PCM (here, or as a distributed job) and keep the best epoch.

    Args:
        tfrecords_uri: URI of the converted dataset (TFRecords + dataset.json): a folder,
            or the pipeline's object store (``minio://`` is read as ``s3://``).
        model: Output folder: model.keras (best epoch), config.yaml, metrics.json, history.json.
        metrics: Validation mIoU and pixel accuracy of the best epoch.
        config: Config name from configs/ (e.g. voc12_vit_s16) or a YAML path inside the
            image.
        overrides: Space-separated KEY=VALUE config overrides, e.g. "train.lr=3e-4".
        epochs: Fine-tuning epochs; 0 keeps the config's train.epochs.
        checkpoint_root: s3:// prefix for checkpoints, so a retried step or a preempted job
            resumes from its last epoch; required when distributed. Empty keeps them inside
            the model artifact (no resume).
        kfp_run_id: Run id naming the checkpoint folder and the distributed job.
        tracking_uri: MLflow server the epochs are logged to as they end (the register
            step continues that run); empty: no MLflow.
        experiment: MLflow experiment; empty keeps the config's.
        registered_model: MLflow registered model the register step adds a version to;
            empty keeps the config's (so the run's param names the model registered).
        pretrained: Backbone checkpoint (path, s3:// or https:// URI); empty keeps the
            config's (the paper configs: the public Google ViT .npz); none: random weights.
        distributed: none (this pod), trainjob (Kubeflow Trainer v2) or tfjob (Training
            Operator v1).
        workers: Worker pods of a distributed job.
        gpus_per_worker: GPUs of each worker pod.
        worker_image: Image of the workers (the pipeline passes its GPU image).
        worker_size: JSON CPU/memory requests and limits of a worker and the GPU resource
            name (pipeline.cluster sets it).
        worker_node_selector: Node labels the TFJob workers require when they have GPUs (a
            TrainJob's come from its TrainingRuntime); CPU-only workers get none.
        worker_tolerations: Tolerations of the TFJob workers, likewise GPU workers only.
        timeout_hours: Give up on (and delete) a distributed job after this long.
    """
    import atexit
    import os
    import shlex
    import sys

    from components.launchers import DISTRIBUTED_MODES
    from vitpcm import storage
    from vitpcm.config import load_config
    from vitpcm.errors import ConfigError
    from vitpcm.run_files import CONFIG_FILE, HISTORY_JSON, METRICS_JSON, MODEL_FILE
    from vitpcm.train import train

    if distributed not in DISTRIBUTED_MODES:
        choices = ", ".join(DISTRIBUTED_MODES)
        raise ConfigError(f"distributed must be one of {choices}, not {distributed!r}")
    sets = shlex.split(overrides)
    if epochs > 0:
        sets.append(f"train.epochs={epochs}")
    if experiment:
        sets.append(f"mlflow.experiment={experiment}")
    if registered_model:
        sets.append(f"mlflow.registered_model={registered_model}")
    from components.pretrained import pretrained_overrides, warn_if_random

    sets.extend(pretrained_overrides(pretrained))
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    else:  # as in the register step: no URI, no MLflow
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("KFP_RUN_ID", kfp_run_id)  # tagged on the MLflow run
    cfg = load_config(config, sets)  # a bad key fails here, before any job starts
    warn_if_random(cfg)  # a real dataset from random weights: said as loudly as possible
    data = tfrecords_uri
    if data.startswith("minio://"):
        data = "s3://" + data[len("minio://") :]

    out = model.path
    if distributed != "none":
        from components.launchers import workers as w

        if not worker_image:
            raise ConfigError("worker_image is empty: name the workers' (GPU) image")
        out = w.training_out_uri(checkpoint_root, kfp_run_id)
        spec = w.worker_spec_from_json(
            worker_size,
            image=worker_image,
            command=w.train_command(config, w.dataset_uri(tfrecords_uri), out, sets),
            workers=workers,
            gpus=gpus_per_worker,
            env=w.env_pairs(os.environ, ("MLFLOW_TRACKING_URI", "KFP_RUN_ID")),
        )
    elif checkpoint_root:
        out = storage.join(checkpoint_root, kfp_run_id, "train")
    if (storage.is_s3(out) or storage.is_s3(data)) and os.environ.get("_KFP_RUNTIME") == "true":
        # tensorflow-io aborts at interpreter teardown after any s3:// access
        # (tensorflow/io#2039), which would fail the step after its outputs are
        # recorded; leave through os._exit with the right status instead.
        atexit.register(
            lambda: storage.exit_process(int(getattr(sys, "last_value", None) is not None))
        )

    if distributed == "none":
        result = train(cfg, data_uri=data, out_uri=out, progress=False)
        if out != model.path:
            from vitpcm.tracking.spool import RUN_FILE

            # RUN_FILE names the MLflow run the register step continues and its spool's place.
            tracked = storage.exists(storage.join(out, RUN_FILE))
            for name in (MODEL_FILE, CONFIG_FILE, METRICS_JSON, HISTORY_JSON, RUN_FILE):
                if name != RUN_FILE or tracked:
                    data_bytes = storage.read_bytes(storage.join(out, name))
                    storage.write_bytes(os.path.join(model.path, name), data_bytes)
    else:
        name, labels = w.job_name(kfp_run_id), {"vitpcm/run-id": w.run_label(kfp_run_id)}
        if distributed == "trainjob":
            from components.launchers.trainjob import run_trainjob

            run_trainjob(name=name, spec=spec, labels=labels, timeout_s=timeout_hours * 3600)
        else:
            from components.launchers.tfjob import run_tfjob

            run_tfjob(
                name=name,
                spec=spec,
                node_selector=worker_node_selector,
                tolerations=worker_tolerations,
                env_secrets=["vitpcm-s3", "vitpcm-mlflow"],
                labels=labels,
                timeout_s=timeout_hours * 3600,
            )
        result = w.collect_outputs(out, model.path)  # model, metrics and the MLflow run

    metrics.log_metric("val_miou", float(result["miou"]))
    metrics.log_metric("val_pixel_accuracy", float(result["pixel_accuracy"]))
    if result.get("train_miou") is not None:
        metrics.log_metric("train_miou", float(result["train_miou"]))
    metrics.log_metric("best_epoch", int(result["best_epoch"]))  # counted from 1
    metrics.log_metric("epochs_run", int(result["epochs_run"]))
    metrics.log_metric("workers", int(result.get("workers", 1)))
    model.metadata.update(
        {
            "framework": "keras",
            "config": cfg.name,
            "backbone": cfg.model.backbone,
            "num_classes": cfg.data.num_classes,
            "val_miou": float(result["miou"]),
            "distributed": distributed,
        }
    )
