"""``TF_CONFIG`` for a worker pod of a JobSet (Kubeflow Trainer v2), derived from its identity.

Trainer v2 runs a ``TrainJob`` as a JobSet and sets no ``TF_CONFIG`` for TensorFlow, which
``MultiWorkerMirroredStrategy`` needs. Every pod can derive it, because JobSet names its pods
predictably (read from the sources, kubernetes-sigs/jobset and kubeflow/trainer v2.0-v2.3):

* A replicated Job's child Jobs are ``<jobset>-<replicatedJob>-<jobIndex>``
  (jobset ``pkg/util/placement.GenJobName``). The child Jobs are Indexed (the JobSet webhook
  defaults ``completionMode: Indexed``), so Kubernetes names each pod's hostname
  ``<job>-<completionIndex>`` and sets ``JOB_COMPLETION_INDEX`` in its containers.
* With ``network.enableDNSHostnames`` (the webhook's default) JobSet sets the pods'
  ``subdomain`` to ``network.subdomain`` or, by default, the JobSet's name, and creates a
  headless Service of that name that publishes not-ready pods too, so
  ``<jobset>-<replicatedJob>-<jobIndex>-<podIndex>.<subdomain>`` resolves for every pod
  from the start. Trainer's JobSet plugin lists the same endpoints
  (``pkg/runtime/framework/plugins/jobset.syncPodNetwork``), and its JAX plugin builds its
  coordinator address the same way (``<trainjob>-node-0-0.<trainjob>:<port>``).
* The TrainJob's JobSet has the TrainJob's name; the trainer's replicated Job has one Job
  (``replicas: 1``) whose ``parallelism`` and ``completions`` are the TrainJob's
  ``numNodes``, so the workers are pods ``0 .. numNodes-1`` of Job index 0.
* JobSet labels every pod with ``jobset.sigs.k8s.io/jobset-name``,
  ``jobset.sigs.k8s.io/replicatedjob-name`` and ``jobset.sigs.k8s.io/job-index``; the
  shipped TrainingRuntime (``manifests/trainer/``) turns them into environment variables
  with the downward API, next to the completion index and the worker count.

So worker ``i`` of ``n`` gets::

    {"cluster": {"worker": ["<jobset>-<rjob>-<jobIndex>-0.<subdomain>:<port>", ...]},
     "task": {"type": "worker", "index": i}}

Worker 0 is the chief (writes the outputs). ``python -m vitpcm.tf_config -- CMD ...`` sets
the variable and executes CMD; ``--print`` shows it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from vitpcm.errors import ConfigError

# Environment of a worker (the shipped TrainingRuntime sets all but the Kubernetes one).
JOBSET_NAME = "JOBSET_NAME"  # label jobset.sigs.k8s.io/jobset-name
REPLICATED_JOB = "JOBSET_REPLICATED_JOB"  # label jobset.sigs.k8s.io/replicatedjob-name
JOB_INDEX = "JOBSET_JOB_INDEX"  # label jobset.sigs.k8s.io/job-index
POD_INDEX = "JOB_COMPLETION_INDEX"  # set by Kubernetes in every Indexed Job's containers
NUM_WORKERS = "VITPCM_NUM_WORKERS"  # the TrainJob's numNodes (the launcher sets it)
SUBDOMAIN = "JOBSET_SUBDOMAIN"  # optional: the JobSet's network.subdomain when it sets one
PORT = "VITPCM_WORKER_PORT"  # the workers' gRPC port (the container port of the runtime)
DEFAULT_PORT = 2222  # TensorFlow's customary worker port, as in Training Operator TFJobs


def _int(env: Mapping[str, str], name: str, minimum: int) -> int:
    raw = env.get(name, "").strip()
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(
            f"{name}={raw!r} is not a whole number; a JobSet worker needs it "
            "(run it from the TrainingRuntime of manifests/trainer/)"
        ) from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _ports(env: Mapping[str, str], workers: int) -> list[int]:
    """One port for every worker, or one per worker (workers sharing one host, as in tests)."""
    raw = env.get(PORT, "").strip()
    if not raw:
        return [DEFAULT_PORT] * workers
    try:
        ports = [int(p) for p in raw.split(",")]
    except ValueError:
        raise ConfigError(f"{PORT}={raw!r}: give a port, or one port per worker") from None
    if len(ports) == 1:
        ports *= workers
    if len(ports) != workers or not all(0 < p < 65536 for p in ports):
        raise ConfigError(
            f"{PORT}={raw!r}: give one port (1-65535), or exactly {workers} (one per worker)"
        )
    return ports


def worker_hosts(env: Mapping[str, str]) -> list[str]:
    """The stable DNS names of every worker pod of this pod's replicated Job, in index order.

    Raises:
        ConfigError: A variable is missing or malformed.
    """
    names = {}
    for var in (JOBSET_NAME, REPLICATED_JOB):
        names[var] = env.get(var, "").strip()
        if not names[var]:
            raise ConfigError(
                f"{var} is not set: a JobSet worker gets it from its pod labels "
                "(the TrainingRuntime of manifests/trainer/ sets it)"
            )
    job_index = _int(env, JOB_INDEX, 0)
    workers = _int(env, NUM_WORKERS, 1)
    jobset, rjob = names[JOBSET_NAME], names[REPLICATED_JOB]
    subdomain = env.get(SUBDOMAIN, "").strip() or jobset
    return [f"{jobset}-{rjob}-{job_index}-{pod}.{subdomain}" for pod in range(workers)]


def jobset_tf_config(env: Mapping[str, str]) -> dict[str, Any]:
    """``TF_CONFIG`` of this worker, from the environment described in the module docstring.

    Raises:
        ConfigError: A variable is missing or malformed, or the pod index is out of range.
    """
    hosts = worker_hosts(env)
    index = _int(env, POD_INDEX, 0)
    if index >= len(hosts):
        raise ConfigError(
            f"{POD_INDEX}={index} but {NUM_WORKERS}={len(hosts)}: the worker count must be "
            "the TrainJob's numNodes"
        )
    ports = _ports(env, len(hosts))
    workers = [f"{host}:{port}" for host, port in zip(hosts, ports, strict=True)]
    return {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vitpcm.tf_config [--print] [-- CMD ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m vitpcm.tf_config",
        description="Set TF_CONFIG from a JobSet pod's identity, then run CMD "
        "(an existing TF_CONFIG is kept).",
    )
    parser.add_argument("--print", action="store_true", help="print the TF_CONFIG and exit")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not args.print and not command:
        parser.error("give the command to run after --, or --print")
    raw = os.environ.get("TF_CONFIG", "").strip()
    try:
        tf_config = json.loads(raw) if raw else jobset_tf_config(os.environ)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(tf_config, separators=(",", ":"))
    if args.print:
        print(text)
        return 0
    print(f"TF_CONFIG={text}", file=sys.stderr, flush=True)
    os.environ["TF_CONFIG"] = text
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"error: cannot run {command[0]!r}: {exc}", file=sys.stderr)
        return 127
    return 0  # not reached: exec replaced the process


if __name__ == "__main__":
    sys.exit(main())
