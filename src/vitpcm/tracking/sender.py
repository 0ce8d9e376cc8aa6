"""Sending spooled records to MLflow, in order, each exactly once.

A record is acknowledged only after MLflow took it; one that creates something (the run, a
logged model, a version) first looks for what a lost acknowledgement created (tagged with
the spool's or the record's id). *Transient* errors (connection, timeouts, HTTP 5xx/429,
auth an operator can fix) keep it pending, one warning per outage; *permanent* ones (MLflow
refusing the request: a changed param) mark it rejected in ``state.json``. Outages cost
seconds: ``/health`` is probed (3 s) first, and the client makes one retry of 15 s (900 s
for uploads; longer values in the environment win) instead of MLflow's 7 of 120 s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any
from unittest import mock

from vitpcm import events
from vitpcm.errors import StorageError, TrackingError
from vitpcm.tracking.registry import RECORD_TAG, promote_if_better, register_version
from vitpcm.tracking.spool import RUN_FILE, Record, Spool, SpoolState, resolve_spool_dir

log = logging.getLogger("vitpcm.tracking")

SPOOL_TAG = "vitpcm.spool_id"
TIMEOUT_S, UPLOAD_TIMEOUT_S, HEALTH_TIMEOUT_S = 15, 900, 3.0
_TRANSIENT_CODES = {
    "INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "IO_ERROR",
    "ENDPOINT_NOT_FOUND", "PERMISSION_DENIED", "UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED",
    "DEADLINE_EXCEEDED", "ABORTED",
}  # fmt: skip


def is_transient(exc: BaseException) -> bool:
    """Whether a failed MLflow call may succeed later (outage) or never will (refusal)."""
    import requests
    import urllib3

    network = (requests.RequestException, urllib3.exceptions.HTTPError)
    if isinstance(exc, (*network, ConnectionError, TimeoutError)):
        return True
    code = getattr(exc, "error_code", None)
    if code is not None:
        return str(code) in _TRANSIENT_CODES
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status is not None and (status >= 500 or status in (401, 403, 408, 429))


@contextlib.contextmanager
def client_timeouts(timeout_s: float = TIMEOUT_S) -> Iterator[None]:
    """MLflow client calls inside run with one retry of ``timeout_s``."""
    env = os.environ
    timeout = max(timeout_s, float(env.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or 0))
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": env.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1"),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": env.get("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout)),
    }
    with mock.patch.dict(os.environ, wanted):
        yield


def server_health(tracking_uri: str) -> str | None:
    """``None`` when an ``http(s)`` server answers ``/health`` (other URIs are not probed),
    else why not."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    import requests

    url = tracking_uri.rstrip("/") + "/health"
    try:
        status = requests.get(url, timeout=HEALTH_TIMEOUT_S).status_code
    except requests.RequestException as exc:
        return f"{type(exc).__name__}: {exc}"
    return f"HTTP {status} from {url}" if status >= 500 else None


def same_uri(recorded: str | None, target: str) -> bool:
    """Whether a run recorded on ``recorded`` (``None``: no run yet) may go to ``target``."""
    return recorded is None or recorded.rstrip("/") == target.rstrip("/")


