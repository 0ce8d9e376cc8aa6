"""The closing summary of ``make run-local``: scores, where things are, the MLflow run.

:func:`build_summary` gathers it from a finished :class:`localrun.run.LocalRun` (step
metrics, the evaluation and test ``metrics.json`` files, the registration step's MLflow
outcome); :func:`format_summary` renders it for the terminal and :func:`write_summary`
saves it as JSON (``<root>/summary.json``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vitpcm.run_files import METRICS_JSON
from vitpcm.tracking.naming import ui_run_url

# Up to this many classes the table lists them all (VOC's 21 fit); beyond, the best and
# the worst few.
_ALL_CLASSES_UP_TO = 21
_SHOWN_AT_EACH_END = 5


def _read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def experiment_id_of(tracking_uri: str, run_id: str, timeout: float = 10.0) -> str | None:
    """The experiment id of an MLflow run (REST ``runs/get``), or None when unreachable."""
    import requests

    try:
        response = requests.get(
            f"{tracking_uri.rstrip('/')}/api/2.0/mlflow/runs/get",
            params={"run_id": run_id},
            timeout=timeout,
        )
        response.raise_for_status()
        return str(response.json()["run"]["info"]["experiment_id"])
    except (requests.RequestException, KeyError, ValueError):
        return None


def class_iou_rows(eval_dir: str | None, test_dir: str | None) -> list[dict[str, Any]]:
    """Per-class IoU: validation (baseline pseudo masks), test before and after the CRF."""
    val = _read_json(Path(eval_dir) / METRICS_JSON) if eval_dir else {}
    test = _read_json(Path(test_dir) / METRICS_JSON) if test_dir else {}
    names = val.get("class_names") or test.get("class_names") or []
    count = max(len(names), len(val.get("class_iou", [])), len(test.get("class_iou", [])))
    rows = []
    for index in range(count):
        row: dict[str, Any] = {"class": names[index] if index < len(names) else str(index)}
        for key, source, field in (
            ("val", val, "class_iou"),
            ("test", test, "class_iou"),
            ("test_crf", test, "class_iou_crf"),
        ):
            values = source.get(field) or []
            row[key] = _number(values[index]) if index < len(values) else None
        rows.append(row)
    return rows


def build_summary(
    run: Any,
    *,
    dataset: str,
    config: str,
    wall_seconds: float,
    steps: Sequence[Any] = (),
    log_path: str | os.PathLike[str] | None = None,
    tracking_uri: str = "",
    browse_command: str = "",
) -> dict[str, Any]:
    """The summary of a finished local run, as JSON-ready data.

    Args:
        run: the :class:`localrun.run.LocalRun`.
        dataset: dataset name of the run.
        config: config name or path of the run.
        wall_seconds: the whole command's duration.
        steps: :class:`localrun.progress.StepRecord` of each step (name, seconds, status).
        log_path: the step logs.
        tracking_uri: the MLflow server the run was logged to (for the run's URL).
        browse_command: how to browse the MLflow runs later.
    """
    eval_dir = run.artifacts.get("eval_report")
    test_dir = run.artifacts.get("pseudo_masks")
    val_report = _read_json(Path(eval_dir) / METRICS_JSON) if eval_dir else {}
    test_report = _read_json(Path(test_dir) / METRICS_JSON) if test_dir else {}
    metrics = run.metrics
    held_out = test_report.get("split") != val_report.get("split")
    summary: dict[str, Any] = {
        "dataset": dataset,
        "config": config,
        "wall_seconds": round(wall_seconds, 1),
        "steps": [
            {"name": s.name, "label": s.label, "seconds": s.seconds, "status": s.status}
            for s in steps
        ],
        "train": dict(metrics.get("train_metrics", {})),
        "val": {
            "purpose": "model selection: the selected model's baseline pseudo masks "
            "(evaluate step)",
            "split": val_report.get("split"),
            "miou": _number(metrics.get("eval_metrics", {}).get("miou")),
            "pixel_accuracy": _number(metrics.get("eval_metrics", {}).get("pixel_accuracy")),
            "num_images": val_report.get("num_images"),
        },
        "test": {
            "purpose": (
                "held-out test (infer + CRF step)"
                if held_out
                else "test on the model-selection split, not held out (infer + CRF step)"
            ),
            "held_out": held_out,
            "split": test_report.get("split"),
            "miou": _number(metrics.get("test_metrics", {}).get("miou")),
            "miou_crf": _number(metrics.get("test_metrics", {}).get("miou_crf")),
            "num_images": test_report.get("num_images"),
        },
        "class_iou": class_iou_rows(eval_dir, test_dir),
        "artifacts": {
            "pipeline_run": str(_run_folder(run)),
            "model": run.artifacts.get("model"),
            "pseudo_masks": _child(test_dir, "pseudo_masks"),
            "pseudo_masks_crf": _child(test_dir, "pseudo_masks_crf"),
            "eval_report": eval_dir,
            "tfrecords": run.artifacts.get("tfrecords"),
        },
        "log": None if log_path is None else str(log_path),
        "mlflow": _mlflow_part(run.summary.get("mlflow"), tracking_uri, browse_command),
    }
    spool = run.summary.get("mlflow_spool_uri")
    if spool:
        summary["artifacts"]["mlflow_spool"] = spool
    return summary


def _run_folder(run: Any) -> Path:
    model = run.artifacts.get("model")
    # <root>/<pipeline run>/<task>/<output>
    return Path(model).parent.parent if model else Path(run.pipeline_root)


def _child(folder: str | None, name: str) -> str | None:
    if not folder:
        return None
    path = Path(folder) / name
    return str(path) if path.is_dir() else None


def _mlflow_part(
    outcome: Mapping[str, Any] | None, tracking_uri: str, browse_command: str
) -> dict[str, Any] | None:
    if not outcome:
        return None
    part = dict(outcome)
    part["tracking_uri"] = tracking_uri or None
    part["browse"] = browse_command or None
    run_id = part.get("run_id")
    experiment_id = experiment_id_of(tracking_uri, run_id) if tracking_uri and run_id else None
    part["experiment_id"] = experiment_id
    base = tracking_uri.rstrip("/")
    part["run_url"] = ui_run_url(base, experiment_id, run_id) if experiment_id else None
    name, version = part.get("model_name"), part.get("version")
    part["model_url"] = f"{base}/#/models/{name}/versions/{version}" if name and version else None
    return part


def write_summary(summary: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Save the summary as JSON (written under a temporary name, then renamed)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    partial.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(partial, target)
    return target


def _score(value: float | None) -> str:
    return "  n/a " if value is None else f"{value:.4f}"


def _short_path(path: str | None) -> str:
    if not path:
        return "-"
    try:
        return os.path.relpath(path) if Path(path).is_relative_to(Path.cwd()) else path
    except ValueError:
        return path


def _class_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    if not rows:
        return []
    shown: list[Mapping[str, Any] | None] = list(rows)
    if len(rows) > _ALL_CLASSES_UP_TO:
        ranked = sorted(rows, key=lambda r: -1.0 if r["test"] is None else r["test"])
        shown = [*ranked[-_SHOWN_AT_EACH_END:][::-1], None, *ranked[:_SHOWN_AT_EACH_END][::-1]]
    width = max(12, *(len(str(r["class"])) for r in rows))
    lines = [f"    {'class':<{width}}  eval BPM  test BPM  test CRF"]
    for row in shown:
        if row is None:
            lines.append(f"    {'...':<{width}}")
            continue
        lines.append(
            f"    {row['class']:<{width}}  {_score(row['val'])}    {_score(row['test'])}"
            f"    {_score(row['test_crf'])}"
        )
    return lines


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


def format_summary(summary: Mapping[str, Any], summary_path: str | None = None) -> str:
    """The summary as the lines printed at the end of ``make run-local``."""
    val, test, train = summary["val"], summary["test"], summary.get("train", {})
    artifacts = summary["artifacts"]
    lines = [
        "",
        f"ViT-PCM local run finished in {_clock(summary['wall_seconds'])} "
        f"(dataset {summary['dataset']}, config {summary['config']})",
        "",
        f"  {'mIoU of the selected model':<50}{'split':<8}{'BPM':<8}after CRF",
    ]
    if train.get("val_miou") is not None:
        epochs = train.get("epochs_run")
        best = f"best of {int(epochs)} epochs" if epochs is not None else "best epoch"
        if train.get("best_epoch") is not None:
            best += f" (epoch {int(train['best_epoch'])})"
        lines.append(
            f"    {'model selection: ' + best:<48}{val.get('split') or '-':<8}"
            f"{_score(_number(train['val_miou']))}"
        )
    held_out = test.get("held_out", True)
    test_label = "held-out test: infer + CRF" if held_out else "test (not held out): infer + CRF"
    lines += [
        f"    {'model selection: evaluate step':<48}{val.get('split') or '-':<8}"
        f"{_score(val['miou'])}",
        f"    {test_label:<48}{test.get('split') or '-':<8}"
        f"{_score(test['miou'])}  {_score(test['miou_crf'])}",
    ]
    if train.get("train_miou") is not None:
        lines.append(f"    (training-subset mIoU at the best epoch: {train['train_miou']:.4f})")
    table = _class_table(summary.get("class_iou", []))
    if table:
        where = f"eval on {val.get('split') or '-'}, test on {test.get('split') or '-'}"
        lines += ["", f"  Per-class IoU ({where})", *table]
    lines += [
        "",
        f"  Model:            {_short_path(artifacts.get('model'))}",
        f"  Pseudo masks:     {_short_path(artifacts.get('pseudo_masks'))}",
    ]
    if artifacts.get("pseudo_masks_crf"):
        lines.append(f"  ... after CRF:    {_short_path(artifacts['pseudo_masks_crf'])}")
    lines.append(f"  All step outputs: {_short_path(artifacts.get('pipeline_run'))}")
    if summary.get("log"):
        lines.append(f"  Step logs:        {_short_path(summary['log'])}")
    lines += _mlflow_lines(summary.get("mlflow"))
    if summary_path:
        lines.append(f"  This summary:     {_short_path(summary_path)}")
    return "\n".join(lines) + "\n"


def _mlflow_lines(mlflow: Mapping[str, Any] | None) -> list[str]:
    if not mlflow:
        return ["  MLflow:           not used (no tracking URI)"]
    lines = [
        f"  MLflow run:       {mlflow.get('run_url') or mlflow.get('run_id')}",
        f"                    (experiment {mlflow.get('experiment')}, run {mlflow.get('run_id')})",
    ]
    version = mlflow.get("version")
    if version is not None:
        promoted = mlflow.get("promoted")
        verdict = {True: "new champion", False: "champion unchanged"}.get(promoted, "no gate")
        comparison = mlflow.get("champion_comparison")
        lines.append(
            f"  Registered model: {mlflow.get('model_name')} version {version}: {verdict}"
            + (f" ({comparison})" if comparison else "")
        )
    pending = int(mlflow.get("pending") or 0)
    if pending:
        lines.append(
            f"  warning: {pending} MLflow record(s) were not sent; replay them with "
            f"`.venv/bin/vitpcm mlflow replay {mlflow.get('spool_dir')}`"
        )
    if mlflow.get("browse"):
        lines.append(f"  Browse later:     {mlflow['browse']}")
    return lines
