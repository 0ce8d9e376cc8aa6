"""Sending spooled records to MLflow, in order, each exactly once.

:class:`SpoolSender` walks the records above the spool's acknowledged watermark and turns
each into MLflow client calls. A record is acknowledged (the watermark moves past it) only
after MLflow accepted it, so an outage leaves it pending for the next attempt; multi-step
records (logging a model, registering a version) save their progress after each step and
look for what a lost acknowledgement already created, so a replay never duplicates them.

Errors fall in two classes. *Transient* ones -- connection refused or reset, timeouts,
HTTP 5xx/429, auth failures that an operator can fix -- stop the round and keep the record
pending; one warning is logged per outage, not per record. *Permanent* ones -- MLflow
refusing the request itself (an invalid or changed parameter, say) -- would fail forever,
so the record is marked rejected (with the reason, in ``state.json``), a warning names it,
and the round goes on.

Outages cost seconds, not minutes (see :mod:`vitpcm.tracking.connection`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from vitpcm.errors import TrackingError
from vitpcm.tracking.connection import (
    DEFAULT_TIMEOUT_S,
    UPLOAD_TIMEOUT_S,
    client_timeouts,
    is_transient,
    server_health,
)
from vitpcm.tracking.registry import (
    RECORD_TAG,
    ChampionDecision,
    promote_if_better,
    register_version,
)
from vitpcm.tracking.spool import Record, Spool, SpoolState, resolve_spool_dir

log = logging.getLogger("vitpcm.tracking")

SPOOL_TAG = "vitpcm.spool_id"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


def same_tracking_uri(recorded: str | None, target: str) -> bool:
    """Whether a run recorded on ``recorded`` (``None``: not yet created) may go to ``target``."""
    return recorded is None or recorded.rstrip("/") == target.rstrip("/")


class SpoolSender:
    """Sends a spool's pending records to one MLflow tracking server.

    Args:
        spool: the spool to drain.
        tracking_uri: the MLflow tracking URI.
    """

    def __init__(self, spool: Spool, tracking_uri: str) -> None:
        self.spool = spool
        self.tracking_uri = tracking_uri
        self._client: Any = None
        self.outage: str | None = None  # reason of the current outage; None while reachable
        self.sent_total = 0

    @property
    def client(self) -> Any:
        """The ``MlflowClient`` (created lazily: importing mlflow takes seconds)."""
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def flush(self, *, blocking: bool = False, progress: bool = False) -> int:
        """Send every pending record until done or MLflow fails; return how many were sent.

        Args:
            blocking: wait for another process sending from the same spool (a replay)
                instead of leaving the work to it.
            progress: show a progress bar.
        """
        with self.spool.send_lock(blocking=blocking) as locked:
            if not locked:
                return 0
            state = self.spool.load_state()
            pending = [r for r in self.spool.records() if r.seq > state.acked]
            if not pending:
                return 0
            if state.run_id and not same_tracking_uri(state.tracking_uri, self.tracking_uri):
                raise TrackingError(
                    f"the MLflow spool {self.spool.path} belongs to run {state.run_id} on "
                    f"{state.tracking_uri}; replay it there, not to {self.tracking_uri}"
                )
            reason = server_health(self.tracking_uri)
            if reason is not None:
                self._enter_outage(reason, len(pending))
                return 0
            return self._send_all(pending, state, progress)

    def _send_all(self, pending: list[Record], state: SpoolState, progress: bool) -> int:
        from tqdm.auto import tqdm

        sent = 0
        bar = tqdm(total=len(pending), desc="mlflow", unit="rec", disable=not progress)
        try:
            for record in pending:
                try:
                    self._send(record, state)
                except Exception as exc:
                    if is_transient(exc):
                        self._enter_outage(f"{type(exc).__name__}: {exc}", len(pending) - sent)
                        return sent
                    state.rejected[str(record.seq)] = f"{type(exc).__name__}: {exc}"[:2000]
                    log.warning(
                        "MLflow refused %s record %d of %s; skipping it (%s)",
                        record.kind,
                        record.seq,
                        self.spool.path,
                        exc,
                    )
                state.acked = record.seq
                self.spool.save_state(state)
                sent += 1
                bar.update(1)
        finally:
            bar.close()
            self.sent_total += sent
        if self.outage is not None:
            log.info(
                "MLflow at %s is reachable again; sent %d pending record(s) from %s",
                self.tracking_uri,
                sent,
                self.spool.path,
            )
            self.outage = None
        return sent

    def _enter_outage(self, reason: str, pending: int) -> None:
        if self.outage is None:
            log.warning(
                "MLflow at %s is unreachable (%s); %d record(s) wait in %s and are sent "
                "when it answers again (or run: vitpcm mlflow replay %s)",
                self.tracking_uri,
                reason.splitlines()[0][:300],
                pending,
                self.spool.path,
                self.spool.path,
            )
        self.outage = reason

    # -- one record -----------------------------------------------------------------------

    def _send(self, record: Record, state: SpoolState) -> None:
        handler: Callable[[Record, SpoolState], None] | None = getattr(
            self, f"_send_{record.kind}", None
        )
        if handler is None:
            raise TrackingError(f"unknown spool record kind {record.kind!r} (seq {record.seq})")
        if record.kind != "start_run" and not state.run_id:
            raise TrackingError("no MLflow run: the spool's start_run record was refused")
        timeout = UPLOAD_TIMEOUT_S if record.kind in ("artifact", "model") else DEFAULT_TIMEOUT_S
        with client_timeouts(timeout):
            handler(record, state)

    def _send_start_run(self, record: Record, state: SpoolState) -> None:
        client = self.client
        data = record.data
        if state.run_id:  # a resumed run (a restarted job): reopen it, refresh its tags
            from mlflow.entities import RunTag

            client.update_run(state.run_id, status="RUNNING")
            tags = [RunTag(k, str(v)) for k, v in data.get("tags", {}).items()]
            client.log_batch(state.run_id, tags=tags, synchronous=True)
            return
        if data.get("attach_run_id"):
            run = client.get_run(data["attach_run_id"])
            state.run_id, state.experiment_id = run.info.run_id, run.info.experiment_id
        else:
            experiment_id = self._experiment_id(data["experiment"])
            # A create_run whose answer was lost left a run tagged with this spool's id.
            query = f"tags.`{SPOOL_TAG}` = '{self.spool.spool_id}'"
            found = client.search_runs([experiment_id], filter_string=query, max_results=1)
            if found:
                run = found[0]
            else:
                tags = {**data.get("tags", {}), SPOOL_TAG: self.spool.spool_id}
                run = client.create_run(
                    experiment_id,
                    start_time=record.time,
                    tags=tags,
                    run_name=data.get("run_name"),
                )
            state.run_id, state.experiment_id = run.info.run_id, experiment_id
        state.tracking_uri = self.tracking_uri
        log.info("MLflow run %s (experiment %s)", state.run_id, state.experiment_id)

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        client = self.client
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                client.restore_experiment(experiment.experiment_id)
            return str(experiment.experiment_id)
        try:
            # Without the kind, MLflow 3's UI may open it in its GenAI layout.
            return str(client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING}))
        except MlflowException as exc:  # another run created it meanwhile
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise exc from None
            return str(experiment.experiment_id)

    def _send_params(self, record: Record, state: SpoolState) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)) for k, v in record.data["params"].items()]
        self.client.log_batch(state.run_id, params=params, synchronous=True)

    def _send_tags(self, record: Record, state: SpoolState) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag(k, str(v)) for k, v in record.data["tags"].items()]
        self.client.log_batch(state.run_id, tags=tags, synchronous=True)

    def _send_metrics(self, record: Record, state: SpoolState) -> None:
        from mlflow.entities import Metric

        metrics = [
            Metric(m["key"], float(m["value"]), int(m["timestamp"]), int(m["step"]))
            for m in record.data["metrics"]
        ]
        self.client.log_batch(state.run_id, metrics=metrics, synchronous=True)

    def _send_inputs(self, record: Record, state: SpoolState) -> None:
        """Dataset inputs (``mlflow.log_input``): one per split, with its context tag.
        MLflow keeps one input per dataset digest and context, so a resend adds nothing."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [
            DatasetInput(
                Dataset(d["name"], d["digest"], d["source_type"], d["source"], None, d["profile"]),
                [InputTag("mlflow.data.context", d["context"])],
            )
            for d in record.data["datasets"]
        ]
        self.client.log_inputs(state.run_id, datasets=inputs)

    def _send_artifact(self, record: Record, state: SpoolState) -> None:
        path = self.spool.file_path(record.data["file"])
        artifact_path = record.data.get("artifact_path") or None
        if path.is_dir():
            self.client.log_artifacts(state.run_id, str(path), artifact_path)
            return
        self.client.log_artifact(state.run_id, str(path), artifact_path)

    def _send_model(self, record: Record, state: SpoolState) -> None:
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model

        client = self.client
        data = record.data
        progress = state.progress.setdefault(record.id, {})
        model_id = progress.get("model_id")
        if model_id is None:
            query = f"tags.`{RECORD_TAG}` = '{record.id}'"
            found = client.search_logged_models(
                experiment_ids=[state.experiment_id], filter_string=query, max_results=1
            )
            if found:
                model_id = found[0].model_id
            else:
                model_id = client.create_logged_model(
                    state.experiment_id,
                    name=data.get("name", "model"),
                    source_run_id=state.run_id,
                    tags={**data.get("tags", {}), RECORD_TAG: record.id},
                    params=data.get("params") or None,
                ).model_id
            progress["model_id"] = model_id
            self.spool.save_state(state)
        logged = client.get_logged_model(model_id)
        client.log_outputs(state.run_id, [LoggedModelOutput(model_id, int(data.get("step", 0)))])
        # The MLmodel file names its logged model, as mlflow.<flavor>.log_model writes it.
        model_dir = self.spool.file_path(data["dir"])
        mlmodel = Model.load(str(model_dir / "MLmodel"))
        mlmodel.artifact_path = logged.artifact_location
        mlmodel.model_uuid = model_id
        mlmodel.model_id = model_id
        mlmodel.run_id = state.run_id
        mlmodel.save(str(model_dir / "MLmodel"))
        client.log_model_artifacts(model_id, str(model_dir))
        client.finalize_logged_model(model_id, LoggedModelStatus.READY)

    def _send_register(self, record: Record, state: SpoolState) -> None:
        data = record.data
        model_progress = state.progress.get(data["model_record"], {})
        model_id = model_progress.get("model_id")
        if model_id is None:
            raise TrackingError("the model to register was never logged (its record was refused)")
        progress = state.progress.setdefault(record.id, {})
        name = data["registered_model"]
        version = progress.get("version")
        if version is None:
            version = register_version(
                self.client,
                name,
                model_id=model_id,
                run_id=state.run_id,
                record_id=record.id,
                tags=data.get("tags"),
            )
            progress["version"] = version
            progress["model_name"] = name
            self.spool.save_state(state)
        run_tags = {"registered_model": name, "registered_model_version": version}
        if data.get("gate") and data.get("miou") is not None:
            decision = promote_if_better(
                self.client, name, version, float(data["miou"]), data.get("split") or "val"
            )
            progress["decision"] = decision.to_dict()
            run_tags["champion_comparison"] = decision.comparison
            run_tags["promoted"] = str(decision.promoted).lower()
        from mlflow.entities import RunTag

        tags = [RunTag(k, v) for k, v in run_tags.items()]
        self.client.log_batch(state.run_id, tags=tags, synchronous=True)

    def _send_end_run(self, record: Record, state: SpoolState) -> None:
        self.client.set_terminated(
            state.run_id, status=record.data.get("status", "FINISHED"), end_time=record.time
        )


