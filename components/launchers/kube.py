"""What both job launchers share: create or attach, wait, stream worker 0's log, clean up.

:func:`run_job` is the whole life of a launched job, in the step's pod:

1. create the custom object (a retried step finds its job by name and attaches to it);
2. follow worker 0's log into the step's log (the KFP UI shows it), reconnecting when the
   pod is replaced or its container restarts;
3. poll the job's conditions until it succeeds, fails or runs past the timeout;
4. delete the job when the step fails, times out, or is terminated (SIGTERM, as when a run
   is terminated in the KFP UI), so no GPU worker goes on training for nobody. A job that
   succeeded is kept (its pods are finished and hold no GPU); it is owned by the step's pod,
   so Kubernetes removes it with the run.

The API calls made here, and only these, are granted by ``manifests/rbac.yaml``: create /
get / delete on the job, get on the TrainingRuntime, list on pods, get on pods/log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from vitpcm.errors import VitpcmError

log = logging.getLogger(__name__)

NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# The KFP v2 compiler gives every step these (the step's pod): the job's owner reference.
POD_NAME_ENV = "KFP_POD_NAME"
POD_UID_ENV = "KFP_POD_UID"
# Kubeflow profile namespaces inject Istio sidecars; a worker with one never completes.
ISTIO_OPT_OUT = {"sidecar.istio.io/inject": "false"}
# On the jobs and their worker pods (manifests/mlflow-networkpolicy.yaml admits these pods:
# the chief logs its epochs to MLflow). The shipped TrainingRuntime sets the same.
LABELS = {"app.kubernetes.io/name": "vitpcm", "app.kubernetes.io/component": "train-worker"}


class LaunchError(VitpcmError):
    """The distributed job could not be created, failed, timed out or was terminated."""


class Terminated(LaunchError):
    """The step received SIGTERM while its job ran."""


@dataclass(frozen=True)
class JobKind:
    """A kind of training job: its API coordinates and how to read it."""

    group: str
    version: str
    plural: str
    kind: str
    install_hint: str  # what to install when the resource is unknown to the cluster
    state: Callable[[Mapping[str, Any]], tuple[str, str]]  # -> (state, message)
    worker0_selector: Callable[[str], str]  # job name -> pod label selector of worker 0
    container: str  # the worker container's name

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    @property
    def resource(self) -> str:
        """``plural.group``, as RBAC and error messages name it."""
        return f"{self.plural}.{self.group}"


def last_true_condition(job: Mapping[str, Any]) -> tuple[str, str]:
    """``(type, message)`` of the last condition whose status is True, or ``("Pending", "")``."""
    conditions = (job.get("status") or {}).get("conditions") or []
    for condition in reversed(conditions):
        if str(condition.get("status")) == "True":
            return str(condition.get("type")), str(condition.get("message", ""))
    return "Pending", ""


def current_namespace() -> str:
    """The namespace of the pod this runs in.

    Raises:
        LaunchError: Not inside a Kubernetes pod.
    """
    try:
        with open(NAMESPACE_FILE, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError as exc:
        raise LaunchError(
            f"cannot tell the namespace ({NAMESPACE_FILE}: {exc}); distributed training is "
            "launched from inside the cluster (or set distributed=none)"
        ) from exc


def kubernetes_apis() -> tuple[Any, Any]:
    """``(CustomObjectsApi, CoreV1Api)`` from the pod's service account."""
    from kubernetes import client, config

    config.load_incluster_config()
    return client.CustomObjectsApi(), client.CoreV1Api()


