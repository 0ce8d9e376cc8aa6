"""``RunTracker``: one MLflow run per training (or evaluation) job, outage-proof.

What a run shows in the MLflow dashboard (DESIGN.md, "What users do with it"): a
description (:mod:`vitpcm.tracking.describe`), source and tags (dataset, backbone, config,
vitpcm version, the Kubeflow run and a link back to it), the resolved config as dotted
params (``train.lr``...), per-epoch curves under ``train/`` and ``val/`` (step = the epoch
number, from 1), final metrics per stage (``eval/``, ``test/``, ``class_iou/``: see
:mod:`vitpcm.tracking.naming`), plots, dataset inputs, ``config.yaml``, ``metrics.json``,
and the Keras model with its signature, registered and gated for the ``champion`` alias.

Everything goes through the local spool (:mod:`vitpcm.tracking.spool`) first, then to
MLflow (:mod:`vitpcm.tracking.sender`): an unreachable server costs a warning, never the
training, and ``vitpcm mlflow replay DIR`` sends what is left later.

``vitpcm train`` opens one by itself when a tracking URI is configured (see
:mod:`vitpcm.tracking.training`). Usage around a training that is not tracked by itself::

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
from pathlib import Path
from types import TracebackType
from typing import Any

from vitpcm import __version__, storage
from vitpcm.config import Config, save_config
from vitpcm.errors import TrackingError
from vitpcm.tracking.describe import NOTE_TAG, run_description, source_tags
from vitpcm.tracking.figures import write_split_figures
from vitpcm.tracking.model_log import ModelLogResult, log_model
from vitpcm.tracking.naming import (
    curve_key,
    default_experiment,
    final_metrics,
    finite_number,
    flatten_params,
    kfp_run_url,
    metric_key,
    param_value,
    resolve_tracking_uri,
)
from vitpcm.tracking.sender import SpoolSender
from vitpcm.tracking.spool import SPOOL_DIRNAME, Spool, now_ms

log = logging.getLogger("vitpcm.tracking")

KFP_RUN_ID_ENV = "KFP_RUN_ID"
KFP_UI_URL_ENV = "KFP_UI_URL"
# Train-loop log keys that are not per-epoch curves ("timestamp": when the epoch ended, in ms).
_NOT_CURVES = frozenset({"epoch", "timestamp"})


# ----------------------------------------------------------------------------- tracker


class RunTracker:
    """One MLflow run, logged through a local spool so that no record is ever lost.

    Args:
        cfg: the resolved config (params, tags, experiment and model names).
        out_dir: the job's output folder; the spool goes to ``<out_dir>/mlflow-spool``.
        tracking_uri: MLflow tracking URI; defaults to ``cfg.mlflow.tracking_uri``, then
            ``$MLFLOW_TRACKING_URI``. With none, records only go to the spool (replay later).
        experiment: experiment name (default :func:`default_experiment`).
        run_name: the run's display name (default ``<config name>-<UTC time>``).
        run_id: log into this existing MLflow run instead of creating one (e.g. the
            evaluation step of a pipeline adding to the training run).
        kfp_run_id: Kubeflow Pipelines run id (default ``$KFP_RUN_ID``).
        kfp_ui_url: KFP UI base URL or ``{run_id}`` template (default ``$KFP_UI_URL``).
        tags: extra run tags.
        spool_dir: where to spool instead of ``<out_dir>/mlflow-spool`` (required when
            ``out_dir`` is ``s3://``: the spool must be local).
        retry_interval_s: after a failed send, wait this long before trying again (a
            final attempt is always made when the run ends).
        log_config: log the config as params and ``config.yaml`` when the run starts;
            ``False`` for a later step continuing a run that already has them.
        source: what is running, for the run's Source column (``vitpcm train``...).
        data_uri: the TFRecords the run reads, named in the run description.
    """

    def __init__(
        self,
        cfg: Config,
        out_dir: str | os.PathLike[str],
        *,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        run_name: str | None = None,
        run_id: str | None = None,
        kfp_run_id: str | None = None,
        kfp_ui_url: str | None = None,
        tags: Mapping[str, str] | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        retry_interval_s: float = 60.0,
        log_config: bool = True,
        source: str = "vitpcm",
        data_uri: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.source = source
        self.data_uri = data_uri
        self.tracking_uri = resolve_tracking_uri(tracking_uri, cfg)
        self.experiment = experiment or default_experiment(cfg)
        self.run_name = run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        self.attach_run_id = run_id
        self.kfp_run_id = kfp_run_id or os.environ.get(KFP_RUN_ID_ENV) or None
        self.kfp_ui_url = kfp_ui_url or os.environ.get(KFP_UI_URL_ENV) or None
        self.extra_tags = dict(tags or {})
        out_text = storage.local_path(out_dir)
        if spool_dir is None and storage.is_remote(out_text):
            raise TrackingError(
                f"output {out_text} is not on a local disk, so the MLflow spool cannot live "
                "there; pass a local spool_dir"
            )
        self.spool_dir = Path(
            storage.local_path(spool_dir or os.path.join(out_text, SPOOL_DIRNAME))
        )
        self.retry_interval_s = retry_interval_s
        self.log_config = log_config
        self.spool: Spool | None = None
        self.sender: SpoolSender | None = None
        self._next_try = 0.0
        self._final: dict[str, Any] = {}

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> RunTracker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
        else:
            status = "FAILED"
        self.finish(status)

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
        link = self._kfp_link()
        if link:
            tags["kfp.run_id"], tags["kfp.run_url"] = link
        elif self.kfp_run_id:
            tags["kfp.run_id"] = self.kfp_run_id
        # The run description, rendered as Markdown at the top of the run page.
        tags[NOTE_TAG] = run_description(cfg, data_uri=self.data_uri, kfp_link=link)
        tags.update(self.extra_tags)
        return tags

    def _kfp_link(self) -> tuple[str, str] | None:
        if not (self.kfp_run_id and self.kfp_ui_url):
            return None
        return self.kfp_run_id, kfp_run_url(self.kfp_ui_url, self.kfp_run_id)

    def describe(self, results: Mapping[str, Any] | None = None) -> None:
        """Set the run description again, with the headline ``results`` once known
        (:func:`~vitpcm.tracking.describe.run_description`)."""
        text = run_description(
            self.cfg, data_uri=self.data_uri, kfp_link=self._kfp_link(), results=results
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
        if self.attach_run_id or any(r.kind == "start_run" for r in self.spool.records()):
            # Continuing a run: its description (with links and results) stays as it is.
            tags.pop(NOTE_TAG, None)
        self.spool.append(
            "start_run",
            {
                "experiment": self.experiment,
                "run_name": self.run_name,
                "tags": tags,
                "attach_run_id": self.attach_run_id,
            },
        )
        if self.log_config:
            self.log_params(flatten_params(self.cfg.to_dict()))
            with tempfile.TemporaryDirectory() as tmp:
                save_config(self.cfg, os.path.join(tmp, "config.yaml"))
                self.log_artifact(os.path.join(tmp, "config.yaml"), move=True)
        self.flush()

    def finish(self, status: str = "FINISHED") -> None:
        """Record the run's end, make a last attempt to send, and say what is left."""
        if self.spool is None:
            return
        self.spool.append("end_run", {"status": status})
        self.flush(force=True)
        left = len(self.spool.pending())
        if left:
            target = self.tracking_uri or "your MLflow server"
            log.warning(
                "%d MLflow record(s) not sent to %s; they are safe in %s: send them with "
                "`vitpcm mlflow replay %s%s`",
                left,
                target,
                self.spool_dir,
                self.spool_dir,
                "" if self.tracking_uri else " --tracking-uri URI",
            )
        self.spool = None

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, once the server has been reached."""
        spool = self._spool()
        return spool.load_state().run_id

    @property
    def pending(self) -> int:
        """How many records wait in the spool."""
        return len(self._spool().pending())

    def flush(self, force: bool = False) -> int:
        """Send pending records now unless a recent failure says to wait; never raises.

        Args:
            force: try even within ``retry_interval_s`` of a failed attempt.

        Returns:
            How many records were sent.
        """
        if self.sender is None:
            return 0
        if not force and time.monotonic() < self._next_try:
            return 0
        try:
            sent = self.sender.flush()
        except Exception as exc:  # tracking must never stop the training
            if self.sender.outage is None:
                log.warning("cannot send to MLflow (%s); records stay in %s", exc, self.spool_dir)
            self.sender.outage = str(exc)
            sent = 0
        if self.sender.outage is not None:
            self._next_try = time.monotonic() + self.retry_interval_s
        return sent

    def _spool(self) -> Spool:
        if self.spool is None:
            raise TrackingError("the RunTracker is not started: use it as a context manager")
        return self.spool

    # -- records --------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (values are turned into strings)."""
        if params:
            values = {metric_key(k): param_value(v) for k, v in params.items()}
            self._spool().append("params", {"params": values})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags."""
        if tags:
            self._spool().append("tags", {"tags": {k: str(v) for k, v in tags.items()}})
            self.flush()

    def log_metrics(
        self, metrics: Mapping[str, Any], step: int = 0, *, timestamp: int | None = None
    ) -> None:
        """Log numeric metrics at ``step``; ``None``, NaN and non-numbers are skipped.

        ``timestamp`` (ms since the Unix epoch, default now) lets a record logged again
        later carry its original time: MLflow keeps one point per (key, step, timestamp,
        value), so the same epoch sent twice still shows once.
        """
        timestamp = now_ms() if timestamp is None else int(timestamp)
        entries = []
        for key, raw in metrics.items():
            value = finite_number(raw)
            if value is not None:
                entries.append(
                    {
                        "key": metric_key(key),
                        "value": value,
                        "step": int(step),
                        "timestamp": timestamp,
                    }
                )
        if entries:
            self._spool().append("metrics", {"metrics": entries})
            self.flush()

    def epoch_callback(self, epoch: int, logs: Mapping[str, Any]) -> None:
        """Per-epoch curves for ``train(callbacks=[tracker.epoch_callback])``.

        Every number in ``logs`` (loss, bce, et, l2, train_miou, val_miou,
        val_pixel_accuracy, lr, train_seconds...) is logged with ``step=epoch`` (the epoch
        number, counted from 1 as the training log prints it), at ``logs["timestamp"]``
        when the loop recorded when the epoch ended.
        """
        curves = {curve_key(k): v for k, v in logs.items() if k not in _NOT_CURVES}
        stamp = finite_number(logs.get("timestamp"))
        self.log_metrics(curves, step=epoch, timestamp=None if stamp is None else int(stamp))

    def log_inputs(self, datasets: Sequence[Mapping[str, Any]]) -> None:
        """Log dataset inputs (:func:`~vitpcm.tracking.describe.dataset_inputs` entries)."""
        if datasets:
            self._spool().append("inputs", {"datasets": [dict(d) for d in datasets]})
            self.flush()

    def log_artifact(
        self, path: str | os.PathLike[str], artifact_path: str | None = None, *, move: bool = False
    ) -> None:
        """Log a local file, or a folder (kept under its own name), as run artifacts.

        The spool keeps its own copy (``move=True``: takes the file itself), so the
        original may change or vanish before MLflow has it.
        """
        source = Path(path)
        if source.is_dir():
            artifact_path = "/".join(p for p in (artifact_path, source.name) if p)
        self._spool().append(
            "artifact", {"artifact_path": artifact_path}, files={"file": source}, move=move
        )
        self.flush()

    def log_text(self, text: str, artifact_file: str) -> None:
        """Log ``text`` as the artifact ``artifact_file`` (e.g. ``"val/notes.txt"``)."""
        self._log_bytes(text.encode("utf-8"), artifact_file)

    def log_dict(self, value: Mapping[str, Any], artifact_file: str) -> None:
        """Log a dict as strict JSON (NaN becomes null)."""
        from vitpcm.metrics import json_safe

        text = json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n"
        self.log_text(text, artifact_file)

    def _log_bytes(self, data: bytes, artifact_file: str) -> None:
        folder, _, name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_bytes(data)
            self.log_artifact(path, folder or None, move=True)

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
        """Log one stage's final results: metrics, plots, overlays and ``metrics.json``.

        Args:
            metrics: a ``metrics.json``-style dict (``miou``, ``class_iou``,
                ``pixel_accuracy``, optionally ``miou_crf``/``class_iou_crf``...).
            split: the split they were measured on (tagged ``<stage>.split``).
            stage: ``eval`` (the selected model's baseline pseudo masks) or ``test`` (test
                inference and CRF): the metric prefix and the artifact folder.
            per_class: also log ``class_iou/<class>`` metrics.
            class_names: K names (default: ``metrics["class_names"]``).
            **figures: :func:`~vitpcm.tracking.figures.write_split_figures` inputs
                (``confusion_matrix``, ``confusion_matrix_crf``, ``samples``, ``best``,
                ``worst``).

        Returns:
            The flat metrics logged (see :func:`final_metrics`).
        """
        names = list(class_names or metrics.get("class_names") or []) or None
        flat = final_metrics(metrics, stage, names, per_class=per_class)
        self.log_metrics(flat)
        self.set_tags({f"{stage}.split": split})
        self._final[stage] = {**metrics, "split": split}
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / stage
            write_split_figures(folder, metrics, split, stage=stage, class_names=names, **figures)
            self.log_artifact(folder, move=True)
        self.log_dict(self._final, "metrics.json")
        return flat

    def log_model(self, model: Any, **options: Any) -> ModelLogResult:
        """Log the trained Keras model, register it and gate it for ``champion``
        (:func:`vitpcm.tracking.model_log.log_model`: ``miou``, ``split``, ``register``,
        ``registered_model``, ``promote``, ``name``, ``step``)."""
        return log_model(self, model, **options)