class SpoolSender:
    """Sends a spool's pending records to one MLflow tracking server."""

    def __init__(self, spool: Spool, tracking_uri: str) -> None:
        from mlflow import MlflowClient

        self.spool, self.tracking_uri = spool, tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.outage: str | None = None  # why MLflow is unreachable; None while it answers

    def flush(self, *, blocking: bool = False, progress: bool = False) -> int:
        """Send pending records until done or MLflow fails; returns how many were sent.

        ``blocking``: wait for another process sending from this spool instead of leaving
        the work to it.
        """
        from tqdm.auto import tqdm

        with self.spool.lock("send", blocking) as locked:
            state = self.spool.load_state()
            pending = [r for r in self.spool.records() if r.seq > state.acked] if locked else []
            if not pending:
                return 0
            if state.run_id and not same_uri(state.tracking_uri, self.tracking_uri):
                raise TrackingError(
                    f"the MLflow spool {self.spool.path} belongs to run {state.run_id} on "
                    f"{state.tracking_uri}; replay it there, not to {self.tracking_uri}"
                )
            reason = server_health(self.tracking_uri)
            if reason is not None:
                return self._outage(reason, len(pending))
            for sent, record in enumerate(tqdm(pending, "mlflow", disable=not progress)):
                try:
                    if record.kind != "start_run" and not state.run_id:
                        raise TrackingError("no MLflow run: its start_run record was refused")
                    big = record.kind in ("artifact", "model")
                    with client_timeouts(UPLOAD_TIMEOUT_S if big else TIMEOUT_S):
                        getattr(self, f"_send_{record.kind}")(record, state)
                except Exception as exc:
                    if is_transient(exc):
                        return self._outage(f"{type(exc).__name__}: {exc}", len(pending) - sent)
                    state.rejected[str(record.seq)] = f"{type(exc).__name__}: {exc}"[:2000]
                    log.warning(
                        "MLflow refused %s record %d of %s; skipping it (%s)",
                        record.kind, record.seq, self.spool.path, exc,
                    )  # fmt: skip
                state.acked = record.seq
                self.spool.save_state(state)
        if self.outage is not None:
            log.info("MLflow at %s is reachable again; sent %d pending record(s) from %s",
                     self.tracking_uri, len(pending), self.spool.path)  # fmt: skip
        self.outage = None
        return len(pending)

    def _outage(self, reason: str, pending: int) -> int:
        if self.outage is None:
            log.warning(
                "MLflow at %s is unreachable (%s); %d record(s) wait in %s and are sent "
                "when it answers again (or run: vitpcm mlflow replay %s)",
                self.tracking_uri, reason.splitlines()[0][:300], pending, self.spool.path,
                self.spool.path,
            )  # fmt: skip
        self.outage = reason
        return 0

    def _send_start_run(self, record: Record, state: SpoolState) -> None:
        client, data = self.client, record.data
        if state.run_id:  # a resumed job: reopen the run, refresh its tags
            client.update_run(state.run_id, status="RUNNING")
            self._send_tags(record, state)
            return
        experiment_id = self._experiment_id(data["experiment"])
        # A create_run whose answer was lost left a run tagged with this spool's id.
        query = f"tags.`{SPOOL_TAG}` = '{self.spool.spool_id}'"
        found = client.search_runs([experiment_id], filter_string=query, max_results=1)
        tags = {**data.get("tags", {}), SPOOL_TAG: self.spool.spool_id}
        run = found[0] if found else client.create_run(
            experiment_id, start_time=record.time, tags=tags, run_name=data.get("run_name")
        )  # fmt: skip
        state.run_id, state.experiment_id = run.info.run_id, run.info.experiment_id
        state.tracking_uri = self.tracking_uri
        log.info("MLflow run %s (experiment %s)", state.run_id, state.experiment_id)
        events.emit("registered", run_id=state.run_id)

    def _experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:  # without the kind, MLflow 3's UI may open it in its GenAI layout
                kind = {"mlflow.experimentKind": "custom_model_development"}
                return str(self.client.create_experiment(name, tags=kind))
            except Exception:  # another run created it meanwhile
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            self.client.restore_experiment(experiment.experiment_id)
        return str(experiment.experiment_id)

    def _send_params(self, record: Record, state: SpoolState) -> None:
        from mlflow.entities import Metric, Param, RunTag

        data = record.data
        self.client.log_batch(
            state.run_id,
            metrics=[
                Metric(m["key"], float(m["value"]), int(m["timestamp"]), int(m["step"]))
                for m in data.get("metrics", [])
            ],
            params=[Param(k, str(v)) for k, v in data.get("params", {}).items()],
            tags=[RunTag(k, str(v)) for k, v in data.get("tags", {}).items()],
            synchronous=True,
        )

    _send_tags = _send_metrics = _send_params  # one log_batch for all three kinds

    def _send_inputs(self, record: Record, state: SpoolState) -> None:
        """Dataset inputs, one per split (MLflow keeps one per digest and context)."""
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
        path = self.spool.path / record.data["file"]
        log_files = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        log_files(state.run_id, str(path), record.data.get("artifact_path") or None)

    def _send_model(self, record: Record, state: SpoolState) -> None:
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model

        client, data = self.client, record.data
        progress = state.progress.setdefault(record.id, {})
        if "model_id" not in progress:
            query = f"tags.`{RECORD_TAG}` = '{record.id}'"
            found = client.search_logged_models(
                experiment_ids=[state.experiment_id], filter_string=query, max_results=1
            )
            progress["model_id"] = found[0].model_id if found else client.create_logged_model(
                state.experiment_id, name=data.get("name", "model"), source_run_id=state.run_id,
                tags={RECORD_TAG: record.id}, params=data.get("params") or None,
            ).model_id  # fmt: skip
            self.spool.save_state(state)
        model_id = progress["model_id"]
        client.log_outputs(state.run_id, [LoggedModelOutput(model_id, int(data.get("step", 0)))])
        # The MLmodel file names its logged model, as mlflow.<flavor>.log_model writes it.
        model_dir = self.spool.path / data["dir"]
        mlmodel = Model.load(str(model_dir / "MLmodel"))
        mlmodel.artifact_path = client.get_logged_model(model_id).artifact_location
        mlmodel.model_uuid = mlmodel.model_id = model_id
        mlmodel.run_id = state.run_id
        mlmodel.save(str(model_dir / "MLmodel"))
        client.log_model_artifacts(model_id, str(model_dir))
        client.finalize_logged_model(model_id, LoggedModelStatus.READY)

    def _send_register(self, record: Record, state: SpoolState) -> None:
        data = record.data
        model_id = state.progress.get(data["model_record"], {}).get("model_id")
        if model_id is None:
            raise TrackingError("the model to register was never logged (its record was refused)")
        progress = state.progress.setdefault(record.id, {})
        name = data["registered_model"]
        if "version" not in progress:
            progress["version"] = register_version(
                self.client, name, model_id, state.run_id, record.id, data.get("tags")
            )
            self.spool.save_state(state)
        tags = {"registered_model": name, "registered_model_version": progress["version"]}
        if data.get("gate") and data.get("miou") is not None:
            decision = promote_if_better(
                self.client, name, progress["version"], float(data["miou"]), data["split"]
            )
            progress["decision"] = decision.to_dict()
            tags.update(
                champion_comparison=decision.comparison, promoted=str(decision.promoted).lower()
            )
        self._send_tags(Record(0, "", "tags", 0, {"tags": tags}), state)

    def _send_end_run(self, record: Record, state: SpoolState) -> None:
        status = record.data.get("status", "FINISHED")
        self.client.set_terminated(state.run_id, status=status, end_time=record.time)