def decision_of(state: SpoolState, record_id: str) -> ChampionDecision | None:
    """The champion decision a ``register`` record produced, once it was sent."""
    raw = state.progress.get(record_id, {}).get("decision")
    return ChampionDecision.from_dict(raw) if raw else None


def _update_run_file(spool: Spool, pending: int) -> None:
    """Bring the training's ``mlflow_run.json`` next to the spool up to date after a replay.

    Only a file that names this spool (``spool_id``) is rewritten, in place and atomically:
    its run, experiment and tracking URI as MLflow now knows them, and what is still pending.
    """
    from vitpcm.tracking.training import RUN_FILE

    path = spool.path.parent / RUN_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no run file here (a register step's spool, or a spool copied elsewhere)
    if not isinstance(info, dict) or info.get("spool_id") != spool.spool_id:
        return
    state = spool.load_state()
    info.update(pending=pending)
    if state.run_id:
        info.update(
            run_id=state.run_id,
            experiment_id=state.experiment_id,
            tracking_uri=state.tracking_uri or info.get("tracking_uri"),
        )
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("cannot update %s after the replay: %s", path, exc)


def replay_spool(
    directory: str | os.PathLike[str], tracking_uri: str | None = None, progress: bool = True
) -> int:
    """Send every pending record of a spool to MLflow (``vitpcm mlflow replay DIR``).

    Args:
        directory: a tracked run's output folder, or its ``mlflow-spool/`` folder.
        tracking_uri: where to send; defaults to the server already holding the spool's
            run, then the URI the spool was written for, then ``$MLFLOW_TRACKING_URI``.
        progress: show a progress bar.

    Returns:
        How many records were sent (0 when nothing was pending). The training's
        ``mlflow_run.json`` beside the spool is updated (run id, records still pending).

    Raises:
        TrackingError: no spool there, no tracking URI known, or MLflow still unreachable
            (the records stay pending; run it again later).
    """
    spool = Spool(resolve_spool_dir(directory))
    uri = (
        tracking_uri
        or spool.load_state().tracking_uri
        or spool.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
    )
    if not uri:
        raise TrackingError(
            f"no MLflow tracking URI for {spool.path}: pass --tracking-uri or set "
            "MLFLOW_TRACKING_URI"
        )
    sender = SpoolSender(spool, uri)
    started = time.monotonic()
    sent = sender.flush(blocking=True, progress=progress)
    left = len(spool.pending())
    _update_run_file(spool, left)
    if left:
        reason = (sender.outage or "another process is sending").splitlines()[0][:300]
        raise TrackingError(
            f"MLflow at {uri} did not take the spool {spool.path} ({reason}); sent {sent}, "
            f"{left} record(s) still pending: run the replay again when MLflow is up"
        )
    state = spool.load_state()
    log.info(
        "replayed %d record(s) from %s to run %s in %.1f s (%d refused)",
        sent,
        spool.path,
        state.run_id,
        time.monotonic() - started,
        len(state.rejected),
    )
    return sent
