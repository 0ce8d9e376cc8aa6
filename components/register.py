"""Registration step: complete the run in MLflow and register the model.

``vitpcm.tracking.log_pipeline_run`` does the MLflow work: it continues the run the training
step logged its epochs to (from the training's spool, read where the training wrote it:
records an outage held back are sent first, nothing twice), or creates the run with the
curves from history.json when the training was not tracked; then metrics, plots, model,
champion promotion. This step gathers the artifacts of the run for it and writes a summary
JSON that the Kubeflow UI and ``run_local`` show.
"""

# No `from __future__ import annotations`: kfp reads the real annotation objects.
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.images import cpu_image


@dsl.component(base_image=cpu_image(), install_kfp_package=False)
def register_model(
    model: Input[Model],
    eval_metrics: Input[Metrics],
    test_metrics: Input[Metrics],
    eval_report: Input[Artifact],
    pseudo_masks: Input[Dataset],
    summary: Output[Artifact],
    mlflow_spool: Output[Artifact],
    tfrecords_uri: str = "",
    tracking_uri: str = "",
    experiment: str = "vitpcm",
    model_name: str = "",
    kfp_run_id: str = dsl.PIPELINE_JOB_ID_PLACEHOLDER,
):
    """Log the run to MLflow, register the model, and write a summary of the run.

    Args:
        model: Training output folder (model.keras, config.yaml, metrics.json, history.json;
            mlflow_run.json, naming the run and its spool, when the training logged to MLflow).
        eval_metrics: Validation metrics of the baseline pseudo masks.
        test_metrics: Test metrics before and after the CRF.
        eval_report: Evaluation folder (metrics.json, confusion matrix, IoU plot).
        pseudo_masks: Inference folder (pseudo masks, metrics.json).
        summary: JSON summary of the run (metrics, artifact URIs, MLflow outcome).
        mlflow_spool: Folder: the MLflow records of this run (the training's included),
            journaled before sending; what MLflow did not acknowledge (it was down) is
            replayed from here with ``vitpcm mlflow replay``.
        tfrecords_uri: Converted dataset (folder, s3:// or the pipeline's minio:// URI),
            read in place; when given, its test split gives the sample overlays and its
            dataset.json the run's dataset inputs.
        tracking_uri: MLflow tracking URI; empty skips MLflow on purpose. When set, the
            step fails unless the model is registered with every record sent.
        experiment: MLflow experiment name (a run the training created keeps its own).
        model_name: Registered model name in the MLflow model registry; empty for the
            config's mlflow.registered_model.
        kfp_run_id: Kubeflow run id, recorded as an MLflow tag.
    """
    import json
    import logging
    import os

    # Always there, even empty: a declared output folder that is missing fails the upload.
    os.makedirs(mlflow_spool.path, exist_ok=True)
    record = {
        "kfp_run_id": kfp_run_id,
        "model_uri": model.uri,
        "eval_report_uri": eval_report.uri,
        "pseudo_masks_uri": pseudo_masks.uri,
        "mlflow_spool_uri": mlflow_spool.uri,
        "model": dict(model.metadata),
        "eval": dict(eval_metrics.metadata),
        "test": dict(test_metrics.metadata),
        "mlflow": None,
    }

    def write_summary() -> None:
        with open(summary.path, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2, sort_keys=True, default=str)
            handle.write("\n")
        summary.metadata["tracked"] = bool(record["mlflow"] and record["mlflow"].get("version"))

    if not tracking_uri:
        logging.warning(
            "MLflow skipped on purpose: mlflow_tracking_uri is empty, so this run is not "
            "logged or registered (set it to the MLflow server to register the model)"
        )
        write_summary()
        return

    from components.artifacts import exit_cleanly_after_s3, readable_uri
    from components.registration import keep_spool, registration_failure
    from vitpcm import events
    from vitpcm.tracking import log_pipeline_run

    data = readable_uri(tfrecords_uri)
    exit_cleanly_after_s3(data)

    error = None
    try:
        record["mlflow"] = log_pipeline_run(
            tracking_uri=tracking_uri,
            experiment=experiment,
            model_name=model_name,
            model_dir=model.path,
            eval_dir=eval_report.path,
            test_dir=pseudo_masks.path,
            kfp_run_id=kfp_run_id,
            data_dir=data or None,
            spool_dir=mlflow_spool.path,
            data_uri=data or None,
            pseudo_masks_uri=pseudo_masks.uri,
        )
        problem = registration_failure(record["mlflow"])
    except Exception as exc:  # reported below with the spool's place, then re-raised
        problem, error = f"{type(exc).__name__}: {exc}", exc
    if problem is None:
        outcome = record["mlflow"]
        events.emit(
            "registered",
            run_id=outcome.get("run_id"),
            model=outcome.get("model_name"),
            version=outcome.get("version"),
            promoted=outcome.get("promoted"),
        )
        write_summary()
        return
    # MLflow was asked for and the model is not registered: fail the run (a green run here
    # would hide that scheduled retraining registers nothing), keeping what was not sent.
    record["mlflow_error"] = problem
    write_summary()
    kept = keep_spool(mlflow_spool.path, mlflow_spool.uri)
    raise RuntimeError(
        f"MLflow registration at {tracking_uri} failed ({problem}); the records wait in "
        f"{kept}: once MLflow answers, copy that folder here and run "
        "`vitpcm mlflow replay FOLDER` (or rerun the pipeline)"
    ) from error