def replay_spool(
    directory: str | os.PathLike[str], tracking_uri: str | None = None, progress: bool = True
) -> int:
    """Send the pending records of the spool in ``directory`` (a tracked run's output or
    its ``mlflow-spool/``) to ``tracking_uri`` (default: the server holding its run, the
    URI it was written for, ``$MLFLOW_TRACKING_URI``); returns how many were sent and
    updates the ``mlflow_run.json`` beside it that names it (``vitpcm mlflow replay``).

    Raises:
        TrackingError: no spool there, no tracking URI known, or MLflow still unreachable.
    """
    spool = Spool(resolve_spool_dir(directory))
    uri = tracking_uri or spool.load_state().tracking_uri or spool.tracking_uri
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise TrackingError(
            f"no MLflow tracking URI for {spool.path}: pass --tracking-uri or set "
            "MLFLOW_TRACKING_URI"
        )
    sender = SpoolSender(spool, uri)
    sent = sender.flush(blocking=True, progress=progress)
    left = len(spool.pending())
    write_run_file(spool, spool.path.parent / RUN_FILE, only_own=True)
    if left:
        reason = (sender.outage or "another process is sending").splitlines()[0][:300]
        raise TrackingError(
            f"MLflow at {uri} did not take the spool {spool.path} ({reason}); sent {sent}, "
            f"{left} record(s) still pending: run the replay again when MLflow is up"
        )
    log.info("replayed %d record(s) from %s to run %s", sent, spool.path, spool.load_state().run_id)
    return sent


def write_run_file(
    spool: Spool, path: os.PathLike[str] | str, /, only_own: bool = False, **extra: Any
) -> dict[str, Any] | None:
    """Write (or, with ``only_own``, update only when it names this spool) the
    ``mlflow_run.json`` of a spool: run, experiment, tracking URI, records pending."""
    from vitpcm import storage

    info: dict[str, Any] = {}
    if only_own:
        with contextlib.suppress(StorageError, ValueError):
            info = json.loads(storage.read_bytes(path))
        if not isinstance(info, dict) or info.get("spool_id") != spool.spool_id:
            return None
    state = spool.load_state()
    info.update(extra, spool_id=spool.spool_id, pending=len(spool.pending()))
    if state.run_id or "run_id" not in info:
        uri = state.tracking_uri or info.get("tracking_uri") or spool.tracking_uri
        info.update(run_id=state.run_id, experiment_id=state.experiment_id, tracking_uri=uri)
    text = json.dumps(info, indent=2, sort_keys=True) + "\n"
    storage.write_bytes(path, text.encode("utf-8"))  # atomic: a temporary name, then renamed
    return info