def owner_reference(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The step's pod as the job's owner (garbage collection), when KFP names it."""
    env = os.environ if environ is None else environ
    name, uid = env.get(POD_NAME_ENV), env.get(POD_UID_ENV)
    if not name or not uid:
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}


def _api_message(exc: Any) -> str:
    import json

    try:
        return str(json.loads(exc.body).get("message") or exc.reason)
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason)


def unknown_resource(exc: Any) -> bool:
    """A 404 for the resource type itself (CRD not installed), not for one named object."""
    return exc.status == 404 and "could not find the requested resource" in _api_message(exc)


def create_or_attach(api: Any, kind: JobKind, manifest: Mapping[str, Any]) -> bool:
    """Create the job; when it exists already (a retried step), attach to it.

    Returns:
        True when created, False when attached.

    Raises:
        LaunchError: The resource is unknown (not installed), forbidden or invalid.
    """
    from kubernetes.client.exceptions import ApiException

    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(
            kind.group, kind.version, namespace, kind.plural, dict(manifest)
        )
        return True
    except ApiException as exc:
        if exc.status == 409:
            log.info("%s %s/%s exists already: following it", kind.kind, namespace, name)
            return False
        if exc.status == 404:
            raise LaunchError(
                f"the {kind.kind} resource ({kind.api_version}) is unknown to this cluster: "
                f"{kind.install_hint}"
            ) from exc
        if exc.status == 403:
            raise LaunchError(
                f"not allowed to create {kind.resource} in {namespace}: run the pipeline "
                "as the ServiceAccount of manifests/rbac.yaml (vitpcm-pipeline)"
            ) from exc
        raise LaunchError(
            f"the cluster refused the {kind.kind} {name}: {exc.status} {_api_message(exc)}"
        ) from exc


def delete_job(api: Any, kind: JobKind, namespace: str, name: str) -> None:
    """Delete the job and, in the background, its pods; a job already gone is fine."""
    from kubernetes.client.exceptions import ApiException

    try:
        api.delete_namespaced_custom_object(
            kind.group,
            kind.version,
            namespace,
            kind.plural,
            name,
            propagation_policy="Background",
        )
        log.info("deleted %s %s/%s", kind.kind, namespace, name)
    except ApiException as exc:
        if exc.status != 404:
            log.error("could not delete %s %s/%s: %s", kind.kind, namespace, name, exc.reason)


class Worker0Log:
    """Copies worker 0's log into this process's output, line by line, in a thread."""

    def __init__(
        self,
        core: Any,
        namespace: str,
        selector: str,
        container: str,
        out: TextIO | None = None,
        poll_s: float = 5.0,
    ) -> None:
        self.core, self.namespace, self.selector = core, namespace, selector
        self.container, self.out, self.poll_s = container, out or sys.stdout, poll_s
        self._stop = threading.Event()
        self._finish = threading.Event()
        self._wake = threading.Event()  # set by finish() and stop(): no more waiting
        self._response: Any = None
        self._thread = threading.Thread(target=self._run, name="worker0-log", daemon=True)
        self.streamed: list[tuple[str, int]] = []  # (pod uid, container restarts) followed

    def start(self) -> Worker0Log:
        self._thread.start()
        return self

    def finish(self, timeout: float = 30.0) -> None:
        """The job ended: copy what is left of worker 0's log (its stream ends), then stop."""
        self._finish.set()
        self._wake.set()
        self._thread.join(timeout)
        self.stop()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop following now: close the current stream and wait for the thread."""
        self._stop.set()
        self._wake.set()
        response = self._response
        if response is not None:
            with contextlib.suppress(Exception):  # a dead stream: nothing left to stop
                response.close()
        self._thread.join(timeout)

    def _worker0(self) -> tuple[str, tuple[str, int]] | None:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector).items
        started = ("Running", "Succeeded", "Failed")
        ready = [p for p in pods if p.status and p.status.phase in started]
        if not ready:
            return None
        pod = max(ready, key=lambda p: str(p.metadata.creation_timestamp or ""))
        restarts = 0
        for status in pod.status.container_statuses or []:
            if status.name == self.container:
                restarts = int(status.restart_count or 0)
        return pod.metadata.name, (str(pod.metadata.uid), restarts)

    def _follow(self, pod: str) -> None:
        response = self.core.read_namespaced_pod_log(
            pod, self.namespace, container=self.container, follow=True, _preload_content=False
        )
        self._response = response
        pending = b""
        try:
            for chunk in response.stream(4096):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self.out.write(f"[worker 0] {line.decode(errors='replace')}\n")
                self.out.flush()
        finally:
            if pending:
                self.out.write(f"[worker 0] {pending.decode(errors='replace')}\n")
                self.out.flush()
            self._response = None
            response.release_conn()

    def _run(self) -> None:
        while not self._stop.is_set():
            last_round = self._finish.is_set()
            try:
                found = self._worker0()
                if found is not None and found[1] not in self.streamed:
                    self.streamed.append(found[1])
                    self._follow(found[0])
                    continue  # look again at once: the pod may have restarted
            except Exception as exc:  # a log is a convenience: never fail the step for it
                if not self._stop.is_set():
                    log.warning("worker 0 log: %s", exc)
            if last_round:
                return
            self._wake.wait(self.poll_s)


def _get_job(api: Any, kind: JobKind, namespace: str, name: str) -> Any:
    from kubernetes.client.exceptions import ApiException

    try:
        return api.get_namespaced_custom_object(
            kind.group, kind.version, namespace, kind.plural, name
        )
    except ApiException as exc:
        if exc.status == 404:
            raise LaunchError(
                f"{kind.kind} {namespace}/{name} is gone: it was deleted outside this step "
                "(by hand, or with the pod of an earlier attempt that owned it); retry the run, "
                "it resumes from the last checkpoint"
            ) from exc
        raise


def wait_for_job(
    api: Any,
    kind: JobKind,
    namespace: str,
    name: str,
    *,
    timeout_s: float,
    poll_s: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Poll the job's conditions until it succeeds.

    Raises:
        LaunchError: The job failed or did not finish within ``timeout_s``.
    """
    deadline = clock() + timeout_s
    last = None
    while True:
        job = _get_job(api, kind, namespace, name)
        state, message = kind.state(job)
        if state != last:
            log.info("%s %s/%s: %s %s", kind.kind, namespace, name, state, message)
            last = state
        if state == "Succeeded":
            return
        if state == "Failed":
            raise LaunchError(
                f"{kind.kind} {namespace}/{name} failed: {message or 'no message'} "
                "(worker 0's log is above; the job was deleted, the next attempt resumes "
                "from the last checkpoint)"
            )
        if clock() >= deadline:
            raise LaunchError(
                f"{kind.kind} {namespace}/{name} did not finish within {timeout_s / 3600:.1f} h "
                f"(last state {state}); it was deleted. Raise timeout_hours or check the workers"
            )
        sleep(poll_s)


def run_job(
    api: Any,
    core: Any,
    kind: JobKind,
    manifest: Mapping[str, Any],
    *,
    timeout_s: float,
    poll_s: float = 30.0,
    log_poll_s: float = 5.0,
    out: TextIO | None = None,
) -> None:
    """Create (or attach to) the job, stream worker 0's log, wait; delete it unless it succeeds.

    Raises:
        LaunchError: As :func:`create_or_attach` and :func:`wait_for_job`;
            :class:`Terminated` on SIGTERM.
    """
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]

    def on_sigterm(signum: int, frame: Any) -> None:
        raise Terminated(f"terminated (signal {signum}): {kind.kind} {namespace}/{name} deleted")

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main else None
    streamer = None
    job_exists = False
    try:
        created = create_or_attach(api, kind, manifest)
        job_exists = True
        log.info("%s %s %s/%s", "created" if created else "attached to", kind.kind, namespace, name)
        streamer = Worker0Log(
            core, namespace, kind.worker0_selector(name), kind.container, out, log_poll_s
        ).start()
        wait_for_job(api, kind, namespace, name, timeout_s=timeout_s, poll_s=poll_s)
        streamer.finish()  # the rest of the finished worker's log
    except BaseException:
        # No SIGTERM may interrupt the clean-up itself.
        if in_main:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if job_exists:
            delete_job(api, kind, namespace, name)
        raise
    finally:
        if streamer is not None:
            streamer.stop()
        if in_main:
            signal.signal(signal.SIGTERM, previous)
