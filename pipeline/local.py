"""Run the single-node pipeline on this machine with ``kfp.local`` (``make run-local``).

The same components as in the cluster run as subprocesses of this interpreter
(``SubprocessRunner(use_venv=False)``: the installed ``vitpcm`` is used, images are not).
Kubernetes settings (GPUs, Secrets, node selectors, retries) are ignored locally; the
environment of this process (S3 endpoint, MLflow credentials) is inherited by every step.

By default the built-in synthetic dataset is generated; ``mirror`` downloads VOC/COCO from
a mirror, and ``source_dir`` starts from a dataset folder already on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitpcm.errors import ConfigError, VitpcmError

DEFAULT_ROOT = "runs/local"
# Outputs of the single-node pipeline that are artifacts with a local path.
_FOLDERS = ("tfrecords", "model", "eval_report", "pseudo_masks")
_FILES = ("class_iou", "summary")
_METRICS = {"train": "train_metrics", "eval": "eval_metrics", "test": "test_metrics"}


@dataclass(frozen=True)
class SyntheticData:
    """Size of the generated dataset (``dataset="synthetic"``)."""

    train: int = 200
    val: int = 50
    test: int = 50
    size: int = 128


@dataclass
class LocalRun:
    """What a local run produced.

    Attributes:
        pipeline_root: Folder holding every step's outputs.
        artifacts: Local path of each artifact (``tfrecords``, ``model``, ``eval_report``,
            ``pseudo_masks`` folders; ``class_iou`` Markdown and ``summary`` JSON files).
        metrics: Scalar metrics per stage: ``train`` (best validation epoch), ``eval``
            (baseline pseudo masks), ``test`` (before/after the CRF).
        summary: The registration step's summary (metrics, artifact URIs, MLflow outcome).
    """

    pipeline_root: Path
    artifacts: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def _overrides_text(overrides: Sequence[str] | str) -> str:
    if isinstance(overrides, str):
        return overrides
    return shlex.join(overrides)


def run_local(
    *,
    pipeline_root: str | os.PathLike[str] = DEFAULT_ROOT,
    dataset: str = "synthetic",
    config: str = "synthetic",
    source_dir: str | os.PathLike[str] | None = None,
    mirror: str = "",
    epochs: int = 0,
    overrides: Sequence[str] | str = (),
    crf: bool = True,
    mlflow_tracking_uri: str = "",
    experiment: str = "vitpcm-local",
    registered_model: str = "vitpcm-local",
    checkpoint_root: str = "",
    synthetic: SyntheticData = SyntheticData(),  # noqa: B008  (frozen, so a safe default)
) -> LocalRun:
    """Run download/synth -> convert -> train -> evaluate -> infer + CRF -> register locally.

    Args:
        pipeline_root: Local folder for every step's outputs (one subfolder per run).
        dataset: ``synthetic``, ``voc12`` or ``coco14``.
        config: Config name or YAML path (e.g. ``synthetic``, ``voc12_vit_s16``).
        source_dir: A downloaded dataset (holding ``VOCdevkit/`` or ``coco2014/``) to start
            from instead of downloading.
        mirror: Base URL serving the official archives (``voc12``/``coco14``).
        epochs: Fine-tuning epochs; 0 keeps the config's value.
        overrides: ``KEY=VALUE`` config overrides (a list, or one space-separated string).
        crf: Refine the pseudo masks with the dense CRF.
        mlflow_tracking_uri: MLflow server; empty skips MLflow.
        experiment: MLflow experiment.
        registered_model: MLflow registered model name.
        checkpoint_root: Checkpoint folder or ``s3://`` prefix (resumable training).
        synthetic: Size of the generated dataset when ``dataset`` is ``synthetic``.

    Returns:
        The run's artifact paths, metrics and registration summary.

    Raises:
        ConfigError: A bad combination of arguments (e.g. a missing ``source_dir``).
        RuntimeError: A step failed (its log is printed above the error by kfp).
    """
    if source_dir is not None:
        source = Path(source_dir).resolve()
        if not source.is_dir():
            raise ConfigError(f"source_dir {source} is not a folder; pass a downloaded dataset")
        if dataset == "synthetic":
            raise ConfigError("source_dir holds real data: set dataset to voc12 or coco14")
    from kfp import local

    from pipeline.pipeline import prepared_data_pipeline, vitpcm_single_node_pipeline

    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    # Steps inherit this environment; TensorFlow's C++ start-up chatter drowns the step logs.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True
    )
    arguments: dict[str, Any] = {
        "dataset": dataset,
        "config": config,
        "epochs": epochs,
        "overrides": _overrides_text(overrides),
        # No accelerator request locally; TensorFlow uses the GPUs it can see.
        "gpus": 0,
        # The cluster's per-pod process counts do not fit this machine: 0 = every core for
        # the conversion, and the config's crf.workers (an override of it still applies).
        "convert_workers": 0,
        "crf_workers": 0,
        "crf": crf,
        "mlflow_tracking_uri": mlflow_tracking_uri,
        "experiment": experiment,
        "registered_model": registered_model,
        "checkpoint_root": checkpoint_root,
    }
    if source_dir is None:
        pipeline_func = vitpcm_single_node_pipeline
        arguments.update(
            mirror=mirror,
            synthetic_train=synthetic.train,
            synthetic_val=synthetic.val,
            synthetic_test=synthetic.test,
            synthetic_size=synthetic.size,
        )
    else:
        pipeline_func = prepared_data_pipeline(str(source))
    with warnings.catch_warnings():
        # kfp warns that image names without "python" may not run in a local interpreter;
        # they are our images, and locally the installed package stands in for them.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        task = pipeline_func(**arguments)
    return _collect(root, task.outputs)


def _collect(root: Path, outputs: Any) -> LocalRun:
    run = LocalRun(pipeline_root=root)
    for name in (*_FOLDERS, *_FILES):
        run.artifacts[name] = outputs[name].path
    for stage, name in _METRICS.items():
        run.metrics[stage] = {k: float(v) for k, v in outputs[name].metadata.items()}
    with open(run.artifacts["summary"], encoding="utf-8") as handle:
        run.summary = json.load(handle)
    return run


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.local",
        description="Run the ViT-PCM pipeline on this machine with kfp.local.",
    )
    parser.add_argument("--root", default=DEFAULT_ROOT, help=f"outputs folder ({DEFAULT_ROOT})")
    parser.add_argument("--dataset", default="synthetic", choices=["synthetic", "voc12", "coco14"])
    parser.add_argument("-c", "--config", default="synthetic", help="config name or YAML path")
    parser.add_argument("--source-dir", help="downloaded dataset folder (skips the download)")
    parser.add_argument("--mirror", default="", help="base URL serving the official archives")
    parser.add_argument("--epochs", type=int, default=0, help="fine-tuning epochs (config's)")
    parser.add_argument(
        "--set", metavar="KEY=VALUE", action="append", default=[], help="config override"
    )
    parser.add_argument("--no-crf", action="store_true", help="skip the dense CRF")
    parser.add_argument("--mlflow-uri", default="", help="MLflow tracking URI (none: skip)")
    parser.add_argument("--experiment", default="vitpcm-local", help="MLflow experiment")
    parser.add_argument("--train", type=int, default=SyntheticData.train, help="synthetic train")
    parser.add_argument("--val", type=int, default=SyntheticData.val, help="synthetic val")
    parser.add_argument("--test", type=int, default=SyntheticData.test, help="synthetic test")
    parser.add_argument("--size", type=int, default=SyntheticData.size, help="synthetic px")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.local``: run, then print the metrics and where the outputs are."""
    args = _parse_args(argv)
    try:
        run = run_local(
            pipeline_root=args.root,
            dataset=args.dataset,
            config=args.config,
            source_dir=args.source_dir,
            mirror=args.mirror,
            epochs=args.epochs,
            overrides=args.set,
            crf=not args.no_crf,
            mlflow_tracking_uri=args.mlflow_uri,
            experiment=args.experiment,
            synthetic=SyntheticData(args.train, args.val, args.test, args.size),
        )
    except VitpcmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RuntimeError as exc:  # kfp.local: a step failed; its log is above
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for stage, values in run.metrics.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(values.items()))
        print(f"{stage}: {shown}")
    print(f"model: {run.artifacts['model']}\npseudo masks: {run.artifacts['pseudo_masks']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
