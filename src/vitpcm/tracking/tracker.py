"""``RunTracker``: one MLflow run per job, every record through the spool first.

A run shows (DESIGN.md) a description, tags (dataset, backbone, config, version, the
Kubeflow run and its link), the config as params, curves, results per stage, plots,
dataset inputs, ``config.yaml``, ``metrics.json`` and the registered, gated model. An
unreachable server costs a warning, never the job; ``vitpcm mlflow replay`` sends the rest.

    with RunTracker(cfg, out_dir) as tracker:
        result = train(cfg, out_uri=out_dir, callbacks=[tracker.epoch_callback], tracking=False)
        tracker.log_results(result, split=cfg.data.val_split)
        tracker.log_model(model, miou=result["miou"], split=cfg.data.val_split)
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from vitpcm import __version__, storage
from vitpcm.config import Config, save_config
from vitpcm.errors import TrackingError
from vitpcm.metrics import json_safe
from vitpcm.run_files import CONFIG_FILE, METRICS_JSON
from vitpcm.tracking.figures import write_split_figures
from vitpcm.tracking.naming import (
    NOTE_TAG,
    curve_key,
    default_experiment,
    default_registered_model,
    final_metrics,
    finite_number,
    flatten_params,
    kfp_run_url,
    metric_key,
    param_value,
    run_description,
    source_tags,
)
from vitpcm.tracking.registry import ChampionDecision
from vitpcm.tracking.sender import SpoolSender
from vitpcm.tracking.spool import SPOOL_DIRNAME, Spool, now_ms

log = logging.getLogger("vitpcm.tracking")


@dataclass(frozen=True)
class ModelLogResult:
    """What :meth:`RunTracker.log_model` achieved (ids are ``None`` while ``pending``)."""

    pending: bool
    model_id: str | None
    model_name: str | None
    version: str | None
    decision: ChampionDecision | None


class RunTracker:
    """One MLflow run, logged through a local spool.

    Args:
        cfg: the resolved config (params, tags, experiment and model names).
        out_dir: the job's output folder; the spool goes to ``<out_dir>/mlflow-spool``.
        tracking_uri: default ``mlflow.tracking_uri``, then ``$MLFLOW_TRACKING_URI``; with
            none, records only go to the spool (replay later).
        experiment: experiment name (default :func:`default_experiment`).
        kfp_run_id: Kubeflow run id (default ``$KFP_RUN_ID``), linked with ``kfp_ui_url``
            (KFP UI base URL or ``{run_id}`` template, default ``$KFP_UI_URL``).
        spool_dir: the spool, instead of ``<out_dir>/mlflow-spool`` (required for ``s3://``).
        retry_interval_s: after a failed send, wait this long before trying again.
        log_config: log the config as params and ``config.yaml`` (not when continuing).
        source: what runs (the Source column); data_uri: the TFRecords, described.
    """

    def __init__(
        self,
        cfg: Config,
        out_dir: str | os.PathLike[str],
        *,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        kfp_run_id: str | None = None,
        kfp_ui_url: str | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        retry_interval_s: float = 60.0,
        log_config: bool = True,
        source: str = "vitpcm",
        data_uri: str | None = None,
    ) -> None:
        self.cfg, self.source, self.data_uri = cfg, source, data_uri
        self.tracking_uri = (
            tracking_uri or cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        )
        self.experiment = experiment or default_experiment(cfg)
        self.run_name = f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        self.kfp_run_id = kfp_run_id or os.environ.get("KFP_RUN_ID") or None
        kfp_ui_url = kfp_ui_url or os.environ.get("KFP_UI_URL")
        self.kfp_link = None
        if self.kfp_run_id and kfp_ui_url:
            self.kfp_link = (self.kfp_run_id, kfp_run_url(kfp_ui_url, self.kfp_run_id))
        out = storage.local_path(out_dir)
        if spool_dir is None and storage.is_remote(out):
            raise TrackingError(
                f"output {out} is not on a local disk, so the MLflow spool cannot live "
                "there; pass a local spool_dir"
            )
        self.spool_dir = Path(storage.local_path(spool_dir or os.path.join(out, SPOOL_DIRNAME)))
        self.retry_interval_s, self.log_config = retry_interval_s, log_config
        self.spool: Spool | None = None
        self.sender: SpoolSender | None = None
        self._next_try = 0.0
        self._final: dict[str, Any] = {}

    def __enter__(self) -> RunTracker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        killed = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        self.finish("FINISHED" if exc_type is None else "KILLED" if killed else "FAILED")

    def run_tags(self) -> dict[str, str]:
        """The tags the run is created with."""
        cfg = self.cfg
        tags = {
            "dataset": cfg.data.dataset,
            "backbone": cfg.model.backbone,
            "config": cfg.name,
            "vitpcm.version": __version__,
            **source_tags(self.source, self.kfp_run_id),
        }
        if self.kfp_run_id:
            tags["kfp.run_id"] = self.kfp_run_id
        if self.kfp_link:
            tags["kfp.run_url"] = self.kfp_link[1]
        tags[NOTE_TAG] = run_description(cfg, data_uri=self.data_uri, kfp_link=self.kfp_link)
        return tags

    def describe(self, results: Mapping[str, Any] | None = None) -> None:
        """Set the run description again, with the headline ``results`` once known."""
        text = run_description(
            self.cfg, data_uri=self.data_uri, kfp_link=self.kfp_link, results=results
        )
        self.set_tags({NOTE_TAG: text})

    def start(self) -> None:
        """Open the spool and record the run start, the params and the config."""
        if self.spool is not None:
            return
        self.spool = Spool(self.spool_dir, self.tracking_uri)
        if self.tracking_uri:
            self.sender = SpoolSender(self.spool, self.tracking_uri)
        else:
            log.info(
                "no MLflow tracking URI (set mlflow.tracking_uri or MLFLOW_TRACKING_URI); "
                "records are kept in %s for `vitpcm mlflow replay`",
                self.spool_dir,
            )
        tags = self.run_tags()
        if any(r.kind == "start_run" for r in self.spool.records()):
            tags.pop(NOTE_TAG)  # a continued run keeps its description (links, results)
        start = {"experiment": self.experiment, "run_name": self.run_name, "tags": tags}
        self.spool.append("start_run", start)
        if self.log_config:
            self.log_params(flatten_params(self.cfg.to_dict()))
            with tempfile.TemporaryDirectory() as tmp:
                save_config(self.cfg, os.path.join(tmp, CONFIG_FILE))
                self.log_artifact(os.path.join(tmp, CONFIG_FILE), move=True)
        self.flush()

    def finish(self, status: str = "FINISHED") -> None:
        """Record the run's end, make a last attempt to send, and say what is left."""
        if self.spool is None:
            return
        self.spool.append("end_run", {"status": status})
        self.flush(force=True)
        left = len(self.spool.pending())
        if left:
            log.warning(
                "%d MLflow record(s) not sent to %s; they are safe in %s: send them with "
                "`vitpcm mlflow replay %s%s`",
                left,
                self.tracking_uri or "your MLflow server",
                self.spool_dir,
                self.spool_dir,
                "" if self.tracking_uri else " --tracking-uri URI",
            )
        self.spool = None

    def _spool(self) -> Spool:
        if self.spool is None:
            raise TrackingError("the RunTracker is not started: use it as a context manager")
        return self.spool

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, once the server has been reached."""
        return self._spool().load_state().run_id

    @property
    def pending(self) -> int:
        """How many records wait in the spool."""
        return len(self._spool().pending())

    def flush(self, force: bool = False) -> int:
        """Send pending records unless a failure less than ``retry_interval_s`` ago says
        to wait (``force``: try anyway); never raises. Returns how many were sent."""
        sender = self.sender
        if sender is None or (not force and time.monotonic() < self._next_try):
            return 0
        try:
            sent = sender.flush()
        except Exception as exc:  # tracking must never stop the job
            if sender.outage is None:
                log.warning("cannot send to MLflow (%s); records stay in %s", exc, self.spool_dir)
            sender.outage, sent = str(exc), 0
        if sender.outage is not None:
            self._next_try = time.monotonic() + self.retry_interval_s
        return sent

    def _append(self, kind: str, data: Mapping[str, Any], **files: Any) -> None:
        move = files.pop("move", False)
        self._spool().append(kind, data, files or None, move=move)
        self.flush()

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (values become YAML-style strings)."""
        if params:
            values = {metric_key(k): param_value(v) for k, v in params.items()}
            self._append("params", {"params": values})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags."""
        if tags:
            self._append("tags", {"tags": {k: str(v) for k, v in tags.items()}})

    def log_metrics(
        self, metrics: Mapping[str, Any], step: int = 0, *, timestamp: int | None = None
    ) -> None:
        """Log numbers at ``step`` (others are skipped) at ``timestamp`` (ms, default now):
        MLflow keeps one point per (key, step, timestamp, value), so an epoch logged again
        later with its own time still shows once."""
        stamp = now_ms() if timestamp is None else int(timestamp)
        values = {metric_key(k): finite_number(v) for k, v in metrics.items()}
        entries = [
            {"key": key, "value": value, "step": int(step), "timestamp": stamp}
            for key, value in values.items()
            if value is not None
        ]
        if entries:
            self._append("metrics", {"metrics": entries})

    def epoch_callback(self, epoch: int, logs: Mapping[str, Any]) -> None:
        """Per-epoch curves (``train(callbacks=[tracker.epoch_callback])``): every number of
        ``logs`` at ``step=epoch`` (from 1), at ``logs["timestamp"]`` when given."""
        curves = {curve_key(k): v for k, v in logs.items() if k not in ("epoch", "timestamp")}
        stamp = finite_number(logs.get("timestamp"))
        self.log_metrics(curves, step=epoch, timestamp=None if stamp is None else int(stamp))

    def log_inputs(self, datasets: Sequence[Mapping[str, Any]]) -> None:
        """Log dataset inputs (:func:`~vitpcm.tracking.naming.dataset_inputs` entries)."""
        if datasets:
            self._append("inputs", {"datasets": [dict(d) for d in datasets]})

    def log_artifact(
        self, path: str | os.PathLike[str], artifact_path: str | None = None, *, move: bool = False
    ) -> None:
        """Log a local file, or a folder (kept under its own name). The spool keeps its own
        copy (``move``: takes the file itself), so the original may change or vanish."""
        source = Path(path)
        if source.is_dir():
            artifact_path = "/".join(p for p in (artifact_path, source.name) if p)
        self._append("artifact", {"artifact_path": artifact_path}, file=source, move=move)

    def log_results(
        self,
        metrics: Mapping[str, Any],
        split: str,
        *,
        stage: str = "eval",
        per_class: bool = True,
        class_names: Sequence[str] | None = None,
        **figures: Any,
    ) -> dict[str, float]:
        """Log one stage's results (a ``metrics.json``-style dict measured on ``split``,
        tagged ``<stage>.split``): the metrics (``<stage>/...``, with ``per_class`` also
        ``class_iou/<class>``), ``<stage>/`` plots and overlays from ``figures``
        (:func:`~vitpcm.tracking.figures.write_split_figures`) and ``metrics.json``; returns
        the flat metrics."""
        names = list(class_names or metrics.get("class_names") or []) or None
        flat = final_metrics(metrics, stage, names, per_class=per_class)
        self.log_metrics(flat)
        self.set_tags({f"{stage}.split": split})
        self._final[stage] = {**metrics, "split": split}
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / stage
            write_split_figures(folder, metrics, split, stage=stage, class_names=names, **figures)
            self.log_artifact(folder, move=True)
            text = json.dumps(json_safe(self._final), indent=2, allow_nan=False) + "\n"
            Path(tmp, METRICS_JSON).write_text(text)  # strict JSON: NaN becomes null
            self.log_artifact(Path(tmp, METRICS_JSON), move=True)
        return flat

    def log_model(
        self,
        model: Any,
        *,
        miou: float | None = None,
        split: str | None = None,
        register: bool = True,
        registered_model: str | None = None,
        promote: bool = True,
        name: str = "model",
        step: int = 0,
    ) -> ModelLogResult:
        """Log the Keras model (``tensorflow`` and ``python_function`` flavors, signature,
        pinned requirements, the ``vitpcm`` source), register it as ``registered_model``
        (default :func:`default_registered_model`) and, with ``promote`` and ``miou`` (on
        ``split``, default ``data.val_split``), gate it for ``champion``."""
        from vitpcm.tracking.registry import save_mlflow_model

        spool, cfg = self._spool(), self.cfg
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = Path(tmp) / name
            save_mlflow_model(model, model_dir, {"config": cfg.name}, config=cfg)
            data = {"name": name, "step": int(step), "params": flatten_params(cfg.to_dict())}
            model_record = spool.append("model", data, {"dir": model_dir}, move=True)
        last = model_record
        model_name = registered_model or default_registered_model(cfg) if register else None
        if model_name:
            gate = {
                "miou": None if miou is None else float(miou),
                "gate": promote and miou is not None,
            }
            last = spool.append(
                "register",
                {
                    **gate,
                    "model_record": model_record.id,
                    "registered_model": model_name,
                    "split": split or cfg.data.val_split,
                    "tags": {"dataset": cfg.data.dataset, "backbone": cfg.model.backbone},
                },
            )
        self.flush(force=True)
        state = spool.load_state()
        done = state.progress.get(last.id, {})
        decision = done.get("decision")
        return ModelLogResult(
            state.acked < last.seq,
            state.progress.get(model_record.id, {}).get("model_id"),
            model_name,
            done.get("version") if model_name else None,
            ChampionDecision(**decision) if decision else None,
        )
